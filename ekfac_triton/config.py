"""Validated settings, one keyword-only config per axis, each argument documented once.

* :class:`StatisticsConfig`: how the statistics are kept (EMA decay, period, dtypes, KL clip);
* :class:`EigenConfig`: when and how eigendecompositions run (:mod:`ekfac_triton.eigen_engine`);
* :class:`FisherConfig`: which Fisher the statistics estimate (:mod:`ekfac_triton.fisher`);
* the curvature's own options: its ``Options`` class (:mod:`ekfac_triton.curvature.base`).

:class:`PreconditionerConfig` splits the flat keyword arguments of :class:`~ekfac_triton.EKFAC`
and :class:`~ekfac_triton.Preconditioner` among them; the docstrings of both are built from the
``doc`` of each field here (:func:`argument_docs`), so an option is written and documented in one
place. Every bad value raises ``ValueError`` (``TypeError`` for an unknown argument) naming it.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from .curvature import Curvature, CurvatureOptions, curvature_class
from .curvature.base import check_bool, is_number
from .fisher import check_fisher
from .step.rows import PROJECTED_GRADIENT

BACKENDS = ("auto", "triton", "torch")
#: dtypes the statistics (factors) and the eigenbases (with the scalings) may be kept in: they
#: accumulate, so half precision is refused (activations of any dtype are read with fp32
#: accumulation, e.g. bf16 under autocast)
STATE_DTYPES = (torch.float32, torch.float64)


def doc(text: str, default: Any = None, **kwargs: Any) -> Any:
    """A dataclass field with its documentation (rendered by :func:`argument_docs`)."""
    return field(default=default, metadata={"doc": " ".join(text.split())}, **kwargs)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Invalid {name}={value!r}: must be an integer >= {minimum}")


# -- the per-group hyperparameters ----------------------------------------------------------------
def check_lr(lr: object) -> None:
    if not is_number(lr) or lr < 0:
        raise ValueError(f"Invalid lr={lr!r}: must be a finite number >= 0")


def check_damping(damping: object) -> None:
    if not is_number(damping) or damping <= 0:
        raise ValueError(f"Invalid damping={damping!r}: must be a finite number > 0")


def check_momentum(momentum: object) -> None:
    if not is_number(momentum) or not 0 <= momentum < 1:
        raise ValueError(f"Invalid momentum={momentum!r}: must be in [0, 1)")


def check_weight_decay(weight_decay: object) -> None:
    if not is_number(weight_decay) or weight_decay < 0:
        raise ValueError(f"Invalid weight_decay={weight_decay!r}: must be a finite number >= 0")


PLAIN_UPDATES = ("adamw", "sgd")


def check_plain_update(plain_update: object) -> None:
    if plain_update not in PLAIN_UPDATES:
        raise ValueError(f"Invalid plain_update={plain_update!r}: must be one of {PLAIN_UPDATES}")


def _check_plain(group: dict) -> None:
    """The ``plain_*`` hyperparameters of the AdamW update of parameters without curvature."""
    if "plain_lr" in group and (not is_number(group["plain_lr"]) or group["plain_lr"] < 0):
        raise ValueError(f"Invalid plain_lr={group['plain_lr']!r}: must be a finite number >= 0")
    if "plain_betas" in group:
        betas = group["plain_betas"]
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(is_number(b) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"Invalid plain_betas={betas!r}: must be two numbers in [0, 1)")
    if "plain_eps" in group and (not is_number(group["plain_eps"]) or group["plain_eps"] <= 0):
        raise ValueError(f"Invalid plain_eps={group['plain_eps']!r}: must be a finite number > 0")
    if "plain_weight_decay" in group:
        wd = group["plain_weight_decay"]
        if not is_number(wd) or wd < 0:
            raise ValueError(f"Invalid plain_weight_decay={wd!r}: must be a finite number >= 0")


def check_group(group: dict) -> None:
    """Validate one parameter group's hyperparameters."""
    check_lr(group["lr"])
    check_damping(group["damping"])
    check_momentum(group["momentum"])
    check_weight_decay(group["weight_decay"])
    _check_plain(group)


