"""A user-marked fused q/k/v projection ``nn.Linear`` (``qkv = Linear(d, 3E)`` as in timm's ViT),
or transformers' ``Conv1D`` (GPT-2's ``c_attn``, the same projection with its weight stored
transposed), for MAC's attention preconditioning (ARCHITECTURE.md, "MAC").

Convention: the output columns are ``[q | k | v]``, each E = d_out / 3 wide, and within each the
heads are contiguous chunks of E / num_heads columns (``qkv.reshape(B, T, 3, H, E/H)``). The layer
is called on (B, T, d) token sequences. On statistics steps the attention probabilities
``softmax(q kᵀ / √d_h)`` (causal mask when marked causal) are recomputed from the captured input
and the current weight and bias: one B·H·T² recompute (chunked, see
:mod:`ekfac_triton.layers.attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attention
from .base import LayerBatch
from .conv1d import Conv1DAdapter
from .linear import LinearAdapter


@dataclass(frozen=True)
class AttentionSpec:
    """How a fused q/k/v ``nn.Linear`` attends.

    Args:
        num_heads: number of heads H (an integer >= 1 dividing E = d_out / 3).
        causal: whether query i attends only to keys j <= i (a GPT-style block).
    """

    num_heads: int
    causal: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.num_heads, int) or isinstance(self.num_heads, bool) or self.num_heads < 1:
            raise ValueError(f"Invalid num_heads={self.num_heads!r}: must be an integer >= 1")
        if not isinstance(self.causal, bool):
            raise ValueError(f"Invalid causal={self.causal!r}: must be a bool")


class FusedQKVAdapter(LinearAdapter):
    """A fused q/k/v ``nn.Linear``: rows ā as for any Linear, plus the mean attention
    distribution over the tokens (``LayerBatch.token_weights``) on statistics steps. The value
    rows of the weight are ``[2E, 3E)`` (MAC's R_v)."""

    def __init__(self, module: nn.Module, spec: AttentionSpec) -> None:
        super().__init__(module)
        d_out = self.d_out
        if d_out % 3:
            raise ValueError(f"out_features={d_out} is not divisible by 3 "
                             "(a fused q/k/v projection has columns [q | k | v])")
        embed = d_out // 3
        if embed % spec.num_heads:
            raise ValueError(f"Invalid num_heads={spec.num_heads}: does not divide E = out_features / 3 = {embed}")
        self.spec = spec
        self.embed = embed
        self.value_rows = (2 * embed, 3 * embed)

    def input_rows(self, inputs: Tensor) -> Tensor:
        return super().batch(inputs, None).a

    def batch(self, inputs: Tensor, grad_output: Tensor | None, record: Any = None) -> LayerBatch:
        if inputs.dim() != 3:
            raise ValueError(f"fused q/k/v attention layer: expected (batch, tokens, features) inputs, "
                             f"got shape {tuple(inputs.shape)}")
        rows = super().batch(inputs, grad_output)
        # Statistics precision (float64 models stay float64), from the weight the forward used.
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        bias = self.module.bias
        qkv = F.linear(inputs.to(dtype), self.dense_weight().to(dtype), None if bias is None else bias.to(dtype))
        heads = self.spec.num_heads
        q = attention.split_heads(qkv[..., : self.embed], heads)
        k = attention.split_heads(qkv[..., self.embed: 2 * self.embed], heads)
        t = inputs.shape[1]
        mask = attention.causal_mask(t, t, dtype, inputs.device) if self.spec.causal else None
        return LayerBatch(a=rows.a, g=rows.g, token_weights=attention.mean_attention(q, k, mask))

    def describe(self) -> str:
        return f"{self.module!r} as fused q/k/v attention ({self.spec})"


class FusedQKVConv1DAdapter(FusedQKVAdapter, Conv1DAdapter):
    """A fused q/k/v transformers ``Conv1D`` (GPT-2's ``c_attn``, output columns ``[q | k | v]``):
    :class:`FusedQKVAdapter` with :class:`~ekfac_triton.layers.conv1d.Conv1DAdapter`'s transposed
    weight (its gradient matrix ``[∇Wᵀ | ∇b]`` and layout)."""
