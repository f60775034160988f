"""``MAC``: the mean-activation-curvature optimizer (Seung, Lee & Ko, ICDM 2025) with the official
defaults, its optional dense first layer and its attention preconditioning. The maths is in :mod:`ekfac_triton.curvature.mac`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .curvature import LayerShape
from .distributed import unwrap_model
from .layers import (AttentionSpec, Conv1DAdapter, FusedQKVAdapter, FusedQKVConv1DAdapter,
                     MultiheadAttentionOutputAdapter)
from .optimizer import EKFAC
from .preconditioner import PreconditionedLayer, Preconditioner

FIRST_LAYER = ("mac", "dense")


class _Captured(Exception):
    """Stops a forward once the first layer's input is captured."""


@torch.no_grad()
def dense_first_layer_inverse(model: nn.Module, layer: PreconditionedLayer, data: Iterable[Any],
                              damping: float, dtype: torch.dtype) -> Tensor:
    """``(C + ρI)⁻¹`` with C the mean over ``data``'s batches of ``X̃ᵀX̃ / rows`` (X̃ the layer's
    input rows with the bias 1 appended), from one pass in which each forward stops at ``layer``.

    ``data`` yields model inputs, or tuples/lists whose first element is the input.
    """
    adapter = layer.adapter
    rows: list[Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        rows.append(adapter.input_rows(args[0].detach()))
        raise _Captured

    handle = adapter.module.register_forward_pre_hook(hook)
    total, batches = None, 0
    try:
        for item in data:
            x = item[0] if isinstance(item, (tuple, list)) else item
            if isinstance(x, Tensor):
                x = x.to(adapter.weight.device)
            rows.clear()
            try:
                model(x)
            except _Captured:
                pass
            if not rows:
                raise ValueError(f"Invalid first_layer_data: a forward of the model never reached layer {layer.name!r}")
            a = rows[0].reshape(-1, rows[0].shape[-1]).to(dtype)
            if adapter.has_bias:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
            c = a.T @ a / a.shape[0]
            total = c if total is None else total.add_(c)
            batches += 1
    finally:
        handle.remove()
    if total is None:
        raise ValueError("Invalid first_layer_data: it yielded no batch")
    total /= batches
    eye = torch.eye(total.shape[0], dtype=total.dtype, device=total.device)
    return torch.linalg.inv(total + damping * eye)


def attention_specs(attention_layers: Mapping[str, Any] | None) -> dict[str, AttentionSpec]:
    """``attention_layers`` as ``{name: AttentionSpec}`` (see :class:`MAC`), validated."""
    if attention_layers is None:
        return {}
    if not isinstance(attention_layers, Mapping):
        raise ValueError(f"Invalid attention_layers={attention_layers!r}: must be None or a dict "
                         "{module name: num_heads | AttentionSpec | {'num_heads': ..., 'causal': ...}}")
    specs = {}
    for name, spec in attention_layers.items():
        try:
            if isinstance(spec, AttentionSpec):
                specs[name] = spec
            elif isinstance(spec, Mapping):
                unknown = set(spec) - {"num_heads", "causal"}
                if unknown or "num_heads" not in spec:
                    raise ValueError(f"Invalid attention_layers[{name!r}]={spec!r}: expected keys 'num_heads' and "
                                     "optionally 'causal'")
                specs[name] = AttentionSpec(**spec)
            else:
                specs[name] = AttentionSpec(num_heads=spec)
        except ValueError as err:
            raise ValueError(f"Invalid attention_layers[{name!r}]: {err}") from None
    return specs


def mark_attention_layers(pre: Preconditioner, model: nn.Module, specs: dict[str, AttentionSpec]) -> None:
    """Turn the named preconditioned ``nn.Linear`` (or transformers ``Conv1D``) layers into fused
    q/k/v attention layers (new
    adapter and attention curvature; the capture on the module stays); check named
    ``nn.MultiheadAttention`` modules against their spec."""
    modules = dict(model.named_modules())
    layers = {layer.name: layer for layer in pre.layers}
    for name, spec in specs.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"Invalid attention_layers: the model has no module named {name!r}")
        if isinstance(module, nn.MultiheadAttention):
            if spec.num_heads != module.num_heads or spec.causal:
                raise ValueError(f"Invalid attention_layers[{name!r}]={spec}: nn.MultiheadAttention {name!r} has "
                                 f"num_heads={module.num_heads}, and its masks come from each call (no 'causal')")
            if name not in layers:
                reason = pre.unsupported.get(name, "it is not among the optimizer's parameters")
                raise ValueError(f"Invalid attention_layers: {name!r} is not preconditioned ({reason})")
            continue
        conv1d = name in layers and type(layers[name].adapter) is Conv1DAdapter
        if type(module) is not nn.Linear and not conv1d:
            raise ValueError(f"Invalid attention_layers: {name!r} is a {type(module).__name__}; a fused q/k/v "
                             "attention layer must be an nn.Linear or a transformers Conv1D (or name an "
                             "nn.MultiheadAttention)")
        if name not in layers:
            reason = (f"its weight is tied to {pre.tied[name]!r}" if name in pre.tied else
                      pre.unsupported.get(name, 'it is not among the optimizer parameters'))
            raise ValueError(f"Invalid attention_layers: nn.Linear {name!r} is not preconditioned ({reason})")
        layer = layers[name]
        try:
            adapter = (FusedQKVConv1DAdapter if conv1d else FusedQKVAdapter)(module, spec)
        except ValueError as err:
            raise ValueError(f"Invalid attention_layers[{name!r}]: {err}") from None
        old = layer.curvature
        shape = LayerShape(d_out=adapter.d_out, d_in=adapter.d_in, bias=adapter.has_bias,
                           value_rows=adapter.value_rows)
        curv = type(old)(shape, old.mean_ema.dtype, old.mean_ema.device)
        curv.backend = old.backend
        layer.adapter, layer.curvature = adapter, curv