# -- the axes ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class StatisticsConfig:
    """How each layer's statistics are kept."""

    factor_decay: float = doc("EMA decay of the factors and scalings, in [0, 1); bias-corrected, so the first "
                              "update sets a factor to its batch estimate.", 0.95)
    factor_every: int = doc("update the factors (and per-example scalings) every this many steps.", 1)
    backend: str = doc("which implementation runs the kernel families: ``\"auto\"`` (the torch references "
                       "for now), ``\"torch\"`` or ``\"triton\"`` (needs a CUDA device).", "auto")
    kl_clip: float | str | None = doc(
        "the trust region: None, or the KL-clip size: the preconditioned directions are scaled by "
        "``min(1, sqrt(kl_clip / |Σ lr²⟨v, g⟩|))`` (kfac-pytorch's semantics; Ba et al. 2017). ``\"auto\"``: the "
        "curvature's default, 1e-3 for ekfac, kfac and tekfac (measured in ARCHITECTURE.md, \"Default "
        "hyperparameters\": without it the lr 0.1 defaults diverged on transformers, ResNets and ViTs), None for "
        "mac (its own recipe, and its fused update), for a ``Preconditioner`` built without ``lr``, and for the "
        "exact configuration of an optimizer (``momentum=0, weight_decay=0, factor_decay=0, eigen_every=1``: one "
        "step is exactly ``-lr (F̂ + λI)⁻¹ ∇L``).", "auto")
    factor_dtype: torch.dtype | None = doc("dtype of the factors, ``torch.float32`` or ``torch.float64``; None: "
                                           "float64 for float64 layers, else float32. bf16/fp16 activations and "
                                           "output-gradients (autocast) are accumulated in it.")
    basis_dtype: torch.dtype | None = doc("dtype of the eigenbases, eigenvalues and scalings (and of the "
                                          "preconditioning arithmetic), ``torch.float32`` or ``torch.float64``; "
                                          "None: the factors' dtype.")
    projected_gradient: str = doc("how the direction forms the projected gradient ``Q_outᵀ ∇W̄ Q_in`` of a layer "
                                  "with one position per example on statistics steps: ``\"auto\"`` from the "
                                  "captured rows, ``(ĜQ_out)ᵀ(ĀQ_in)/N``, where that costs fewer flops than from "
                                  "the gradient matrix; ``\"rows\"`` from the rows wherever allowed; "
                                  "``\"gradient\"`` always from the gradient matrix. The rows are used only "
                                  "where a guard establishes that the gradient is exactly theirs (empirical "
                                  "Fisher, eager step, one process, gradient untouched since its one "
                                  "accumulation, a random probe within rounding); elsewhere the gradient form, "
                                  "the same direction up to rounding (ARCHITECTURE.md).", "auto")
    grad_scaler: Any = doc("the ``torch.amp.GradScaler`` whose scaled loss is backpropagated (fp16 training), or "
                           "None. The captured output-gradients carry its scale, which the statistics divide out. "
                           "With it, ``scaler.step(opt)`` always calls ``EKFAC.step`` (torch's "
                           "``_step_supports_amp_scaling`` protocol): a step in which the scaler found inf/NaN is "
                           "skipped with the state untouched, and gradients not yet unscaled are unscaled there.")
    max_skipped_steps: int | None = doc(
        "raise a ``RuntimeError`` (saying what happened and what to change) once this many steps in a row were "
        "skipped for non-finite gradients, activations or statistics, instead of letting a diverged run go on "
        "silently; None: never raise. Steps the ``grad_scaler`` skips do not count. With ``compile_step`` the "
        "device's count of skips is read on steps that sync anyway and once every ``max_skipped_steps`` steps, "
        "so the error may come up to that many steps later.", 10)

    def __post_init__(self) -> None:
        if self.max_skipped_steps is not None:
            _check_int("max_skipped_steps", self.max_skipped_steps, 1)
        if self.backend not in BACKENDS:
            raise ValueError(f"Invalid backend={self.backend!r}: must be one of {BACKENDS}")
        if not is_number(self.factor_decay) or not 0 <= self.factor_decay < 1:
            raise ValueError(f"Invalid factor_decay={self.factor_decay!r}: must be in [0, 1)")
        _check_int("factor_every", self.factor_every, 1)
        if self.kl_clip is not None and self.kl_clip != "auto" and (not is_number(self.kl_clip)
                                                                    or self.kl_clip <= 0):
            raise ValueError(f"Invalid kl_clip={self.kl_clip!r}: must be None, 'auto' or a number > 0")
        for name in ("factor_dtype", "basis_dtype"):
            value = getattr(self, name)
            if value is not None and value not in STATE_DTYPES:
                raise ValueError(f"Invalid {name}={value!r}: must be None, torch.float32 or torch.float64")
        if self.projected_gradient not in PROJECTED_GRADIENT:
            raise ValueError(f"Invalid projected_gradient={self.projected_gradient!r}: must be one of "
                             f"{PROJECTED_GRADIENT}")
        if self.grad_scaler is not None and not isinstance(self.grad_scaler, torch.amp.GradScaler):
            raise ValueError(f"Invalid grad_scaler={self.grad_scaler!r}: must be None or a torch.amp.GradScaler")


