"""Layer adapters: one file per layer kind. A new kind is an adapter in its own file plus one
:func:`ekfac_triton.register_adapter` call (or a line in ``ADAPTERS`` for the built-in kinds)."""

from __future__ import annotations

from torch import Tensor, nn

from .base import LayerAdapter, LayerBatch
from .conv1d import QUALIFIED_NAME as CONV1D_NAME
from .conv1d import Conv1DAdapter
from .conv2d import Conv2dAdapter
from .embedding import EmbeddingAdapter
from .fused_qkv import AttentionSpec, FusedQKVAdapter, FusedQKVConv1DAdapter
from .linear import LinearAdapter
from .multihead_attention import MultiheadAttentionAdapter, MultiheadAttentionOutputAdapter

#: module type -> adapter, matched by isinstance (most specific first; ekfac_triton.discovery)
ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
    nn.Embedding: EmbeddingAdapter,
    nn.MultiheadAttention: MultiheadAttentionAdapter,
}

#: module types of optional packages, by qualified name (``f"{cls.__module__}.{cls.__qualname__}"``),
#: matched along the MRO after ``ADAPTERS``: ekfac_triton never imports those packages
ADAPTERS_BY_NAME: dict[str, type[LayerAdapter]] = {
    CONV1D_NAME: Conv1DAdapter,
}


def weight_and_bias(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """The parameters a module's adapter preconditions (an ``nn.MultiheadAttention``: its
    in-projection), whatever its kind; (None, None) for a module with no weight."""
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight, module.in_proj_bias
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (weight if isinstance(weight, Tensor) else None), (bias if isinstance(bias, Tensor) else None)


__all__ = ["ADAPTERS", "ADAPTERS_BY_NAME", "AttentionSpec", "LayerAdapter", "LayerBatch", "LinearAdapter",
           "Conv1DAdapter", "Conv2dAdapter", "EmbeddingAdapter",
           "FusedQKVAdapter", "FusedQKVConv1DAdapter", "MultiheadAttentionAdapter", "MultiheadAttentionOutputAdapter",
           "weight_and_bias"]
