"""The maths of a layer whose inputs are one-hot vectors (``nn.Embedding``), never forming a
vocabulary-sized matrix.

An embedding with weight E (V x D) is a linear layer ``z = W ā`` with W = Eᵀ (d_out = D,
d_in = V) and ā the one-hot vector of the token (no bias). Its inputs are passed as indices
(N, R), -1 marking a zero input row (padding). Then (K-FAC-expand; ARCHITECTURE.md,
"Weight sharing" and "Embedding"):

* ``A = 1/(N·R) Σ_ns ā āᵀ = diag(token counts) / (N·R)``: kept as its diagonal (a V-vector); its
  eigenbasis is the identity (no eigendecomposition), its eigenvalues the counts.
* EKFAC's ``S[i, v] = 1/N Σ_n (Σ_{s: token_ns = v} (Q_Gᵀ ĝ_ns)_i)²``: the projected output-gradients
  summed per (example, token) pair by a scatter, then squared and scattered into their token's
  column — memory O(N·R·D + V·D), never N·D·V.
* The direction ``Q_G [(Q_Gᵀ ∇W) / (S + λ)]`` (Q_A = I).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import Scalar, ema


@torch.no_grad()
def factor_update(C: Tensor, tokens: Tensor, *, alpha: Scalar, beta: Scalar, weights: Tensor | None = None,
                  finite: Tensor | None = None) -> None:
    """``C <- beta*C + alpha * Σ_ns w_ns e_{token_ns}``: the diagonal of ``Σ w ā āᵀ``.

    Args:
        C: (V,) the diagonal of the input factor.
        tokens: (N, R) token indices, -1 for a zero input row.
        alpha, beta: EMA weights.
        weights: (N, R) row weights (TEKFAC's ‖ĝ‖²) or None.
    """
    valid = tokens >= 0
    w = valid.to(C.dtype) if weights is None else weights.to(C.dtype) * valid
    counts = torch.zeros_like(C).index_add_(0, tokens.clamp_min(0).reshape(-1), w.reshape(-1))
    ema(C, counts, beta, alpha, finite)


@torch.no_grad()
def scaling_update(S: Tensor, g: Tensor, tokens: Tensor, q_out: Tensor, *, alpha: Scalar, beta: Scalar,
                   finite: Tensor | None = None) -> None:
    """``S[i, v] <- beta*S + alpha * Σ_n (Σ_{s: token_ns = v} (Q_outᵀ ĝ_ns)_i)²`` (EKFAC's per-example
    scaling with one-hot inputs, positions summed before squaring).

    Args:
        S: (D, V) scaling.
        g: (N, R, D) output-gradients ĝ (of ℓ_n).
        tokens: (N, R) token indices, -1 for a zero input row.
        q_out: (D, D) output-side basis.
        alpha, beta: EMA weights.
    """
    n, r = tokens.shape
    d, vocab = S.shape
    gq = g.reshape(-1, d).to(S.dtype) @ q_out                       # (N·R, D): Q_outᵀ ĝ per position
    valid = (tokens >= 0).reshape(-1)
    example = torch.arange(n, device=tokens.device).repeat_interleave(r)
    key = (example * vocab + tokens.reshape(-1))[valid]              # one key per (example, token) pair
    pairs, inverse = torch.unique(key, return_inverse=True)
    sums = torch.zeros(pairs.shape[0], d, dtype=S.dtype, device=S.device).index_add_(0, inverse, gq[valid])
    update = torch.zeros(vocab, d, dtype=S.dtype, device=S.device).index_add_(0, pairs % vocab, sums.square())
    ema(S, update.T, beta, alpha, finite)


def precondition(grad: Tensor, q_out: Tensor, scaling: Tensor, damping: Scalar, *,
                 batch_update: tuple[Scalar, Scalar] | None = None, finite: Tensor | None = None) -> Tensor:
    """``Q_out [(Q_outᵀ grad) / (S + λ)]`` (the input basis is the identity); ``batch_update``
    ``(beta, alpha_n)`` first sets ``S <- beta*S + alpha_n*P²`` as the dense one does."""
    projected = q_out.T @ grad
    if batch_update is not None:
        beta, alpha_n = batch_update
        ema(scaling, projected.square(), beta, alpha_n, finite)
    return q_out @ (projected / (scaling + damping))
