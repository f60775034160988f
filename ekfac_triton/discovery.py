"""Which modules of a model are preconditioned, by which layer adapter, and why the others are not.

Adapters are matched by ``isinstance``, the most specific registered type first (so an
``nn.Linear`` subclass gets the Linear adapter unless its own type is registered).
:func:`register_adapter` adds a layer kind: a :class:`~ekfac_triton.layers.LayerAdapter` subclass
in its own file plus one registration::

    register_adapter(MyLayer, MyLayerAdapter)

:func:`discover` walks the model once and returns the preconditioned layers and a report of
every module with a weight that is left to the plain update, with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from torch import Tensor, nn

from .layers import ADAPTERS, LayerAdapter, MultiheadAttentionAdapter, MultiheadAttentionOutputAdapter
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
        cls = ADAPTERS.get(kind)
        if cls is not None:
            check = getattr(cls, "unsupported_reason", None)
            return cls, None if check is None else check(module, inputs_only)
    return None, None


@dataclass
class Discovery:
    """The result of :func:`discover`."""

    #: ``(name, adapter)`` of each preconditioned module, in model order
    layers: list[tuple[str, LayerAdapter]] = field(default_factory=list)
    #: known layer kinds in a configuration that is not preconditioned: name -> reason (warned)
    unsupported: dict[str, str] = field(default_factory=dict)
    #: every module with a weight left to the plain update: name -> reason
    plain: dict[str, str] = field(default_factory=dict)


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
    for name, module in model.named_modules():
        label = name or type(module).__name__
        has_weight = isinstance(weight_and_bias(module)[0], Tensor)
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
    # Tied weights (an embedding shared with the output head): the gradient sums both uses,
    # which per-layer statistics do not model, and two directions for one tensor would
    # silently overwrite each other. Both modules get the plain update.
    users: dict[int, list[str]] = {}
    for name, adapter in candidates:
        users.setdefault(id(adapter.weight), []).append(name)
    for name, adapter in candidates:
        shared = [other for other in users[id(adapter.weight)] if other != name]
        if shared:
            found.unsupported[name] = (f"its weight is shared with {shared} (tied weights are not modelled: the "
                                       "gradient sums both uses)")
    found.layers = [(name, adapter) for name, adapter in candidates if name not in found.unsupported]
    found.plain.update(found.unsupported)
    return found


def _own_weight(module: nn.Module) -> bool:
    """Whether ``module`` holds its weight itself (not only through a child)."""
    return "weight" in module._parameters or "in_proj_weight" in module._parameters
