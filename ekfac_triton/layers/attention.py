"""Attention recomputed from a layer's captured input, for MAC's attention statistics (Seung, Lee
& Ko, ICDM 2025; ARCHITECTURE.md, "MAC"): the mean attention distribution over the keys,

    p̄[j] = mean over examples n, heads h and queries i of softmax_j(q_i · k_j / √d_h + mask_ij),

and (for ``nn.MultiheadAttention``'s output projection, whose input is internal to the attention
op) the attention output ``concat_h(P_h V_h)``. Masked entries have probability 0, so p̄ sums to 1.

Cost: one (n, H, T, S) probability tensor per call, built over chunks of the batch so that at most
:data:`CHUNK_ELEMENTS` probabilities exist at once. The engine calls these on statistics steps only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: probabilities held at once: the batch is split into chunks of at most this many n·H·T·S elements
CHUNK_ELEMENTS = 1 << 24


def attention_probabilities(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """``softmax_j(q_i · k_j / √d_h + mask_ij)`` for (n, H, T, d_h) queries, (n, H, S, d_h) keys and
    an additive mask broadcastable to (n, H, T, S) (−inf where attention is not allowed)."""
    scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1)


def _chunks(q: Tensor, k: Tensor, mask: Tensor | None):
    """(rows, q, k, mask) over chunks of the batch, each at most CHUNK_ELEMENTS probabilities."""
    n, heads, t, _ = q.shape
    size = max(1, CHUNK_ELEMENTS // max(1, heads * t * k.shape[2]))
    for start in range(0, n, size):
        rows = slice(start, min(n, start + size))
        per_example = mask is not None and mask.dim() == 4 and mask.shape[0] > 1
        m = mask[rows] if per_example else mask
        yield rows, q[rows], k[rows], m


def mean_attention(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """p̄, the (S,) mean of the attention probabilities over examples, heads and queries."""
    n, heads, t, _ = q.shape
    total = q.new_zeros(k.shape[2])
    for _, qc, kc, mc in _chunks(q, k, mask):
        total += attention_probabilities(qc, kc, mc).sum(dim=(0, 1, 2))
    return total / (n * heads * t)


def attention_output(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """``concat_h(P_h V_h)``, the (n, T, H·d_h) attention output before any output projection."""
    n, heads, t, d_h = q.shape
    out = q.new_empty(n, t, heads * d_h)
    for rows, qc, kc, mc in _chunks(q, k, mask):
        out[rows] = (attention_probabilities(qc, kc, mc) @ v[rows]).transpose(1, 2).reshape(-1, t, heads * d_h)
    return out


def split_heads(z: Tensor, heads: int) -> Tensor:
    """(n, T, H·d_h) -> (n, H, T, d_h), heads as contiguous column chunks."""
    n, t, e = z.shape
    return z.reshape(n, t, heads, e // heads).transpose(1, 2)


def causal_mask(t: int, s: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The (T, S) additive mask of causal attention: −inf above the diagonal (key j > query i)."""
    allowed = torch.ones(t, s, dtype=torch.bool, device=device).tril()
    return additive(~allowed, dtype)


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask as an additive float tensor: a bool mask's True (not allowed) becomes −inf, as in
    ``nn.MultiheadAttention``; a float mask is added as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)
    return mask.to(dtype)
