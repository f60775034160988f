"""``nn.MultiheadAttention`` used as self-attention (query is key is value), for MAC
(ARCHITECTURE.md, "MAC").

Two adapters share the module's calls:

* :class:`MultiheadAttentionAdapter`: the raw ``in_proj_weight`` (3E, E) and ``in_proj_bias``;
  rows ā are the tokens of the input x, and on statistics steps the mean attention distribution
  p̄ over the tokens is recomputed from x, the current in-projection and the call's masks. Its
  value rows ``[2E, 3E)`` get MAC's R_v.
* :class:`MultiheadAttentionOutputAdapter`: ``out_proj`` (an ``nn.Linear`` subclass that the
  attention op applies with ``F.linear``, so its own hooks never fire). Its rows are the attention
  output ``concat_h(P_h V_h)``, recomputed from x on statistics steps. With ``dropout > 0`` the
  recomputation has no dropout: its mean row is the expectation of the dropped one over the
  dropout masks (inverted dropout), which is what MAC's statistic estimates.

Only curvatures that read the inputs alone (MAC) precondition them. The call's ``attn_mask``
(bool or float; (T, S) or (N·H, T, S)), ``key_padding_mask`` (bool or float) and ``is_causal``
(then the causal triangle, which MHA itself applies) are honoured; a call with a different key or
value (cross-attention) is refused at the next statistics step. Recorded on the eager path only
(the compiled capture does not carry the call's keyword arguments).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attention
from .base import LayerAdapter, LayerBatch
from .linear import LinearAdapter

_FORWARD = inspect.signature(nn.MultiheadAttention.forward)


@dataclass(frozen=True)
class AttentionCall:
    """What one call of the module said beyond its input: whether it was self-attention, and its
    masks (detached)."""

    self_attention: bool
    attn_mask: Tensor | None
    key_padding_mask: Tensor | None
    is_causal: bool


def read_call(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[Tensor, AttentionCall]:
    """The query (the captured input) and the call's :class:`AttentionCall`, however the
    arguments were passed."""
    bound = _FORWARD.bind(module, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments

    def detached(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach()

    query = a["query"]
    call = AttentionCall(self_attention=a["key"] is query and a["value"] is query,
                         attn_mask=detached(a["attn_mask"]), key_padding_mask=detached(a["key_padding_mask"]),
                         is_causal=bool(a["is_causal"]))
    return query, call


def unsupported_reason(module: nn.MultiheadAttention, inputs_only: bool) -> str | None:
    if not inputs_only:
        return "nn.MultiheadAttention's in_proj is preconditioned only by curvature='mac'"
    if module.in_proj_weight is None:
        return "kdim/vdim differ from embed_dim (separate q/k/v projection weights)"
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv / add_zero_attn (extra key/value tokens that are not rows of the input)"
    return None


class _SelfAttention:
    """The recomputation shared by both adapters."""

    attention: nn.MultiheadAttention

    example_dims = 2  # an unbatched call is one (T, E) sequence

    def num_examples(self, input_shape: torch.Size) -> int:
        if len(input_shape) == 2:
            return 1
        return input_shape[0] if self.attention.batch_first else input_shape[1]

    def read_call(self, args: tuple, kwargs: dict) -> tuple[Tensor, AttentionCall]:
        return read_call(self.attention, args, kwargs)

    @property
    def hooked_module(self) -> nn.Module:
        return self.attention

    def tokens(self, inputs: Tensor) -> Tensor:
        """The input as (N, T, E)."""
        if inputs.dim() == 2:
            return inputs[None]
        return inputs if self.attention.batch_first else inputs.transpose(0, 1)

    def grad_tokens(self, grad_output: Tensor | None, n: int) -> Tensor | None:
        """The output-gradient as (N, T, E) per-example gradients (N times the mean loss's)."""
        if grad_output is None:
            return None
        return self.tokens(grad_output) * n

    def projections(self, x: Tensor, call: AttentionCall | None, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """Per-head q, k, v (N, H, T, d_h) and the additive mask (broadcastable to (N, H, T, T))."""
        m = self.attention
        if call is None:
            raise RuntimeError("ekfac_triton: the call of nn.MultiheadAttention was not recorded (under torch.compile "
                               "its keyword arguments are not captured: run it eagerly with curvature='mac')")
        if not call.self_attention:
            raise ValueError("ekfac_triton: nn.MultiheadAttention was called with a key or value other than its query "
                             "(cross-attention); MAC preconditions it only as self-attention (query is key is value)")
        heads = m.num_heads
        bias = None if m.in_proj_bias is None else m.in_proj_bias.to(dtype)
        qkv = F.linear(x.to(dtype), m.in_proj_weight.to(dtype), bias)
        q, k, v = (attention.split_heads(z, heads) for z in qkv.chunk(3, dim=-1))
        n, t = x.shape[:2]
        mask = None
        if call.is_causal:
            mask = attention.causal_mask(t, t, dtype, x.device)
        elif call.attn_mask is not None:
            mask = attention.additive(call.attn_mask, dtype)
            if mask.dim() == 3:  # (N·H, T, S)
                mask = mask.reshape(n, heads, t, t)
        if call.key_padding_mask is not None:
            kpm = attention.additive(call.key_padding_mask, dtype).reshape(n, 1, 1, t)
            mask = kpm if mask is None else mask + kpm
        return q, k, v, mask


def _stats_dtype(weight: Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


class MultiheadAttentionAdapter(_SelfAttention, LayerAdapter):
    """``nn.MultiheadAttention``'s in-projection (``in_proj_weight``, ``in_proj_bias``)."""

    module: nn.MultiheadAttention

    def __init__(self, module: nn.MultiheadAttention) -> None:
        self.module = self.attention = module
        self.weight = module.in_proj_weight
        bias = module.in_proj_bias
        self.bias = bias if bias is not None and bias.requires_grad else None
        e = module.embed_dim
        self.value_rows = (2 * e, 3 * e)

    @staticmethod
    def unsupported_reason(module: nn.Module, inputs_only: bool = False) -> str | None:
        return unsupported_reason(module, inputs_only)

    def input_rows(self, inputs: Tensor) -> Tensor:
        return self.tokens(inputs)

    def batch(self, inputs: Tensor, grad_output: Tensor | None, record: Any = None) -> LayerBatch:
        x = self.tokens(inputs)
        if grad_output is not None:
            raise ValueError("nn.MultiheadAttention's in-projection has no per-token output-gradient here "
                             "(only curvatures that read the inputs alone precondition it)")
        q, k, _, mask = self.projections(x, record, _stats_dtype(self.weight))
        return LayerBatch(a=x, g=None, token_weights=attention.mean_attention(q, k, mask))

    def output_rows(self, grad_output: Tensor, n: int) -> Tensor:
        # Only MAC (inputs alone) preconditions the in-projection, and MAC has no Fisher type.
        raise ValueError("nn.MultiheadAttention's in-projection has no per-token output-gradient here "
                         "(only curvatures that read the inputs alone precondition it)")

    def describe(self) -> str:
        m = self.module
        return f"in_proj of MultiheadAttention(embed_dim={m.embed_dim}, num_heads={m.num_heads}) (MAC attention)"


class MultiheadAttentionOutputAdapter(_SelfAttention, LinearAdapter):
    """``out_proj`` of an ``nn.MultiheadAttention``, with rows recomputed from the module's input."""

    def __init__(self, module: nn.Linear, attention: nn.MultiheadAttention) -> None:
        super().__init__(module)
        self.attention = attention

    @staticmethod
    def unsupported_reason(module: nn.Module, inputs_only: bool = False) -> str | None:
        if not inputs_only:
            return ("out_proj of nn.MultiheadAttention (applied inside the attention op, so its input is "
                    "not captured) is preconditioned only by curvature='mac'")
        return None

    def batch(self, inputs: Tensor, grad_output: Tensor | None, record: Any = None) -> LayerBatch:
        x = self.tokens(inputs)
        q, k, v, mask = self.projections(x, record, _stats_dtype(self.weight))
        return LayerBatch(a=attention.attention_output(q, k, v, mask), g=self.grad_tokens(grad_output, x.shape[0]))

    def describe(self) -> str:
        m = self.attention
        return f"out_proj of MultiheadAttention(embed_dim={m.embed_dim}, num_heads={m.num_heads})"
