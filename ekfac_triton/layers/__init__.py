"""Layer adapters: one file per layer kind. Add a kind by adding a file and a line below."""

from __future__ import annotations

from functools import partial
from typing import Callable

from torch import Tensor, nn

from .base import LayerAdapter, LayerBatch
from .conv2d import Conv2dAdapter
from .embedding import EmbeddingAdapter
from .fused_qkv import AttentionSpec, FusedQKVAdapter
from .linear import LinearAdapter
from .multihead_attention import MultiheadAttentionAdapter, MultiheadAttentionOutputAdapter

ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
    nn.Embedding: EmbeddingAdapter,
    nn.MultiheadAttention: MultiheadAttentionAdapter,
}


def adapter_for(module: nn.Module, inputs_only: bool = False, parent: nn.Module | None = None,
                ) -> tuple[Callable[[nn.Module], LayerAdapter] | None, str | None]:
    """The adapter class (or factory) for ``module`` (exact type match) and, when the kind is
    known but this configuration is not supported, the reason. ``inputs_only``: the curvature
    reads only the layer inputs (MAC), which some configurations (depthwise convolutions,
    attention) support alone. ``parent``: the module that holds ``module``, if any (the output
    projection of an ``nn.MultiheadAttention`` is applied by its parent, not called)."""
    if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
        reason = MultiheadAttentionOutputAdapter.unsupported_reason(module, inputs_only)
        reason = reason or MultiheadAttentionAdapter.unsupported_reason(parent, inputs_only)
        return partial(MultiheadAttentionOutputAdapter, attention=parent), reason
    cls = ADAPTERS.get(type(module))
    if cls is None:
        return None, None
    return cls, cls.unsupported_reason(module, inputs_only)


def weight_and_bias(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """The parameters a module's adapter preconditions (an ``nn.MultiheadAttention``: its
    in-projection), whatever its kind; (None, None) for a module with no weight."""
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight, module.in_proj_bias
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (weight if isinstance(weight, Tensor) else None), (bias if isinstance(bias, Tensor) else None)


__all__ = ["ADAPTERS", "AttentionSpec", "LayerAdapter", "LayerBatch", "LinearAdapter", "Conv2dAdapter", "EmbeddingAdapter",
           "FusedQKVAdapter", "MultiheadAttentionAdapter", "MultiheadAttentionOutputAdapter", "adapter_for",
           "weight_and_bias"]
