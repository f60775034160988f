"""Kernel family 2: projection of gradients into the Kronecker-factored eigenbasis.

For one layer with gradient matrix ``Ḡ = [∇W | ∇b]`` (d_out x d_in̄), output-side basis Q_out
(Q_G, or Q_Ψ for TEKFAC) and input-side basis Q_in (Q_A, or Q_Φ):

* ``precondition``: ``Q_out [ (Q_outᵀ Ḡ Q_in) / (S + λ) ] Q_inᵀ`` (George et al. 2018, Alg. 1;
  with S = λ_G λ_Aᵀ it is K-FAC's eigenbasis form, Martens & Grosse 2015 §6.3). In ``batch``
  scaling mode S is first updated from the projected gradient itself:
  ``S <- beta*S + alpha * n * P²``.
* ``per-example scaling``: ``S <- beta*S + alpha * Σ_n (Σ_s (Q_outᵀ ĝ_ns)(Q_inᵀ ā_ns)ᵀ)²``
  (EKFAC's exact diagonal, with positions s summed before squaring, K-FAC-expand). With one
  position per example it is the product form ``(Ĝ Q_out)²ᵀ (Ā Q_in)²`` and no per-example
  d_out x d_in tensor exists; with several positions the per-example projections are formed in
  chunks whose size is bounded by ``max_chunk_elements``, never for the whole batch at once.

Pure-torch references: the CPU implementation and the oracle of the Triton kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "precondition_reference",
    "per_example_scaling_reference",
    "MAX_CHUNK_ELEMENTS",
]

# Upper bound on the elements of the per-example projections held at once (weight sharing).
MAX_CHUNK_ELEMENTS = 1 << 24


def _augment(a: Tensor, bias: bool) -> Tensor:
    """Append the bias input (a column of ones) to the last dimension."""
    if not bias:
        return a
    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)


@torch.no_grad()
def precondition_reference(grad: Tensor, q_out: Tensor, q_in: Tensor, scaling: Tensor,
                           damping: float | Tensor, *, batch_update: tuple[float, float, int] | None = None
                           ) -> Tensor:
    """Return ``Q_out [(Q_outᵀ grad Q_in) / (S + damping)] Q_inᵀ``.

    Args:
        grad: gradient matrix (d_out, d_in̄), in the bases' dtype.
        q_out: (d_out, d_out) orthogonal basis of the output side.
        q_in: (d_in̄, d_in̄) orthogonal basis of the input side.
        scaling: S, (d_out, d_in̄); updated in place when ``batch_update`` is given.
        damping: λ, a float or a 0-dim tensor (no host sync needed).
        batch_update: ``(beta, alpha, n)``: first set ``S <- beta*S + alpha*n*P²`` (EKFAC's
            ``batch`` scaling estimator), then divide by the updated S.
    """
    if grad.shape != (q_out.shape[0], q_in.shape[0]) or scaling.shape != grad.shape:
        raise ValueError(f"shape mismatch: grad {tuple(grad.shape)}, q_out {tuple(q_out.shape)}, "
                         f"q_in {tuple(q_in.shape)}, scaling {tuple(scaling.shape)}")
    projected = q_out.T @ grad @ q_in
    if batch_update is not None:
        beta, alpha, n = batch_update
        update = projected.square().mul_(alpha * n)
        if beta == 0.0:
            scaling.copy_(update)
        else:
            scaling.mul_(beta).add_(update)
    projected.div_(scaling + damping)
    return q_out @ projected @ q_in.T


@torch.no_grad()
def per_example_scaling_reference(S: Tensor, g: Tensor, a: Tensor, q_out: Tensor, q_in: Tensor, *,
                                  alpha: float, beta: float, bias: bool,
                                  max_chunk_elements: int = MAX_CHUNK_ELEMENTS) -> Tensor:
    """In place ``S <- beta*S + alpha * Σ_n (Σ_s (Q_outᵀ ĝ_ns)(Q_inᵀ ā_ns)ᵀ)²``; returns S.

    Args:
        S: (d_out, d_in̄) scaling, float32/float64.
        g: (N, R, d_out) per-example output gradients ĝ (of ℓ_n, not of the mean loss).
        a: (N, R, d_in) layer inputs, without the bias column.
        q_out, q_in: the bases; alpha, beta: EMA weights; bias: append the implicit ones column.
        max_chunk_elements: bound on N_chunk * d_out * d_in̄ when R > 1.
    """
    if g.dim() != 3 or a.dim() != 3 or g.shape[:2] != a.shape[:2]:
        raise ValueError(f"g and a must be (N, R, d) with equal N, R: got {tuple(g.shape)}, {tuple(a.shape)}")
    n, r = g.shape[:2]
    if S.shape != (q_out.shape[0], q_in.shape[0]) or S.shape != (g.shape[2], a.shape[2] + int(bias)):
        raise ValueError(f"S {tuple(S.shape)} does not fit g {tuple(g.shape)}, a {tuple(a.shape)}, bias={bias}")
    dtype = S.dtype
    gq = g.to(dtype) @ q_out                       # (N, R, d_out): Q_outᵀ ĝ per position
    aq = _augment(a.to(dtype), bias) @ q_in        # (N, R, d_in̄): Q_inᵀ ā per position
    if r == 1:
        update = gq[:, 0].square().T @ aq[:, 0].square()
    else:
        update = torch.zeros_like(S)
        chunk = max(1, max_chunk_elements // (S.numel()))
        for start in range(0, n, chunk):
            per_example = gq[start:start + chunk].transpose(1, 2) @ aq[start:start + chunk]
            update += per_example.square_().sum(0)
    if beta == 0.0:
        S.copy_(update.mul_(alpha))
    else:
        S.mul_(beta).add_(update, alpha=alpha)
    return S
