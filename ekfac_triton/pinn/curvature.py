"""K-FAC for PINNs: per-layer Kronecker factors and the inverse of a sum of two Kronecker products.

Notation: for one Linear layer with combined weight ``W̄ = [W | b]`` (d_out × d_in̄),
ā_{n,s} its position inputs and ĝ_{n,s} = ∂r_n/∂z_{n,s} its position output-gradients (of the
residual, weight 1). The exact per-point Jacobian is ``J_n = Σ_s ĝ_{n,s} āᵀ_{n,s}`` (as a
row-major ``vec``: ``Σ_s ĝ ⊗ ā``), the gradient of ``1/(2N) Σ r_n²`` is ``1/N Σ_n r_n J_n`` and
the Gauss-Newton block is ``1/N Σ_n vec(J_n) vec(J_n)ᵀ ≈ B ⊗ A`` (``torch.kron`` order) with

* expand (default): ``A = 1/(N S) Σ_{n,s} ā āᵀ``, ``B = 1/N Σ_{n,s} ĝ ĝᵀ``;
* reduce:           ``A = 1/N Σ_n ā̄ ā̄ᵀ`` (ā̄ the mean over s), ``B = 1/N Σ_n (Σ_s ĝ)(Σ_s ĝ)ᵀ``;
* boundary: ordinary K-FAC, the S = 1 case of both.

Per layer the curvature is ``(B_Ω + λI) ⊗ (A_Ω + λI) + (B_∂ + λI) ⊗ (A_∂ + λI)``, inverted exactly
(Martens & Grosse 2015, appendix) by diagonalising each pair jointly: with ``Uᵀ A₁ U = I``,
``Uᵀ A₂ U = diag(d)`` and ``Vᵀ B₁ V = I``, ``Vᵀ B₂ V = diag(e)`` (generalised symmetric eigenproblems,
each solved by two symmetric eigendecompositions), the solution of ``B₁ X A₁ + B₂ X A₂ = R`` is
``X = V [(Vᵀ R U) / (1 + e dᵀ)] Uᵀ``. The maths in full: ARCHITECTURE.md, "K-FAC for PINNs".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..eigen import symmetric_eigh

APPROXIMATIONS = ("expand", "reduce")


@dataclass(frozen=True)
class LayerSample:
    """One layer's ā (N, S, d_in̄) and ĝ (N, S, d_out) on one batch of points."""

    inputs: Tensor
    grads: Tensor

    @property
    def num_points(self) -> int:
        return self.inputs.shape[0]


# -- factors -------------------------------------------------------------------------------------
def interior_factors(sample: LayerSample, approx: str = "expand") -> tuple[Tensor, Tensor]:
    """(A, B) of the interior term, K-FAC-expand or K-FAC-reduce."""
    a, g = sample.inputs, sample.grads
    n, s = a.shape[:2]
    if approx == "expand":
        a2, g2 = a.reshape(n * s, -1), g.reshape(n * s, -1)
        return a2.T @ a2 / (n * s), g2.T @ g2 / n
    if approx == "reduce":
        a_mean, g_sum = a.mean(1), g.sum(1)
        return a_mean.T @ a_mean / n, g_sum.T @ g_sum / n
    raise ValueError(f"Invalid approx={approx!r}: must be one of {APPROXIMATIONS}")


def boundary_factors(sample: LayerSample) -> tuple[Tensor, Tensor]:
    """(A, B) of the boundary term: ordinary K-FAC (one position per point)."""
    return interior_factors(sample, "expand")


# -- exact products with the layer Jacobians -------------------------------------------------------
def layer_gradient(sample: LayerSample, residual: Tensor) -> Tensor:
    """``1/N Σ_n r_n J_n`` (d_out × d_in̄): the gradient of ``1/(2N) Σ r_n²`` w.r.t. [W | b]."""
    n = sample.num_points
    weighted = sample.grads * (residual / n).reshape(n, 1, 1)
    return torch.einsum("nso,nsi->oi", weighted, sample.inputs)


def jacobian_vector_product(sample: LayerSample, v: Tensor) -> Tensor:
    """``J_n · v`` for every point n (N,): ``Σ_s ĝ_{n,s}ᵀ V ā_{n,s}`` for a (d_out × d_in̄) V."""
    return ((sample.inputs @ v.T) * sample.grads).sum((1, 2))


def vector_jacobian_product(sample: LayerSample, u: Tensor) -> Tensor:
    """``Σ_n u_n J_n`` (d_out × d_in̄)."""
    return torch.einsum("nso,nsi->oi", sample.grads * u.reshape(-1, 1, 1), sample.inputs)


