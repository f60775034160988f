"""Kernel family 1: Kronecker factor accumulation ``C <- beta*C + alpha * X̄ᵀ diag(w) X̄``.

X̄ is X with an implicit trailing column of ones when ``bias=True`` (the layer's bias input,
DESIGN §1), never concatenated in memory. ``X`` is (N, d) or (B, T, d) with any strides; its
leading dimensions are rows. ``weights`` (optional, same leading shape as X) weights each row:
TEKFAC's trace-weighted factors (Gao et al. 2020) are ``Σ ‖ĝ‖² ā āᵀ``.

This file holds the pure-torch reference, which is both the CPU implementation and the test
oracle of the Triton kernel that the kernels issue adds beside it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["factor_update_reference", "check_factor_update_args"]


def check_factor_update_args(C: Tensor, X: Tensor, bias: bool, weights: Tensor | None) -> None:
    """Raise a clear error when the arguments of a factor update do not fit together."""
    if X.dim() not in (2, 3):
        raise ValueError(f"X must be (N, d) or (B, T, d), got shape {tuple(X.shape)}")
    d = X.shape[-1] + int(bias)
    if C.shape != (d, d):
        raise ValueError(f"C must be ({d}, {d}) for X of shape {tuple(X.shape)} and bias={bias}, "
                         f"got {tuple(C.shape)}")
    if not C.dtype.is_floating_point or C.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"C must be float32 or float64 (it accumulates), got {C.dtype}")
    if weights is not None and weights.shape != X.shape[:-1]:
        raise ValueError(f"weights must have shape {tuple(X.shape[:-1])}, got {tuple(weights.shape)}")


@torch.no_grad()
def factor_update_reference(C: Tensor, X: Tensor, *, alpha: float, beta: float, bias: bool,
                            weights: Tensor | None = None) -> Tensor:
    """In place ``C <- beta*C + alpha * X̄ᵀ diag(weights) X̄``; returns C.

    Accumulates in C's dtype. With ``beta == 0`` the old contents of C are ignored (even NaN),
    as an EMA's first update must.
    """
    check_factor_update_args(C, X, bias, weights)
    x = X.reshape(-1, X.shape[-1]).to(C.dtype)
    w = None if weights is None else weights.reshape(-1, 1).to(C.dtype)
    xw = x if w is None else x * w
    d = x.shape[1]
    update = torch.empty_like(C)
    update[:d, :d] = xw.T @ x
    if bias:
        # Blocks of X̄ᵀX̄ that involve the implicit column of ones: Σ w x, and Σ w.
        col = xw.sum(0)
        update[:d, d] = col
        update[d, :d] = col
        update[d, d] = x.shape[0] if w is None else w.sum()
    if beta == 0.0:
        C.copy_(update.mul_(alpha))
    else:
        C.mul_(beta).add_(update, alpha=alpha)
    return C
