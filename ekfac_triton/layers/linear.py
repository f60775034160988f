"""``nn.Linear`` on inputs of any leading shape: (N, d), (B, T, d), ... The first dimension is
the example, every further leading dimension a shared position (K-FAC-expand)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import LayerAdapter, LayerBatch


class LinearAdapter(LayerAdapter):
    """Adapter for ``nn.Linear``."""

    module: nn.Linear

    compiles = True
    example_dims = 1

    @staticmethod
    def unsupported_reason(module: nn.Module, inputs_only: bool = False) -> str | None:
        return None

    def dense_weight(self) -> Tensor:
        """The (d_out, d_in) weight matrix the layer applies (``module.weight``)."""
        return self.weight

    def batch(self, inputs: Tensor, grad_output: Tensor | None, record: Any = None) -> LayerBatch:
        if inputs.dim() == 1:  # an unbatched call is one example
            inputs = inputs[None]
            grad_output = None if grad_output is None else grad_output[None]
        n = inputs.shape[0]
        a = inputs.reshape(n, -1, inputs.shape[-1])
        g = None if grad_output is None else self.output_rows(grad_output, n)
        return LayerBatch(a=a, g=g)

    def output_rows(self, grad_output: Tensor, n: int) -> Tensor:
        return grad_output.reshape(n, -1, grad_output.shape[-1]) * n
