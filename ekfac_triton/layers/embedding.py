"""``nn.Embedding`` as a linear layer with one-hot inputs: weight E (V x D) is ``W = Eᵀ`` with
d_out = D, d_in = V and no bias; its gradient matrix is ``∇Eᵀ`` (D, V). Inputs are kept as token
indices (never one-hot vectors); the curvature's one-hot mode (:mod:`ekfac_triton.curvature.one_hot`)
does the maths. Every position of every example is a position sharing the weight (K-FAC-expand).

``padding_idx``: PyTorch gives that row no gradient; its positions are treated as zero inputs
(they count in no token's input statistic, so that column of the direction is 0; their
output-gradients still enter G, as a Linear layer's zero input rows would). ``max_norm``
(in-place renormalisation in the forward) and ``sparse=True`` are not preconditioned: the module
is reported and gets the plain update (``sparse=True`` gradients are then refused by the step).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import LayerAdapter, LayerBatch, MatrixLayout


class EmbeddingAdapter(LayerAdapter):
    """Adapter for ``nn.Embedding``: one-hot inputs given as indices (``LayerBatch.a`` is (N, R)
    integer tokens, -1 at padding positions)."""

    module: nn.Embedding

    #: a call's input is (N, ...) indices: the first dimension is the example
    example_dims = 0
    one_hot_inputs = True

    @staticmethod
    def unsupported_reason(module: nn.Module, inputs_only: bool = False) -> str | None:
        if inputs_only:
            return "an embedding (curvatures that read only the inputs, such as MAC, leave embeddings unpreconditioned)"
        if module.sparse:
            return ("sparse=True (sparse gradients are not preconditioned, and EKFAC.step refuses them: "
                    "leave its parameters out of params=)")
        if module.max_norm is not None:
            return f"max_norm={module.max_norm} (the forward renormalises rows in place)"
        if module.scale_grad_by_freq:
            return ("scale_grad_by_freq=True (the gradient is rescaled per token by its batch frequency, "
                    "which the Fisher of the loss does not model)")
        return None

    @property
    def d_out(self) -> int:
        return self.weight.shape[1]

    @property
    def d_in(self) -> int:
        return self.weight.shape[0]

    def batch(self, inputs: Tensor, grad_output: Tensor | None, record: Any = None) -> LayerBatch:
        if inputs.dim() == 0:  # one token: one example
            inputs = inputs[None]
            grad_output = None if grad_output is None else grad_output[None]
        n = inputs.shape[0]
        tokens = inputs.reshape(n, -1)
        if self.module.padding_idx is not None:
            tokens = tokens.masked_fill(tokens == self.module.padding_idx, -1)
        g = None if grad_output is None else self.output_rows(grad_output, n)
        return LayerBatch(a=tokens, g=g)

    def output_rows(self, grad_output: Tensor, n: int) -> Tensor:
        return grad_output.reshape(n, -1, grad_output.shape[-1]) * n

    def grad_matrix(self) -> Tensor:
        """``∇Eᵀ`` (D, V), a view."""
        return self.weight.grad.T

    @property
    def layout(self) -> MatrixLayout:
        return MatrixLayout(self.weight.shape, self.d_in, transposed=True)
