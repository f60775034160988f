"""What the step asks of every curvature (:class:`Curvature`), the options every curvature takes,
and the bias-corrected EMA weights they share.

A curvature owns one layer's statistics and turns them into a preconditioned direction. It does
not run its tensor work itself: for each phase of the step it hands back a *job*, a small
``NamedTuple`` of tensors, constants and an offset into the step's scalars whose ``run(scalars,
finite, backend)`` is a pure function of them (:mod:`ekfac_triton.step.maths`), and whose optional
``mutated()`` names the tensors it updates in place (the step's transaction keeps their old
values: :mod:`ekfac_triton.step.transaction`). The eager step
calls the jobs with Python floats; the compiled step calls the very same jobs under
``torch.compile`` with a device vector of scalars and a non-finite mask. The bookkeeping (EMA
counts, schedules) stays here, in Python.

Adding a curvature is one file: subclass :class:`Curvature` (or
:class:`~ekfac_triton.curvature.eigenbasis.EigenbasisCurvature`), give it a ``name`` and, if it
has options of its own, an ``Options`` dataclass extending :class:`CurvatureOptions`; then pass
the class itself as ``curvature=`` (or register its name in :data:`ekfac_triton.curvature.CURVATURES`).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .. import ops
from ..layers import LayerBatch

if TYPE_CHECKING:
    from ..eigen_engine import Decomposition, EigenEngine

SCALINGS = ("per_example", "batch", "per_position")


def ema_weights(decay: float, count: int) -> tuple[float, float]:
    """``(beta, alpha)`` such that ``C <- beta*C + alpha*x`` keeps C equal to the bias-corrected
    EMA ``m_k / (1 - decay^k)`` after its k-th update (``count = k``): the first update sets C to
    the batch estimate, with no bias towards the zero initialisation."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    norm = 1.0 - decay**count
    return decay * (1.0 - decay ** (count - 1)) / norm, (1.0 - decay) / norm


@dataclass(frozen=True)
class LayerShape:
    """What a curvature needs to know of its layer.

    ``one_hot``: the inputs are one-hot vectors given as indices (``nn.Embedding``); the input
    factor is then kept as its diagonal and its basis is the identity
    (:mod:`ekfac_triton.curvature.one_hot`).
    """

    d_out: int
    d_in: int
    bias: bool
    one_hot: bool = False
    #: attention layers (MAC): the value-projection rows ``[start, stop)`` of the weight
    value_rows: tuple[int, int] | None = None

    @property
    def d_in_bar(self) -> int:
        return self.d_in + int(self.bias)


@dataclass(frozen=True, kw_only=True)
class CurvatureOptions:
    """Options of a curvature (a subclass's ``Options`` extends this with its own).

    Attributes:
        scaling: how EKFAC/TEKFAC estimate the scaling S: ``"per_example"`` (the exact diagonal in
            the eigenbasis, from each example's own gradient), ``"batch"`` (an EMA of
            ``N·(Q_outᵀ∇W̄Q_in)²`` from the mini-batch gradient, updated every step, no per-example
            work) or ``"per_position"`` (positions as examples: an approximation under weight
            sharing). Ignored by the curvatures that do not estimate S (K-FAC, MAC).
    """

    scaling: str = "per_example"

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"Invalid scaling={self.scaling!r}: must be one of {SCALINGS}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}={value!r}: must be a bool")


