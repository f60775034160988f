"""transformers' ``Conv1D`` (GPT-2's projections): a linear layer whose weight is stored
transposed, ``(d_in, d_out)``, computing ``y = x @ W + b`` on inputs of any leading shape.

As a linear layer its weight matrix is ``W_lin = Wᵀ`` (d_out x d_in), so the maths is that of
``nn.Linear`` (ARCHITECTURE.md, "Layer adapters"): the same rows ā and ĝ, the gradient matrix
``[∇Wᵀ | ∇b]`` and a transposed :class:`~ekfac_triton.layers.base.MatrixLayout` to write the
direction back. A model with ``Conv1D`` layers and the same model with ``nn.Linear`` layers holding
the transposed weights take identical steps.

ekfac_triton never imports transformers: the class is recognised by its qualified name
(:data:`ekfac_triton.layers.ADAPTERS_BY_NAME`), and ``register_adapter(Conv1D, Conv1DAdapter)``
works as for any other kind.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import MatrixLayout
from .linear import LinearAdapter

#: the qualified name under which discovery recognises the class (its MRO is searched)
QUALIFIED_NAME = "transformers.pytorch_utils.Conv1D"


class Conv1DAdapter(LinearAdapter):
    """Adapter for transformers' ``Conv1D``: ``nn.Linear`` with the weight stored ``(d_in, d_out)``."""

    module: nn.Module

    @property
    def d_out(self) -> int:
        return self.weight.shape[1]

    @property
    def d_in(self) -> int:
        return self.weight.shape[0]

    def dense_weight(self) -> Tensor:
        """The (d_out, d_in) weight of the equivalent ``nn.Linear``: a view of ``Wᵀ``."""
        return self.weight.T

    def grad_matrix(self) -> Tensor:
        """``[∇Wᵀ | ∇b]`` (d_out, d_in̄): a view without a bias, else a copy."""
        gw = self.weight.grad.T
        if self.bias is None:
            return gw
        gb = self.bias.grad if self.bias.grad is not None else torch.zeros_like(self.bias)
        return torch.cat([gw, gb.reshape(-1, 1)], dim=1)

    @property
    def layout(self) -> MatrixLayout:
        return MatrixLayout(self.weight.shape, self.d_in, transposed=True)
