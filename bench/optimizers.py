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
| ``muon`` | :class:`MuonWithAdamW`: ``torch.optim.Muon`` (torch >= 2.9) on the hidden weight matrices, ``torch.optim.AdamW`` on the rest (:func:`muon_matrices`) |
| ``soap`` | ``heavyball.SOAP(model.parameters(), **hparams)``, run eagerly (heavyball's torch.compile off) |
| ``singd`` | ``singd.optim.optimizer.SINGD(model, **hparams)`` on the ``nn.Linear``/``nn.Conv2d`` layers, ``AdamW`` (``adamw_lr``) on the rest |

``soap`` and ``singd`` are peers of ``bench.peers`` (``pip install -e ".[peers]"``); a missing one
stops with that install line. :func:`release` removes what an optimizer hooked into the model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ekfac_triton import EKFAC, MAC

__all__ = ["CURVATURES", "Combined", "KINDS", "LABELS", "MuonWithAdamW", "PEERS", "describe", "make_optimizer",
           "muon_matrices", "release"]

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
    if kind == "muon":
        return MuonWithAdamW(model, **kwargs)
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
    elif kind == "muon":
        name = "MuonWithAdamW"
    elif kind in PEERS:
        name = {"soap": "heavyball.SOAP", "singd": "singd.SINGD+AdamW"}[kind]
    else:
        name = "MAC"
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def muon_matrices(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The model's trainable parameters split into (hidden weight matrices, the rest): the 2-D
    parameters of every module except embeddings (``nn.Embedding``) and the output head, which
    Muon is not meant for (Jordan et al. 2024; Liu et al. 2025, "Muon is scalable for LLM
    training"), against everything else (those, norms, biases).

    The head is ``model.get_output_embeddings()`` (the transformers API; a tied head shares the
    token embedding's weight, which goes to the rest once). A model without that method (the
    benchmarks' own MLPs, convnets and blocks) declares no head: every 2-D weight but the
    embeddings' goes to Muon, as the step-time tables measure it.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    excluded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) or m is head
                for p in m.parameters(recurse=False)}
    matrices, rest, seen = [], [], set()
    for p in model.parameters():                  # deduplicated: a tied weight appears once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (matrices if p.ndim == 2 and id(p) not in excluded else rest).append(p)
    return matrices, rest


class MuonWithAdamW(Combined):
    """``torch.optim.Muon`` on the hidden weight matrices and ``torch.optim.AdamW`` on every other
    parameter (:func:`muon_matrices`), stepped together: Muon accepts only 2-D parameters, and
    this pairing is how it is used in practice.

    Args:
        model: the model (with ``get_output_embeddings()``, see :func:`muon_matrices`).
        lr: Muon's learning rate.
        momentum: Muon's momentum.
        nesterov: Muon's Nesterov momentum.
        weight_decay: Muon's decoupled weight decay.
        adjust_lr_fn: Muon's per-matrix learning-rate scaling. Default ``"match_rms_adamw"``
            (0.2·sqrt(max(rows, cols)), Liu et al. 2025): it is symmetric in the two dimensions, so
            a weight stored transposed (transformers' ``Conv1D``, ``(in, out)``) is scaled as its
            ``nn.Linear`` twin, and updates have AdamW's RMS, so an AdamW-sized lr suits both.
            ``"original"`` or None: torch's default, sqrt(max(1, rows/cols)).
        adamw: keyword arguments of the ``torch.optim.AdamW`` over the other parameters (default
            ``lr`` and ``weight_decay`` as Muon's).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, adjust_lr_fn: str | None = "match_rms_adamw",
                 adamw: Mapping[str, Any] | None = None) -> None:
        muon_class = getattr(torch.optim, "Muon", None)
        if muon_class is None:
            raise ValueError(f"kind='muon' needs torch.optim.Muon (torch >= 2.9); this torch is {torch.__version__}")
        matrices, rest = muon_matrices(model)
        if not matrices:
            raise ValueError(f"Invalid model={type(model).__name__} for kind='muon': no hidden 2-D weight matrices")
        self.muon = muon_class(matrices, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                               adjust_lr_fn=adjust_lr_fn)
        # no AdamW part when every parameter is a hidden matrix (torch refuses an empty group)
        self.adamw = (torch.optim.AdamW(rest, **{"lr": lr, "weight_decay": weight_decay, **dict(adamw or {})})
                      if rest else None)
        super().__init__([self.muon, self.adamw])

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of both; ``closure`` (if given) is evaluated once, with gradients enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.optimizers:
            part.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Both optimizers' state dicts, as ``{"muon": ..., "adamw": ...}``."""
        return {"muon": self.muon.state_dict(), "adamw": None if self.adamw is None else self.adamw.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        missing = {"muon", "adamw"} - set(state_dict)
        if missing:
            raise ValueError(f"Invalid state_dict: missing {sorted(missing)} (expected MuonWithAdamW.state_dict())")
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])
