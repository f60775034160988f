"""The benchmarks' one optimizer factory: ``make_optimizer(kind, model, hparams)``.

A benchmark keeps its own settings next to it, as the constructor's keyword arguments
(``bench.experiments.HPARAMS`` for ``bench.train`` and ``bench.demo``, the configurations of
``bench.step_time``, ``bench.compile_step`` and ``bench.mac_attention``); this module only maps
the kind of optimizer to its constructor:

| kind | optimizer |
|---|---|
| ``sgd`` | ``torch.optim.SGD(model.parameters(), **hparams)`` |
| ``adamw`` | ``torch.optim.AdamW(model.parameters(), **hparams)`` |
| ``ekfac``, ``kfac``, ``tekfac`` | ``EKFAC(model, curvature=kind, **hparams)`` |
| ``mac`` | ``MAC(model, **hparams)``: the preset, whose official defaults fill what ``hparams`` leaves out |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ekfac_triton import EKFAC, MAC

__all__ = ["CURVATURES", "KINDS", "LABELS", "describe", "make_optimizer"]

#: The kinds built by :class:`ekfac_triton.EKFAC` with ``curvature=kind``.
CURVATURES = ("kfac", "ekfac", "tekfac")
KINDS = ("sgd", "adamw", *CURVATURES, "mac")
#: How tables, plots and progress bars name each kind.
LABELS = {"sgd": "SGD", "adamw": "AdamW", "kfac": "K-FAC", "ekfac": "EKFAC", "tekfac": "TEKFAC", "mac": "MAC"}

_TORCH = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def make_optimizer(kind: str, model: nn.Module, hparams: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """The optimizer ``kind`` (one of :data:`KINDS`, table in the module docstring) for ``model``,
    constructed with ``hparams`` as keyword arguments (none: the constructor's defaults)."""
    kwargs = dict(hparams or {})
    if kind in _TORCH:
        return _TORCH[kind](model.parameters(), **kwargs)
    if kind in CURVATURES:
        return EKFAC(model, curvature=kind, **kwargs)
    if kind == "mac":
        return MAC(model, **kwargs)
    raise ValueError(f"Invalid optimizer kind={kind!r}: must be one of {KINDS}")


def describe(kind: str, hparams: Mapping[str, Any] | None = None) -> str:
    """The constructor call :func:`make_optimizer` makes, as text: ``EKFAC(curvature='kfac', lr=0.01)``."""
    if kind not in KINDS:
        raise ValueError(f"Invalid optimizer kind={kind!r}: must be one of {KINDS}")
    kwargs = dict(hparams or {})
    if kind in _TORCH:
        name = f"torch.optim.{_TORCH[kind].__name__}"
    elif kind in CURVATURES:
        name, kwargs = "EKFAC", {"curvature": kind, **kwargs}
    else:
        name = "MAC"
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