@dataclass(frozen=True, kw_only=True)
class EigenConfig:
    """When and how the eigendecompositions run (:class:`~ekfac_triton.eigen_engine.EigenEngine`)."""

    eigen_every: int = doc("recompute each layer's eigenbasis every this many steps (MAC: the refresh period of "
                           "its mean snapshot); a layer's first statistics step always computes its first basis.",
                           10)
    stagger: bool = doc("give each layer an offset in [0, eigen_every) chosen by its estimated eigendecomposition "
                        "cost, so that no step refreshes every layer (the first does).", True)
    synchronous: bool | None = doc("True: refresh bases on the due step (reproducible); False: on a worker thread "
                                   "(a side CUDA stream on GPU), the new basis installed at the first step boundary "
                                   "after it is ready. None: True on CPU and with ``eigen_every=1``, else False.")
    float64_max_dim: int | None = doc("factors up to this dimension are eigendecomposed in float64; None: 1024 on "
                                      "CUDA (where float64 eigh is as fast, ARCHITECTURE.md), 0 on CPU.")
    warm_starts: int = doc("after each full eigh, a layer's next ``warm_starts`` refreshes are one step of "
                           "subspace iteration with QR from its previous basis (cheaper), then a full eigh again.", 0)

    def __post_init__(self) -> None:
        _check_int("eigen_every", self.eigen_every, 1)
        check_bool("stagger", self.stagger)
        if self.synchronous is not None:
            check_bool("synchronous", self.synchronous)
        if self.float64_max_dim is not None:
            _check_int("float64_max_dim", self.float64_max_dim, 0)
        _check_int("warm_starts", self.warm_starts, 0)


@dataclass(frozen=True, kw_only=True)
class FisherConfig:
    """Which Fisher the statistics estimate (:mod:`ekfac_triton.fisher`)."""

    fisher: str = doc("``\"empirical\"`` (output-gradients of the training loss, no extra cost), ``\"mc\"`` "
                      "(targets drawn from the model's predictive distribution, ``mc_samples`` extra backward "
                      "passes per statistics step) or ``\"type-2\"`` (the exact Gauss-Newton through a factor of "
                      "the loss Hessian: P·C extra backward passes per statistics step, C classes or outputs at "
                      "each of P output positions, and P·C times the output-gradient memory). mc and type-2 need "
                      "``loss`` and a curvature backward (``backward`` or ``curvature_backward``) on every "
                      "statistics step; they are not defined for ``curvature=\"mac\"``.", "empirical")
    loss: nn.Module | None = doc("the training loss, an ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or "
                                 "``nn.BCEWithLogitsLoss`` with reduction ``\"mean\"``. Required for mc/type-2; "
                                 "optional for empirical (it lets ``backward`` compute the loss).")
    mc_samples: int = doc("MC draws per example (>= 1; only with ``fisher=\"mc\"``).", 1)
    loss_scale: float = doc("the training loss is ``loss_scale · loss(output, target)`` (e.g. the number of "
                            "entries of an example, for a loss summed over pixels or tokens): mc/type-2 estimate "
                            "the curvature of that scaled loss and ``backward`` trains on it.", 1.0)
    seed: int | None = doc("seed of the MC generator (on the model's device, saved in ``state_dict``); None: "
                           "drawn from torch's global RNG.")

    def __post_init__(self) -> None:
        check_fisher(self.fisher, self.mc_samples, self.loss)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"Invalid seed={self.seed!r}: must be None or an integer")
        if not is_number(self.loss_scale) or self.loss_scale <= 0:
            raise ValueError(f"Invalid loss_scale={self.loss_scale!r}: must be a finite number > 0")