class MAC(EKFAC):
    """MAC: :class:`EKFAC`'s engine with ``curvature="mac"`` and the official defaults (CIFAR
    scripts): lr 0.1, ρ = ``damping`` 1.0, statistic decay 0.95, statistics every 5 steps, refresh
    every 50 (``eigen_every`` is MAC's refresh period), momentum 0.9, weight decay 5e-4 coupled.

    Per Linear/Conv2d layer (depthwise convolutions included), with m̂ the bias-corrected EMA of
    the mean input row ``[x; 1]``, the direction is ``D = G − (G m̂) m̂ᵀ / (ρ + ‖m̂‖²)``
    (= ``G · ρ(m̂m̂ᵀ + ρI)⁻¹``, never formed); then momentum SGD on D. Memory per layer: two d_in̄
    vectors. Other parameters get the same momentum SGD on their gradient.

    Args:
        model, lr, damping, momentum, weight_decay, factor_decay, factor_every, eigen_every,
        decoupled_weight_decay: as for :class:`EKFAC` (``decoupled_weight_decay=True`` for the
            official ImageNet/GPT recipes).
        first_layer: ``"mac"`` (default) or ``"dense"``: the first preconditioned layer
            (``preconditioned_modules()[0]``) uses the fixed ``(C + ρI)⁻¹``, C the mean of
            ``x̃x̃ᵀ`` over one pass of ``first_layer_data`` made at construction (forwards stop
            at that layer), never refreshed. Costs a d_in̄ x d_in̄ matrix for that layer.
        first_layer_data: an iterable of inputs or ``(inputs, ...)`` batches (required with
            ``first_layer="dense"``).
        attention_layers: fused q/k/v projections to precondition as attention (ARCHITECTURE.md, "MAC"), as
            ``{module name: spec}`` with spec the number of heads, an :class:`AttentionSpec`
            (``num_heads``, ``causal``) or a dict with those keys; e.g.
            ``{"blocks.0.attn.qkv": 4}`` or ``{"h.0.attn.c_attn": {"num_heads": 12, "causal": True}}``.
            Each named module must be a preconditioned ``nn.Linear`` or transformers ``Conv1D``
            (GPT-2's ``c_attn``) whose output columns are ``[q | k | v]`` (E = d_out / 3 each,
            heads contiguous chunks of E / num_heads), called on (B, T, d) inputs. Its query and
            key rows use R (m̂); its value rows use
            ``R_v = I − v̂v̂ᵀ/(ρ + ‖v̂‖²)``, v̂ the bias-corrected EMA of ``v = X̄ᵀ p̄`` (X̄[j] the
            batch mean of x̃ at token j, p̄[j] the mean over examples, heads and queries of the
            attention probability of key j; causal: keys j <= i only). ``nn.MultiheadAttention``
            modules used as self-attention are preconditioned this way without being named (their
            masks are read from each call; ``out_proj`` gets plain MAC); naming one is allowed with
            its own ``num_heads`` and no ``causal``. Extra cost per attention layer: on statistics
            steps only, one recompute of the B·H·T² attention probabilities from the captured input
            (two for ``nn.MultiheadAttention``: its ``out_proj`` rows are the attention output),
            held at most :data:`ekfac_triton.layers.attention.CHUNK_ELEMENTS` at a time; memory: one
            more d_in̄ vector pair.
        **kwargs: other :class:`EKFAC` arguments (``backend``, ``params``, ...).
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, damping: float = 1.0, momentum: float = 0.9,
                 weight_decay: float = 5e-4, factor_decay: float = 0.95, factor_every: int = 5,
                 eigen_every: int = 50, decoupled_weight_decay: bool = False, first_layer: str = "mac",
                 first_layer_data: Iterable[Any] | None = None,
                 attention_layers: Mapping[str, int | AttentionSpec | Mapping[str, Any]] | None = None,
                 **kwargs: Any) -> None:
        if kwargs.setdefault("curvature", "mac") != "mac":
            raise ValueError(f"Invalid curvature={kwargs['curvature']!r}: MAC is curvature='mac'")
        specs = attention_specs(attention_layers)
        if first_layer not in FIRST_LAYER:
            raise ValueError(f"Invalid first_layer={first_layer!r}: must be one of {FIRST_LAYER}")
        if first_layer == "dense" and first_layer_data is None:
            raise ValueError("Invalid first_layer_data=None: first_layer='dense' needs an iterable of input batches")
        if first_layer == "mac" and first_layer_data is not None:
            raise ValueError("Invalid first_layer_data: only used with first_layer='dense'")
        super().__init__(model, lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
                         factor_decay=factor_decay, factor_every=factor_every, eigen_every=eigen_every,
                         decoupled_weight_decay=decoupled_weight_decay, **kwargs)
        mark_attention_layers(self.preconditioner, unwrap_model(model), specs)
        if first_layer == "dense":
            layer = self.preconditioner.layers[0]
            if layer.curvature.shape.value_rows is not None or isinstance(layer.adapter, MultiheadAttentionOutputAdapter):
                raise ValueError(f"Invalid first_layer='dense': the first preconditioned layer {layer.name!r} is an "
                                 "attention layer")
            curv = layer.curvature
            inverse = dense_first_layer_inverse(model, layer, first_layer_data, damping, curv.mean_ema.dtype)
            curv.set_dense_inverse(inverse)
