"""What the engine asks of every curvature (:class:`Curvature`), and the shared machinery of
the curvatures that precondition in a Kronecker-factored eigenbasis (:class:`EigenbasisCurvature`).

A curvature owns, per layer, an input-side factor (A, or TEKFAC's Φ) and an output-side factor
(G, or Ψ) kept as bias-corrected EMAs, their eigenbases, and the scaling S that divides the
projected gradient (George et al. 2018, Alg. 1):

    ΔW̄ ∝ Q_out [ (Q_outᵀ ∇W̄ Q_in) / (S + λ) ] Q_inᵀ

Subclasses say how the factors are estimated and how S is formed: K-FAC's eigenvalue products,
EKFAC's diagonal, TEKFAC's diagonal in the trace-weighted basis.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .. import ops
from ..eigen import Eigh
from ..layers import LayerBatch
from . import one_hot

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


def _identity_eigh(factor: Tensor) -> Eigh:
    if factor.dim() == 1:  # a diagonal factor is its own eigendecomposition
        return Eigh(factor.clone(), None)
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    return Eigh(factor.diagonal().clone(), eye)


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


class Curvature(ABC):
    """The seam between the engine (:class:`~ekfac_triton.Preconditioner`) and one method's
    per-layer state. On each step the engine calls, per layer:

    1. :meth:`update_statistics` on statistics steps (every ``factor_every``);
    2. :meth:`refresh` when :meth:`refresh_due` says so (every ``eigen_every``: the eigenbases of
       the Kronecker curvatures; MAC's snapshot of its mean);
    3. :meth:`after_refresh` on statistics steps (what is measured in the refreshed state, e.g.
       EKFAC's scaling in the new basis);
    4. :meth:`precondition` on the layer's ``[∇W | ∇b]`` matrix.

    Args:
        shape: the layer's dimensions.
        dtype, device: where the statistics live (float32 or float64).
    """

    name: ClassVar[str]
    #: "torch" or "triton" (see :mod:`ekfac_triton.ops`); the preconditioner sets the resolved one
    backend: str = "torch"
    #: whether the statistics read only the layer inputs (then layer kinds whose output-gradients
    #: do not factor, such as depthwise convolutions, can be supported)
    inputs_only: ClassVar[bool] = False

    shape: LayerShape

    @property
    @abstractmethod
    def has_statistics(self) -> bool:
        """Whether a statistics step has been seen (before that the gradient passes unchanged)."""

    @abstractmethod
    def update_statistics(self, batch: LayerBatch, decay: float) -> None:
        """EMA update of the statistics from one batch (bias-corrected)."""

    def refresh_cost(self) -> float:
        """Estimated cost of one :meth:`refresh`, for the engine's staggered schedule."""
        return 0.0

    @abstractmethod
    def statistics(self) -> tuple[Tensor, ...]:
        """The tensors :meth:`update_statistics` updates: data-parallel training averages them
        over the ranks after each update (:mod:`ekfac_triton.distributed`)."""

    def refreshed_statistics(self) -> tuple[Tensor, ...]:
        """The tensors :meth:`after_refresh` updates (averaged over the ranks likewise)."""
        return ()

    def refresh_due(self, engine: EigenEngine, index: int, step: int) -> bool:
        """Whether layer ``index`` refreshes on ``step`` (``engine`` owns the schedule)."""
        return engine.due(index, step)

    @abstractmethod
    def refresh(self, engine: EigenEngine, index: int) -> str | None:
        """Refresh the state the preconditioner applies; returns a note to warn about, if any."""

    def after_refresh(self, batch: LayerBatch, decay: float) -> None:
        """Statistics measured in the refreshed state (default: none)."""

    @abstractmethod
    def precondition(self, grad: Tensor, damping: float, num_examples: int, decay: float) -> Tensor:
        """The preconditioned direction of the (d_out, d_in̄) gradient matrix."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EigenbasisCurvature(Curvature):
    """Per-layer state and maths of a Kronecker-eigenbasis preconditioner.

    Args:
        shape: the layer's dimensions.
        dtype, device: where the factors, bases and scalings live (float32 or float64).
        scaling: estimator of S for the curvatures that estimate it (see ``SCALINGS``).
    """

    #: whether S is estimated (EKFAC, TEKFAC) rather than derived from the eigenvalues (K-FAC)
    estimates_scaling: ClassVar[bool] = True

    #: dtype of the bases, eigenvalues and scaling (None: the factors'); the preconditioner sets it
    basis_dtype: torch.dtype | None = None
    #: copy a new basis, eigenvalues and scaling into the existing tensors instead of replacing
    #: them (set by the CUDA-graph compiled step, whose graphs read them at fixed addresses)
    install_in_place: bool = False

    _TENSORS = ("in_factor", "out_factor", "in_eigenvalues", "out_eigenvalues", "q_in", "q_out", "scaling")
    _COUNTS = ("factor_updates", "scaling_updates")

    def __init__(self, shape: LayerShape, dtype: torch.dtype, device: torch.device, scaling: str = "per_example"):
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        self.shape = shape
        self.scaling_mode = scaling
        in_shape = (shape.d_in_bar,) if shape.one_hot else (shape.d_in_bar, shape.d_in_bar)
        self.in_factor = torch.zeros(in_shape, dtype=dtype, device=device)
        self.out_factor = torch.zeros(shape.d_out, shape.d_out, dtype=dtype, device=device)
        self.in_eigenvalues: Tensor | None = None
        self.out_eigenvalues: Tensor | None = None
        self.q_in: Tensor | None = None
        self.q_out: Tensor | None = None
        self.scaling: Tensor | None = None
        self.factor_updates = 0
        self.scaling_updates = 0

    # -- statistics ---------------------------------------------------------------------------
    @abstractmethod
    def _factor_weights(self, batch: LayerBatch) -> tuple[Tensor | None, Tensor | None]:
        """Row weights of the input-side and output-side factors (None: unweighted)."""

    def update_factors(self, batch: LayerBatch, decay: float) -> None:
        """EMA update of both factors from one batch (K-FAC-expand normalisation, DESIGN §1):
        ``in += 1/(N·R) Σ_ns w_in ā āᵀ``, ``out += 1/(N·M) Σ_jns w_out ĝ ĝᵀ`` (M draws of the
        output-gradients per example: MC samples or type-2 columns, :mod:`ekfac_triton.fisher`)."""
        beta, alpha = self.next_factor_weights(decay)
        n, r = batch.num_examples, batch.num_positions
        w_in, w_out = self._factor_weights(batch)
        if self.shape.one_hot:
            one_hot.factor_update(self.in_factor, batch.a, alpha=alpha / (n * r), beta=beta, weights=w_in)
        else:
            ops.factor_update(self.in_factor, batch.a, alpha=alpha / (n * r), beta=beta,
                              bias=self.shape.bias, weights=w_in, backend=self.backend)
        ops.factor_update(self.out_factor, batch.g, alpha=alpha / (n * batch.draws), beta=beta, bias=False,
                          weights=w_out, backend=self.backend)

    def next_factor_weights(self, decay: float) -> tuple[float, float]:
        """Count one factor update; its EMA weights ``(beta, alpha)`` (:func:`ema_weights`)."""
        self.factor_updates += 1
        return ema_weights(decay, self.factor_updates)

    def next_scaling_weights(self, decay: float) -> tuple[float, float]:
        """Count one update of the estimated scaling S; its EMA weights ``(beta, alpha)``."""
        self.scaling_updates += 1
        return ema_weights(decay, self.scaling_updates)

    @property
    def has_statistics(self) -> bool:
        return self.factor_updates > 0

    def update_statistics(self, batch: LayerBatch, decay: float) -> None:
        self.update_factors(batch, decay)

    def statistics(self) -> tuple[Tensor, ...]:
        return self.in_factor, self.out_factor

    def refreshed_statistics(self) -> tuple[Tensor, ...]:
        # the per-example / per-position scalings; the ``batch`` one comes from the averaged gradient
        return (self.scaling,) if self.estimates_scaling and self.scaling_mode != "batch" else ()

    # -- eigenbasis -----------------------------------------------------------------------------
    @property
    def has_basis(self) -> bool:
        return self.q_out is not None  # q_in stays None for one-hot inputs (the identity)

    def refresh_cost(self) -> float:
        return float((0 if self.shape.one_hot else self.shape.d_in_bar ** 3) + self.shape.d_out ** 3)

    def refresh_due(self, engine: EigenEngine, index: int, step: int) -> bool:
        return not self.has_basis or engine.due(index, step)

    def refresh(self, engine: EigenEngine, index: int) -> str | None:
        """Eigendecompose the factors now (the first basis, or a synchronous engine) or hand them
        to the engine's worker (installed later through :meth:`install`)."""
        warm = engine.warm_basis(index, self.q_in, self.q_out)
        if not self.has_basis or engine.synchronous:
            return self.install(engine.decompose(self.in_factor, self.out_factor, warm))
        engine.submit(index, self.in_factor, self.out_factor, warm)
        return None

    def install(self, result: Decomposition) -> str | None:
        """Install a finished decomposition; returns its failure note, if any."""
        installed = self.install_basis(result.new_in, result.new_out)
        if not result.note:
            return None
        return result.note + ("" if installed else "; keeping the previous basis")

    def install_basis(self, new_in: Eigh | None, new_out: Eigh | None) -> bool:
        """Install freshly computed eigendecompositions of the factors (None: that one failed).

        On success the scaling is re-initialised to the K-FAC eigenvalue products in the new basis
        and its EMA restarts, so the next estimate replaces it. If either failed, the previous basis
        and scaling are kept; a layer that never had a basis gets the identity basis with the
        factors' diagonals as eigenvalues (a diagonal approximation). Returns whether the new
        basis was installed.
        """
        if new_in is not None and new_out is not None:
            self._set_basis(new_in, new_out)
            return True
        if not self.has_basis:
            self._set_basis(_identity_eigh(self.in_factor), _identity_eigh(self.out_factor))
        return False

    def _basis_dtype(self) -> torch.dtype:
        return self.basis_dtype or self.in_factor.dtype

    def _set_basis(self, e_in: Eigh, e_out: Eigh) -> None:
        dtype = self._basis_dtype()
        # q_in stays None for one-hot inputs (the identity basis)
        self._put("q_in", None if e_in.vectors is None else e_in.vectors.to(dtype))
        self._put("in_eigenvalues", e_in.values.to(dtype))
        self._put("q_out", e_out.vectors.to(dtype))
        self._put("out_eigenvalues", e_out.values.to(dtype))
        self._put("scaling", self.eigenvalue_products())
        self.scaling_updates = 0

    def _put(self, name: str, value: Tensor | None) -> None:
        old = getattr(self, name)
        if self.install_in_place and old is not None and value is not None and old.shape == value.shape:
            old.copy_(value)  # CUDA graphs read these tensors at fixed addresses
        else:
            setattr(self, name, value)

    def eigenvalue_products(self) -> Tensor:
        """K-FAC's scaling ``λ_out λ_inᵀ`` (eigenvalues clamped at 0: the factors are PSD)."""
        return torch.outer(self.out_eigenvalues.clamp_min(0), self.in_eigenvalues.clamp_min(0))

    # -- scaling and preconditioning ------------------------------------------------------------
    def update_scaling(self, batch: LayerBatch, decay: float) -> None:
        """EMA update of S from one batch's per-example gradients (``per_example`` and
        ``per_position`` modes; the ``batch`` mode updates S inside :meth:`precondition`). With M
        draws per example the (draw, example) pairs are the examples: ``1/(N·M) Σ_jn (...)²``,
        one call per draw so that ā is never repeated M times (folded into one with a single
        position per example, :meth:`_fold_draws`)."""
        if not self.estimates_scaling or self.scaling_mode == "batch":
            return
        beta, alpha = self.next_scaling_weights(decay)
        n, m = batch.num_examples, batch.draws
        a = batch.a
        if self.scaling_mode == "per_position":  # positions as examples: an approximation
            a = a.reshape(-1, 1, a.shape[-1])
        if m > 1 and a.shape[1] == 1 and not self.shape.one_hot:
            self._fold_draws(batch.g.reshape(m, a.shape[0], -1), a[:, 0], alpha / (n * m), beta)
            return
        for j in range(m):
            g = batch.g_of_draw(j)
            if self.scaling_mode == "per_position":
                g = g.reshape(-1, 1, g.shape[-1])
            if self.shape.one_hot:
                one_hot.scaling_update(self.scaling, g, a.reshape(g.shape[:2]), self.q_out, alpha=alpha / (n * m),
                                       beta=beta if j == 0 else 1.0)
                continue
            ops.per_example_scaling(self.scaling, g, a, self.q_out, self.q_in, alpha=alpha / (n * m),
                                    beta=beta if j == 0 else 1.0, bias=self.shape.bias, backend=self.backend)

    def _fold_draws(self, g: Tensor, a: Tensor, alpha: float, beta: float) -> None:
        """``S <- β S + α Σ_n (Σ_j (Q_outᵀ ĝ_jn)²)(Q_inᵀ ā_n)²ᵀ`` for one position per example
        and M draws ``g`` (M, N, d_out): there ``Σ_j ((Q_outᵀ ĝ_jn)(Q_inᵀ ā_n)ᵀ)²`` factors, so the
        draws fold into one GEMM instead of M (type-2 with 784 outputs: 784 times fewer; plain
        torch whatever the backend)."""
        dtype = self.scaling.dtype
        g_sq = (g.to(dtype) @ self.q_out).square().sum(0)                  # (N, d_out)
        a = a.to(dtype)
        if self.shape.bias:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        update = g_sq.T @ (a @ self.q_in).square()
        if beta == 0.0:
            self.scaling.copy_(update.mul_(alpha))
        else:
            self.scaling.mul_(beta).add_(update, alpha=alpha)

    def after_refresh(self, batch: LayerBatch, decay: float) -> None:
        self.update_scaling(batch, decay)

    def damping_for(self, damping: float) -> float | Tensor:
        """The damping actually added to S (TEKFAC's effective damping overrides this)."""
        return damping

    def precondition(self, grad: Tensor, damping: float, num_examples: int, decay: float) -> Tensor:
        """``Q_out [(Q_outᵀ grad Q_in) / (S + λ)] Q_inᵀ`` for the (d_out, d_in̄) gradient matrix.

        In ``batch`` mode S is first updated with ``num_examples · P²`` (EMA with ``decay``).
        """
        batch_update = None
        if self.estimates_scaling and self.scaling_mode == "batch":
            beta, alpha = self.next_scaling_weights(decay)
            batch_update = (beta, alpha, num_examples)
        if self.shape.one_hot:
            return one_hot.precondition(grad.to(self.q_out.dtype), self.q_out, self.scaling, self.damping_for(damping),
                                        batch_update=batch_update)
        direction = ops.precondition(grad.to(self.q_in.dtype), self.q_out, self.q_in, self.scaling,
                                     self.damping_for(damping), batch_update=batch_update, backend=self.backend)
        return direction

    # -- serialisation --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: getattr(self, k) for k in self._TENSORS}
        state.update({k: getattr(self, k) for k in self._COUNTS})
        state["curvature"] = self.name
        state["scaling_mode"] = self.scaling_mode
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("curvature") != self.name:
            raise ValueError(f"state is for curvature {state.get('curvature')!r}, this layer uses {self.name!r}")
        device = self.in_factor.device
        for k in self._TENSORS:
            value = state[k]
            dtype = self.in_factor.dtype if k.endswith("_factor") else self._basis_dtype()
            setattr(self, k, None if value is None else value.to(device=device, dtype=dtype, copy=True))
        for k in self._COUNTS:
            setattr(self, k, int(state[k]))
