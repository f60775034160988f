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
| ``soap`` | ``heavyball.SOAP(model.parameters(), **hparams)``, run eagerly (heavyball's torch.compile off) |
| ``muon`` | ``torch.optim.Muon`` on the 2-D weights, ``torch.optim.AdamW`` (``adamw_lr``, default 1e-3) on the rest |
| ``singd`` | ``singd.optim.optimizer.SINGD(model, **hparams)`` on the ``nn.Linear``/``nn.Conv2d`` layers, ``AdamW`` (``adamw_lr``) on the rest |

The last three are the peers of ``bench.peers`` (``pip install -e ".[peers]"``); a missing one
stops with that install line. :func:`release` removes what an optimizer hooked into the model.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ekfac_triton import EKFAC, MAC

__all__ = ["CURVATURES", "Combined", "KINDS", "LABELS", "PEERS", "describe", "make_optimizer", "release"]

#: The kinds built by :class:`ekfac_triton.EKFAC` with ``curvature=kind``.
CURVATURES = ("kfac", "ekfac", "tekfac")
#: Other libraries' optimizers (the ``peers`` extra).
PEERS = ("soap", "muon", "singd")
KINDS = ("sgd", "adamw", *CURVATURES, "mac", *PEERS)
#: How tables, plots and progress bars name each kind.
LABELS = {"sgd": "SGD", "adamw": "AdamW", "kfac": "K-FAC", "ekfac": "EKFAC", "tekfac": "TEKFAC", "mac": "MAC",
          "soap": "SOAP (heavyball)", "muon": "Muon (torch)", "singd": "SINGD"}
_PEERS_HINT = 'pip install -e ".[peers]"'


class Combined:
    """Several optimizers stepped as one (each over its own parameters): ``zero_grad``, ``step``,
    ``param_groups`` and ``state`` span them all, so the benchmarks' loops treat it as one
    ``torch.optim.Optimizer``.

    Args:
        optimizers: the parts, stepped in this order.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = [o for o in optimizers if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every part's parameter groups, in order."""
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict[Any, Any]:
        """Every part's per-parameter state (the parts own disjoint parameters)."""
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Each part's ``zero_grad``."""
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> None:
        """Each part's ``step`` (a closure is not supported: it would run once per part)."""
        if closure is not None:
            raise ValueError("Invalid closure: Combined.step takes none")
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        """``{"parts": [each part's state_dict]}``."""
        return {"parts": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Each part's state from :meth:`state_dict`'s ``parts``."""
        for o, s in zip(self.optimizers, state["parts"]):
            o.load_state_dict(s)


def _import(module: str, kind: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"Invalid optimizer kind={kind!r}: it needs {module.split('.')[0]} ({_PEERS_HINT}): {e}") from e


def _adamw_rest(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer | None:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None


def _peer(kind: str, model: nn.Module, kwargs: dict[str, Any]) -> Any:
    adamw_lr = kwargs.pop("adamw_lr", 1e-3)
    if kind == "soap":
        heavyball = _import("heavyball", kind)
        # heavyball compiles its kernels with torch.compile(mode="max-autotune") by default: minutes of
        # autotuning on a CPU, and our step runs eagerly too; so its eager path is measured
        _import("heavyball.utils", kind).compile_mode = None
        return heavyball.SOAP(model.parameters(), **{"compile_step": False, **kwargs})
    if kind == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise ImportError(f"Invalid optimizer kind={kind!r}: torch.optim.Muon needs torch >= 2.9 "
                              f"(this is {torch.__version__})")
        matrices = [p for p in model.parameters() if p.requires_grad and p.ndim == 2]
        rest = [p for p in model.parameters() if p.requires_grad and p.ndim != 2]
        return Combined([torch.optim.Muon(matrices, **kwargs), _adamw_rest(rest, adamw_lr)])
    singd = _import("singd.optim.optimizer", kind)
    opt = singd.SINGD(model, warn_unsupported=False, **kwargs)
    covered = {id(p) for g in opt.param_groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in covered]
    return Combined([opt, _adamw_rest(rest, adamw_lr)])


def release(optimizer: Any) -> None:
    """Remove the hooks ``optimizer`` installed on its model (EKFAC's, SINGD's), so that the model
    can be trained by another optimizer next; nothing for the others."""
    for o in getattr(optimizer, "optimizers", [optimizer]):
        if isinstance(o, EKFAC):
            o.remove_hooks()
        for handle in getattr(o, "hook_handles", None) or []:
            handle.remove()

_TORCH = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def make_optimizer(kind: str, model: nn.Module, hparams: Mapping[str, Any] | None = None) -> Any:
    """The optimizer ``kind`` (one of :data:`KINDS`, table in the module docstring) for ``model``,
    constructed with ``hparams`` as keyword arguments (none: the constructor's defaults); a
    ``torch.optim.Optimizer`` or, for ``muon`` and ``singd``, a :class:`Combined` of two."""
    kwargs = dict(hparams or {})
    if kind in _TORCH:
        return _TORCH[kind](model.parameters(), **kwargs)
    if kind in CURVATURES:
        return EKFAC(model, curvature=kind, **kwargs)
    if kind == "mac":
        return MAC(model, **kwargs)
    if kind in PEERS:
        return _peer(kind, model, kwargs)
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
    elif kind in PEERS:
        name = {"soap": "heavyball.SOAP", "muon": "torch.optim.Muon+AdamW", "singd": "singd.SINGD+AdamW"}[kind]
    else:
        name = "MAC"
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