def gauss_newton_vector_product(samples: list[LayerSample], vectors: list[Tensor]) -> list[Tensor]:
    """``G v = 1/N Jᵀ(J v)`` of one loss term, over all layers (``v`` one matrix per layer)."""
    jv = sum(jacobian_vector_product(s, v) for s, v in zip(samples, vectors))
    n = samples[0].num_points
    return [vector_jacobian_product(s, jv / n) for s in samples]


# -- the inverse of a sum of two Kronecker products -------------------------------------------------
def joint_diagonalization(first: Tensor, second: Tensor, compute_dtype: torch.dtype | None = None
                          ) -> tuple[tuple[Tensor, Tensor] | None, str | None]:
    """``(U, d)`` with ``Uᵀ first U = I`` and ``Uᵀ second U = diag(d)`` for symmetric positive
    definite ``first`` and symmetric ``second`` (the generalised eigenproblem ``second u = d first u``),
    via ``first = Q diag(λ) Qᵀ``, ``C = Λ^{-1/2} Qᵀ second Q Λ^{-1/2} = P diag(d) Pᵀ``,
    ``U = Q Λ^{-1/2} P``. Uses :func:`~ekfac_triton.eigen.symmetric_eigh` and its failure policy;
    eigenvalues of ``first`` below its rounding level ``n·ε·‖first‖`` (tiny damping on a large
    factor) are floored there; returns None (and a note) when a decomposition failed or ``first``
    is clearly indefinite (an eigenvalue below ``−√ε·‖first‖``)."""
    e1, note1 = symmetric_eigh(first, compute_dtype)
    if e1 is None:
        return None, note1
    top = float(e1.values.abs().max())
    if not float(e1.values.min()) > -math.sqrt(torch.finfo(e1.values.dtype).eps) * top or top == 0:
        return None, f"the first matrix is not positive definite (smallest eigenvalue {float(e1.values.min()):.3e})"
    # eigenvalues below the decomposition's rounding level (n·ε·‖first‖) are noise: floor them there
    values = e1.values.clamp_min(first.shape[0] * torch.finfo(e1.values.dtype).eps * top)
    scaled = e1.vectors * values.rsqrt()
    c = scaled.T @ second @ scaled
    e2, note2 = symmetric_eigh((c + c.T) / 2, compute_dtype)
    if e2 is None:
        return None, note2
    notes = [n for n in (note1, note2) if n]
    return (scaled @ e2.vectors, e2.values), "; ".join(notes) or None


@dataclass(frozen=True)
class KroneckerSumInverse:
    """``(B₁ ⊗ A₁ + B₂ ⊗ A₂)⁻¹`` from the joint diagonalisations of (A₁, A₂) and (B₁, B₂)."""

    u: Tensor   # Uᵀ A₁ U = I, Uᵀ A₂ U = diag(d)   (input side, d_in̄ × d_in̄)
    d: Tensor
    v: Tensor   # Vᵀ B₁ V = I, Vᵀ B₂ V = diag(e)   (output side, d_out × d_out)
    e: Tensor

    @classmethod
    def from_factors(cls, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor,
                     compute_dtype: torch.dtype | None = None) -> tuple[KroneckerSumInverse | None, str | None]:
        """The inverse of ``B₁ ⊗ A₁ + B₂ ⊗ A₂`` (A₁, B₁ positive definite; A₂, B₂ positive
        semi-definite), or None and a note when a decomposition failed."""
        side_a, note_a = joint_diagonalization(a1, a2, compute_dtype)
        side_b, note_b = joint_diagonalization(b1, b2, compute_dtype)
        notes = "; ".join(f"{side}: {n}" for side, n in (("input side", note_a), ("output side", note_b)) if n)
        if side_a is None or side_b is None:
            return None, notes
        dtype = a1.dtype
        return cls(side_a[0].to(dtype), side_a[1].to(dtype), side_b[0].to(dtype), side_b[1].to(dtype)), notes or None

    def apply(self, r: Tensor) -> Tensor:
        """X with ``B₁ X A₁ + B₂ X A₂ = R`` (R and X are d_out × d_in̄)."""
        y = (self.v.T @ r @ self.u) / (1 + torch.outer(self.e, self.d))
        return self.v @ y @ self.u.T

    def dense(self) -> Tensor:
        """The inverse as a dense (d_out·d_in̄)² matrix (for tests)."""
        scale = 1 / (1 + torch.outer(self.e, self.d)).flatten()
        k = torch.kron(self.v, self.u)
        return (k * scale) @ k.T


def damped(factor: Tensor, damping: float) -> Tensor:
    return factor + damping * torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
