"""Layer adapters: one file per layer kind. Add a kind by adding a file and a line below."""

from __future__ import annotations

from torch import nn

from .base import LayerAdapter, LayerBatch
from .conv2d import Conv2dAdapter
from .embedding import EmbeddingAdapter
from .linear import LinearAdapter

ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
    nn.Embedding: EmbeddingAdapter,
}


def adapter_for(module: nn.Module, inputs_only: bool = False) -> tuple[type[LayerAdapter] | None, str | None]:
    """The adapter class for ``module`` (exact type match) and, when the kind is known but this
    configuration is not supported, the reason. ``inputs_only``: the curvature reads only the
    layer inputs (MAC), which some configurations (depthwise convolutions) support alone."""
    cls = ADAPTERS.get(type(module))
    if cls is None:
        return None, None
    return cls, cls.unsupported_reason(module, inputs_only)


__all__ = ["ADAPTERS", "LayerAdapter", "LayerBatch", "LinearAdapter", "Conv2dAdapter", "EmbeddingAdapter", "adapter_for"]
