"""Which modules of a model are preconditioned, by which layer adapter, and why the others are not.

Adapters are matched by ``isinstance``, the most specific registered type first (so an
``nn.Linear`` subclass gets the Linear adapter unless its own type is registered). Layer kinds of
optional packages (transformers' ``Conv1D``) are matched by the qualified name of a class in the
module's MRO (:data:`~ekfac_triton.layers.ADAPTERS_BY_NAME`), so that ekfac_triton never imports
them.
:func:`register_adapter` adds a layer kind: a :class:`~ekfac_triton.layers.LayerAdapter` subclass
in its own file plus one registration::

    register_adapter(MyLayer, MyLayerAdapter)

:func:`discover` walks the model once and returns the preconditioned layers and a report of
every module with a weight that is left to the plain update, with its reason;
:func:`plain_update_warning` is the one warning issued about them at construction, and
:func:`coverage` the fraction of the trainable elements that are preconditioned.

Tied weights (one tensor used by several modules, e.g. an embedding shared with the output head):
the tensor is preconditioned by one of its users, its *owner* — the first preconditioned user in
model order whose inputs are dense (the output head rather than the embedding), else the first
preconditioned user — from the owner's statistics alone, applied to the whole (summed) gradient.
The other users are reported in ``Discovery.tied``; they are not hooked and are not on the plain
update (ARCHITECTURE.md, "Tied weights", has the rule and the measurement that chose it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from torch import Tensor, nn

from .layers import ADAPTERS, ADAPTERS_BY_NAME, LayerAdapter, MultiheadAttentionAdapter, MultiheadAttentionOutputAdapter
from .layers import weight_and_bias

#: an adapter class, or a factory ``module -> adapter``; optionally with ``unsupported_reason``
AdapterFactory = Callable[[nn.Module], LayerAdapter]


def register_adapter(module_type: type[nn.Module], adapter: type[LayerAdapter]) -> None:
    """Precondition modules of ``module_type`` (and its subclasses) with ``adapter``.

    Args:
        module_type: an ``nn.Module`` subclass.
        adapter: a :class:`~ekfac_triton.layers.LayerAdapter` subclass; a static
            ``unsupported_reason(module, inputs_only)`` may refuse some configurations with a reason.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"Invalid module_type={module_type!r}: must be an nn.Module subclass")
    if not (isinstance(adapter, type) and issubclass(adapter, LayerAdapter)):
        raise ValueError(f"Invalid adapter={adapter!r}: must be a LayerAdapter subclass")
    ADAPTERS[module_type] = adapter


def adapter_for(module: nn.Module, inputs_only: bool = False, parent: nn.Module | None = None,
                ) -> tuple[AdapterFactory | None, str | None]:
    """The adapter (class or factory) for ``module`` and, when the kind is known but this
    configuration is not supported, the reason. ``inputs_only``: the curvature reads only the
    layer inputs (MAC), which some configurations (depthwise convolutions, attention) support
    alone. ``parent``: the module that holds ``module`` (the output projection of an
    ``nn.MultiheadAttention`` is applied by its parent, not called)."""
    if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
        reason = MultiheadAttentionOutputAdapter.unsupported_reason(module, inputs_only)
        reason = reason or MultiheadAttentionAdapter.unsupported_reason(parent, inputs_only)
        return partial(MultiheadAttentionOutputAdapter, attention=parent), reason
    for kind in type(module).__mro__:  # the most specific registered type
        cls = ADAPTERS.get(kind) or ADAPTERS_BY_NAME.get(f"{kind.__module__}.{kind.__qualname__}")
        if cls is not None:
            check = getattr(cls, "unsupported_reason", None)
            return cls, None if check is None else check(module, inputs_only)
    return None, None


@dataclass
class Discovery:
    """The result of :func:`discover`."""

    #: ``(name, adapter)`` of each preconditioned module, in model order
    layers: list[tuple[str, LayerAdapter]] = field(default_factory=list)
    #: known layer kinds in a configuration that is not preconditioned: name -> reason
    unsupported: dict[str, str] = field(default_factory=dict)
    #: every module with a weight left to the plain update: name -> reason (one warning names them all)
    plain: dict[str, str] = field(default_factory=dict)
    #: modules whose weight is tied to a preconditioned module that owns it: name -> the owner's name
    tied: dict[str, str] = field(default_factory=dict)