AXES: tuple[type, ...] = (StatisticsConfig, EigenConfig, FisherConfig)


def _docs_of(cls: type) -> dict[str, str]:
    return {f.name: f"{f.metadata['doc']} Default: ``{f.default!r}``." for f in fields(cls) if "doc" in f.metadata}


def _options_docs(options: type[CurvatureOptions]) -> dict[str, str]:
    """A curvature's options documented from its class docstring's ``Attributes:`` entries."""
    lines = textwrap.dedent((options.__doc__ or "").split("Attributes:", 1)[-1]).splitlines()
    out: dict[str, list[str]] = {}
    name = None
    for line in lines:
        head = line.strip().split(":", 1)
        if line and not line.startswith(" ") and len(head) == 2 and head[0] in options.names():
            name = head[0]
            out[name] = [head[1].strip()]
        elif name is not None and line.strip():
            out[name].append(line.strip())
    return {k: " ".join(v) for k, v in out.items()}


def argument_docs(*names: str, curvatures: tuple[type[Curvature], ...] = ()) -> str:
    """Google-style ``Args:`` entries of ``names`` (every axis argument when empty) and of the
    options of ``curvatures``, for the docstrings of the public classes."""
    docs: dict[str, str] = {}
    for cls in AXES:
        docs.update(_docs_of(cls))
    for curv in curvatures:
        for key, text in _options_docs(curv.Options).items():
            docs.setdefault(key, f"{text} ({curv.name})" if key != "scaling" else text)
    chosen = names or tuple(docs)
    return "\n".join(textwrap.fill(f"{n}: {docs[n]}", 96, initial_indent=" " * 8, subsequent_indent=" " * 12)
                     for n in chosen)


@dataclass(frozen=True, kw_only=True)
class PreconditionerConfig:
    """Every setting of the curvature engine, split by axis (see the module docstring)."""

    curvature_class: type[Curvature]
    options: CurvatureOptions
    statistics: StatisticsConfig
    eigen: EigenConfig
    fisher: FisherConfig

    @classmethod
    def from_arguments(cls, curvature: str | type[Curvature], arguments: dict[str, Any]) -> PreconditionerConfig:
        """Split flat keyword ``arguments`` among the axes and the curvature's options."""
        curv = curvature_class(curvature)
        split: dict[type, dict[str, Any]] = {axis: {} for axis in (*AXES, curv.Options)}
        owners = {f.name: axis for axis in (*AXES, curv.Options) for f in fields(axis)}
        for name, value in arguments.items():
            axis = owners.get(name)
            if axis is None:
                known = {f.name for a in AXES for f in fields(a)}
                for other in (c for c in _all_curvatures() if name in c.Options.names()):
                    raise ValueError(f"Invalid {name}={value!r} with curvature={curv.name!r}: {name} is an option of "
                                     f"curvature={other.name!r}")
                raise TypeError(f"Invalid argument {name}={value!r}: not a setting of ekfac_triton "
                                f"(known: {sorted(known | set(curv.Options.names()))})")
            split[axis][name] = value
        return cls(curvature_class=curv, options=curv.Options(**split[curv.Options]),
                   statistics=StatisticsConfig(**split[StatisticsConfig]), eigen=EigenConfig(**split[EigenConfig]),
                   fisher=FisherConfig(**split[FisherConfig]))

    # the settings the step reads most, by their argument names
    curvature = property(lambda self: self.curvature_class.name, doc="the curvature's name")
    scaling = property(lambda self: self.options.scaling, doc="the scaling estimator")
    factor_decay = property(lambda self: self.statistics.factor_decay, doc="StatisticsConfig.factor_decay")
    factor_every = property(lambda self: self.statistics.factor_every, doc="StatisticsConfig.factor_every")
    kl_clip = property(lambda self: self.statistics.kl_clip, doc="StatisticsConfig.kl_clip")
    eigen_every = property(lambda self: self.eigen.eigen_every, doc="EigenConfig.eigen_every")


def _all_curvatures() -> list[type[Curvature]]:
    from .curvature import CURVATURES

    return list(CURVATURES.values())
