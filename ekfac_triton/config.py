"""Validated settings. Every bad value raises ``ValueError`` naming the argument."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .curvature import CURVATURES, SCALINGS

BACKENDS = ("auto", "triton", "torch")
#: dtypes the statistics (factors) and the eigenbases (with the scalings) may be kept in: they
#: accumulate, so half precision is refused (activations of any dtype are read with fp32
#: accumulation, e.g. bf16 under autocast)
STATE_DTYPES = (torch.float32, torch.float64)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_lr(lr: object) -> None:
    if not _is_number(lr) or lr < 0:
        raise ValueError(f"Invalid lr={lr!r}: must be a finite number >= 0")


def check_damping(damping: object) -> None:
    if not _is_number(damping) or damping <= 0:
        raise ValueError(f"Invalid damping={damping!r}: must be a finite number > 0")


def check_momentum(momentum: object) -> None:
    if not _is_number(momentum) or not 0 <= momentum < 1:
        raise ValueError(f"Invalid momentum={momentum!r}: must be in [0, 1)")


def check_weight_decay(weight_decay: object) -> None:
    if not _is_number(weight_decay) or weight_decay < 0:
        raise ValueError(f"Invalid weight_decay={weight_decay!r}: must be a finite number >= 0")


def check_group(group: dict) -> None:
    """Validate one parameter group's hyperparameters."""
    check_lr(group["lr"])
    check_damping(group["damping"])
    check_momentum(group["momentum"])
    check_weight_decay(group["weight_decay"])


@dataclass(frozen=True, kw_only=True)
class PreconditionerConfig:
    """Settings of the curvature engine shared by all layers (see :class:`~ekfac_triton.EKFAC`)."""

    curvature: str = "ekfac"
    factor_decay: float = 0.95
    factor_every: int = 1
    eigen_every: int = 10
    scaling: str = "per_example"
    backend: str = "auto"
    kl_clip: float | None = None
    effective_damping: bool = False
    stagger: bool = True
    synchronous: bool | None = None
    float64_max_dim: int | None = None
    warm_starts: int = 0
    factor_dtype: torch.dtype | None = None
    basis_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURES:
            raise ValueError(f"Invalid curvature={self.curvature!r}: must be one of {tuple(CURVATURES)}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"Invalid scaling={self.scaling!r}: must be one of {SCALINGS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"Invalid backend={self.backend!r}: must be one of {BACKENDS}")
        if not _is_number(self.factor_decay) or not 0 <= self.factor_decay < 1:
            raise ValueError(f"Invalid factor_decay={self.factor_decay!r}: must be in [0, 1)")
        for name in ("factor_every", "eigen_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Invalid {name}={value!r}: must be an integer >= 1")
        if self.kl_clip is not None and (not _is_number(self.kl_clip) or self.kl_clip <= 0):
            raise ValueError(f"Invalid kl_clip={self.kl_clip!r}: must be None or a number > 0")
        if not isinstance(self.effective_damping, bool):
            raise ValueError(f"Invalid effective_damping={self.effective_damping!r}: must be a bool")
        if not isinstance(self.warm_starts, int) or isinstance(self.warm_starts, bool) or self.warm_starts < 0:
            raise ValueError(f"Invalid warm_starts={self.warm_starts!r}: must be an integer >= 0")
        for name in ("stagger",):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Invalid {name}={getattr(self, name)!r}: must be a bool")
        if self.synchronous is not None and not isinstance(self.synchronous, bool):
            raise ValueError(f"Invalid synchronous={self.synchronous!r}: must be None or a bool")
        if self.float64_max_dim is not None and (not isinstance(self.float64_max_dim, int)
                                                 or isinstance(self.float64_max_dim, bool) or self.float64_max_dim < 0):
            raise ValueError(f"Invalid float64_max_dim={self.float64_max_dim!r}: must be None or an integer >= 0")
        for name in ("factor_dtype", "basis_dtype"):
            value = getattr(self, name)
            if value is not None and value not in STATE_DTYPES:
                raise ValueError(f"Invalid {name}={value!r}: must be None, torch.float32 or torch.float64")
        if self.effective_damping and self.curvature != "tekfac":
            raise ValueError(f"Invalid effective_damping=True with curvature={self.curvature!r}: "
                             "effective damping is TEKFAC's (Gao et al. 2020, Eq. 3.5)")