def discover(model: nn.Module, *, inputs_only: bool, modules: Sequence[nn.Module] | None = None) -> Discovery:
    """The model's preconditioned layers and the report of the others.

    Args:
        model: the model (already unwrapped from DistributedDataParallel).
        inputs_only: the curvature reads only the layer inputs (MAC).
        modules: restrict preconditioning to these submodules (None: every supported one).
    """
    found = Discovery()
    wanted = None if modules is None else {id(m) for m in modules}
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    candidates: list[tuple[str, LayerAdapter]] = []
    # every module holding each weight tensor itself, whatever its kind (tied weights)
    users: dict[int, list[tuple[str, Tensor | None]]] = {}
    for name, module in model.named_modules():
        label = name or type(module).__name__
        weight, bias = weight_and_bias(module)
        has_weight = isinstance(weight, Tensor)
        if has_weight and _own_weight(module):
            users.setdefault(id(weight), []).append((label, bias))
        if wanted is not None and id(module) not in wanted:
            if has_weight:
                found.plain[label] = "its parameters are not in this optimizer's parameter groups"
            continue
        cls, reason = adapter_for(module, inputs_only=inputs_only, parent=parents.get(id(module)))
        if cls is None:
            if has_weight and _own_weight(module):
                found.plain[label] = f"no layer adapter for {type(module).__name__} (see register_adapter)"
            continue
        if reason is not None:
            found.unsupported[label] = reason
            continue
        adapter = cls(module)
        if not adapter.weight.requires_grad:
            found.unsupported[label] = "the weight is frozen (requires_grad=False)"
            continue
        candidates.append((label, adapter))
    found.plain.update(found.unsupported)
    # Tied weights: one owner per tensor (module docstring); two directions for one tensor would
    # overwrite each other, so the other users get no layer of their own.
    owner: dict[int, str] = {}
    for name, adapter in sorted(candidates, key=lambda c: c[1].one_hot_inputs):  # stable: model order kept
        owner.setdefault(id(adapter.weight), name)
    for name, adapter in candidates:
        if owner[id(adapter.weight)] == name:
            found.layers.append((name, adapter))
    for key, names in users.items():
        if key in owner:
            for name, bias in names:
                if name != owner[key]:
                    found.tied[name] = owner[key]
                    found.plain.pop(name, None)
                    found.unsupported.pop(name, None)
                    if bias is not None and bias.requires_grad:  # the weight is covered, the bias is not
                        found.plain[name] = (f"its weight is tied to {owner[key]!r}, which preconditions it; its "
                                             "bias gets the plain update")
    return found


def plain_update_warning(found: Discovery) -> str | None:
    """The one warning about the modules with a weight left to the plain update, each named with
    its reason (None when there are none)."""
    if not found.plain:
        return None
    by_reason: dict[str, list[str]] = {}
    for name, reason in found.plain.items():
        by_reason.setdefault(reason, []).append(repr(name))
    listed = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())
    return (f"ekfac_triton: {len(found.plain)} module(s) with a weight are not preconditioned and get the plain "
            f"update: {listed}")


@dataclass(frozen=True)
class Coverage:
    """How much of a model's trainable parameters the preconditioner covers.

    Attributes:
        preconditioned: trainable elements that get curvature-preconditioned directions (a
            tied weight counted once, as preconditioned by its owner).
        trainable: all trainable elements (``requires_grad`` parameters, each tensor once).
        plain: names of the trainable parameters on the plain update.
    """

    preconditioned: int
    trainable: int
    plain: tuple[str, ...]

    @property
    def fraction(self) -> float:
        """``preconditioned / trainable`` (1.0 with no trainable element)."""
        return self.preconditioned / self.trainable if self.trainable else 1.0


def coverage(named_parameters: Sequence[tuple[str, Tensor]], layers: Sequence[LayerAdapter]) -> Coverage:
    """The :class:`Coverage` of ``layers`` over ``named_parameters`` (the trainable ones count;
    a tensor listed under several names counts once).

    Args:
        named_parameters: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
        layers: the preconditioned layers' adapters.
    """
    covered = {id(p) for adapter in layers for p in adapter.params}
    seen: set[int] = set()
    preconditioned = trainable = 0
    plain = []
    for name, p in named_parameters:
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        trainable += p.numel()
        if id(p) in covered:
            preconditioned += p.numel()
        else:
            plain.append(name)
    return Coverage(preconditioned, trainable, tuple(plain))


def _own_weight(module: nn.Module) -> bool:
    """Whether ``module`` holds its weight itself (not only through a child)."""
    return "weight" in module._parameters or "in_proj_weight" in module._parameters