def is_number(x: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class RefreshRequest(NamedTuple):
    """A due eigendecomposition of one layer's two factors, handed to the refresh strategy
    (:mod:`ekfac_triton.distributed`), whose result comes back through :meth:`Curvature.install`."""

    index: int
    in_factor: Tensor
    out_factor: Tensor
    #: the previous bases to warm-start from (one step of subspace iteration), or None: a full eigh
    warm: tuple[Tensor, Tensor] | None
    #: decompose now (the first basis, or a synchronous engine) rather than on the worker
    synchronous: bool


class AccumulatedEMA(NamedTuple):
    """The EMA update of state tensors from the running sums of several micro-batches (gradient
    accumulation, ARCHITECTURE.md "Gradient accumulation"): ``targets[j] <- β targets[j] + α_j
    sums[j]`` with ``(β, α_0, α_1, …) = scalars[at:]``; the α_j carry the normalisation by the
    total number of examples, known only at the step. ``sums`` are temporaries (overwritten)."""

    targets: tuple[Tensor, ...]
    sums: tuple[Tensor, ...]
    at: int

    def mutated(self) -> tuple[Tensor, ...]:
        return self.targets

    def run(self, scalars: Any, finite: Tensor | None, backend: str) -> None:
        beta = scalars[self.at]
        for j, (target, total) in enumerate(zip(self.targets, self.sums)):
            ops.ema(target, total.to(target.dtype), beta, scalars[self.at + 1 + j], finite)


class Direction(NamedTuple):
    """The job of a layer without curvature yet: its direction is its gradient."""

    grad: Tensor

    def run(self, scalars: Any, finite: Tensor | None, backend: str) -> Tensor:
        return self.grad


class Curvature(ABC):
    """The seam between the step (:class:`~ekfac_triton.step.engine.StepEngine`) and one
    method's per-layer state. On each step the engine asks, per layer:

    1. :meth:`statistics_job` on statistics steps (every ``factor_every``);
    2. :meth:`refresh` when :meth:`refresh_due` says so (every ``eigen_every``: the eigenbases of
       the Kronecker curvatures, through :meth:`install`; MAC's snapshot of its mean);
    3. :meth:`scaling_job` on statistics steps (what is measured in the refreshed state, e.g.
       EKFAC's scaling in the new basis);
    4. :meth:`direction_job` for the layer's ``[∇W | ∇b]`` matrix.

    Args:
        shape: the layer's dimensions.
        dtype, device: where the statistics live (float32 or float64).
        options: the curvature's options (its ``Options`` class).
    """

    name: ClassVar[str]
    Options: ClassVar[type[CurvatureOptions]] = CurvatureOptions
    #: "torch" or "triton" (see :mod:`ekfac_triton.ops`); the preconditioner sets the resolved one
    backend: str = "torch"
    #: whether the statistics read only the layer inputs (then layer kinds whose output-gradients
    #: do not factor, such as depthwise convolutions, can be supported)
    inputs_only: ClassVar[bool] = False
    #: whether the compiled step covers this curvature (its jobs trace under torch.compile)
    compiles: ClassVar[bool] = False
    #: the KL clip ``kl_clip="auto"`` gives this curvature (None: none; config.py, kl_clip)
    default_kl_clip: ClassVar[float | None] = None

    shape: LayerShape

    @property
    @abstractmethod
    def has_statistics(self) -> bool:
        """Whether a statistics step has been seen (before that the gradient passes unchanged)."""

    @abstractmethod
    def statistics_job(self, batch: LayerBatch, decay: float, scalars: list[float]) -> Any:
        """Count one statistics update and return its job (EMA weights appended to ``scalars``)."""

    def first_update_due(self) -> bool:
        """Whether this step's EMA updates of the layer include a first one, which replaces the
        state (the compiled step then decides a non-finite skip on the host)."""
        return False

    def refresh_cost(self) -> float:
        """Estimated cost of one :meth:`refresh`, for the engine's staggered schedule."""
        return 0.0

    @abstractmethod
    def statistics(self) -> tuple[Tensor, ...]:
        """The tensors the statistics jobs update: data-parallel training averages them over the
        ranks after each update (:mod:`ekfac_triton.distributed`)."""

    def refreshed_statistics(self) -> tuple[Tensor, ...]:
        """The tensors the scaling jobs update (averaged over the ranks likewise)."""
        return ()

    def refresh_due(self, engine: EigenEngine, index: int, step: int) -> bool:
        """Whether layer ``index`` refreshes on ``step`` (``engine`` owns the schedule)."""
        return engine.due(index, step)

    @abstractmethod
    def refresh(self, engine: EigenEngine, index: int) -> RefreshRequest | None:
        """Refresh the state the direction applies: either now (returns None) or by asking for an
        eigendecomposition (returns the request; the strategy installs the result)."""

    def install(self, result: Decomposition) -> str | None:
        """Install a finished decomposition; returns a note to warn about, if any."""
        raise NotImplementedError(f"{type(self).__name__} requests no decomposition")

    def installs_in_place(self) -> tuple[Tensor, ...]:
        """The tensors :meth:`install` overwrites in place (rather than replacing them)."""
        return ()

    def scaling_job(self, batch: LayerBatch, decay: float, scalars: list[float]) -> Any | None:
        """The job of the statistics measured in the refreshed state (default: none)."""
        return None

    # -- gradient accumulation (ARCHITECTURE.md, "Gradient accumulation") -------------------------
    #: whether the scalings phase projects each example into the basis in use then (EKFAC's
    #: per-example S): a micro-batch can be folded early only while that basis cannot change
    projects_examples: bool = False

    def fold(self, sums: dict[str, Any], batch: LayerBatch, num_examples: int, *, factors: bool,
             scaling: bool) -> None:
        """Add one micro-batch of ``num_examples`` examples to the running ``sums`` (created on
        first use): its statistics with every output-gradient divided by ``num_examples`` (that
        is, autograd's own gradient of the micro-batch loss), so that the step can normalise by
        the total N (:meth:`accumulated_statistics_job`). ``factors``: the statistics-phase sums;
        ``scaling``: the per-example projections in the current basis."""
        raise NotImplementedError(f"curvature {self.name!r} does not support gradient accumulation (several "
                                  "backward() calls before step()): call step() after each backward")

    def accumulated_statistics_job(self, sums: dict[str, Any], num_examples: int, decay: float,
                                   scalars: list[float]) -> Any:
        """Like :meth:`statistics_job`, from the folded ``sums`` of ``num_examples`` examples."""
        raise NotImplementedError(f"curvature {self.name!r} does not support gradient accumulation")

    def accumulated_scaling_job(self, sums: dict[str, Any], num_examples: int, decay: float,
                                scalars: list[float]) -> Any | None:
        """Like :meth:`scaling_job`, from the folded ``sums`` (default: none)."""
        return None

    def basis_changes(self, engine: EigenEngine, index: int, step: int) -> bool:
        """Whether a refresh on ``step`` replaces the basis before that step's scalings phase
        (default: whenever one is due)."""
        return self.refresh_due(engine, index, step)

    def basis_token(self) -> Any:
        """The basis the per-example projections are taken in, as ``(tensor, version)`` pairs
        (None: no basis)."""
        return None

    @abstractmethod
    def direction_job(self, grad: Tensor, damping: float, num_examples: int, decay: float,
                      scalars: list[float]) -> Any:
        """The job whose ``run`` returns the preconditioned direction of the (d_out, d_in̄) matrix.
        ``num_examples`` is the batch size N of the step, 0 when no backward reached the layer
        since the last step (its gradient is zeros or left over): statistics estimated from the
        gradient itself must then not be updated."""

    def check_state(self, state: dict[str, Any], layer: str) -> None:
        """Raise ``ValueError`` naming ``layer`` and the field if :meth:`load_state_dict` would
        not accept ``state`` exactly (checked for every layer before any is loaded)."""
        if state.get("curvature", self.name) != self.name:
            raise ValueError(f"Invalid state_dict: layer {layer!r} has curvature={state.get('curvature')!r} state, "
                             f"this optimizer uses {self.name!r}")
        saved = state.get("options")  # absent in states saved before the step redesign
        ours = dataclasses.asdict(self.options) if hasattr(self, "options") else {}
        if saved is not None:
            differ = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
            if differ:
                raise ValueError(f"Invalid state_dict: layer {layer!r} was saved with "
                                 f"{', '.join(f'{k}={saved.get(k)!r}' for k in differ)}, this optimizer uses "
                                 f"{', '.join(f'{k}={ours.get(k)!r}' for k in differ)}")

    @staticmethod
    def check_tensor(layer: str, field: str, value: Any, shape: tuple[int, ...] | None, dtype: torch.dtype) -> None:
        """Raise ``ValueError`` unless ``value`` is None or a tensor of ``shape`` and ``dtype``."""
        if value is None:
            return
        if not isinstance(value, Tensor):
            raise ValueError(f"Invalid state_dict: layer {layer!r} field {field!r} is a {type(value).__name__}, "
                             "not a tensor")
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(f"Invalid state_dict: layer {layer!r} field {field!r} has shape {tuple(value.shape)}, "
                             f"this layer needs {tuple(shape)} (a model of another width?)")
        if value.dtype != dtype:
            raise ValueError(f"Invalid state_dict: layer {layer!r} field {field!r} is {value.dtype}, this optimizer "
                             f"keeps it in {dtype} (factor_dtype / basis_dtype must match)")

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
