"""Eigendecomposition of a symmetric factor with a documented failure policy.

Precision policy: a factor of dimension n is decomposed in float64 when n <= ``float64_max_dim``
(on the H100 float64 eigh measured faster than float32 up to n = 512, about as fast at 1024:
ARCHITECTURE.md, "Measured facts"), else in its own dtype; a float64 factor is never decomposed
in lower precision.

Failure policy: ``torch.linalg.eigh`` in that dtype; if it raises or returns
non-finite values, retry once in float64 with a small diagonal jitter (a multiple of the identity
moves the eigenvalues, not the eigenvectors; the jitter is subtracted again); if that fails too,
the caller keeps its previous basis. The caller warns once per layer. (ARCHITECTURE.md,
"Eigendecomposition engine".)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Relative size of the float64 retry's jitter, times the mean diagonal of the factor.
RETRY_JITTER = 1e-10


@dataclass(frozen=True)
class Eigh:
    """Eigenvalues (ascending) and orthonormal eigenvectors (columns) of a symmetric matrix."""

    values: Tensor
    vectors: Tensor


def _finite(e: Eigh) -> bool:
    return bool(torch.isfinite(e.values).all() and torch.isfinite(e.vectors).all())


def eigh_dtype(n: int, dtype: torch.dtype, float64_max_dim: int) -> torch.dtype:
    """The dtype in which a factor of dimension ``n`` and dtype ``dtype`` is decomposed."""
    return torch.float64 if dtype == torch.float64 or n <= float64_max_dim else dtype


def symmetric_eigh(matrix: Tensor, compute_dtype: torch.dtype | None = None) -> tuple[Eigh | None, str | None]:
    """Eigendecompose ``matrix`` (in ``compute_dtype``, default its own) under the policy above.

    Returns ``(result, note)``: the result in ``matrix``'s dtype, or None when both attempts
    failed; ``note`` says what went wrong (None when the first attempt succeeded).
    """
    note = None
    if not torch.isfinite(matrix).all():
        return None, "the factor is not finite"
    try:
        values, vectors = torch.linalg.eigh(matrix.to(compute_dtype or matrix.dtype))
        result = Eigh(values.to(matrix.dtype), vectors.to(matrix.dtype))
        if _finite(result):
            return result, None
        note = "eigh returned non-finite values"
    except RuntimeError as err:  # torch.linalg.LinAlgError is a RuntimeError
        note = f"eigh failed ({err})"
    m64 = matrix.to(torch.float64)
    scale = m64.diagonal().abs().mean().clamp_min(1.0)
    jitter = RETRY_JITTER * float(scale)
    try:
        values, vectors = torch.linalg.eigh(m64 + jitter * torch.eye(m64.shape[0], dtype=m64.dtype, device=m64.device))
        result = Eigh((values - jitter).to(matrix.dtype), vectors.to(matrix.dtype))
        if _finite(result):
            return result, f"{note}; recovered by a float64 retry"
        return None, f"{note}; the float64 retry returned non-finite values"
    except RuntimeError as err:
        return None, f"{note}; the float64 retry failed too ({err})"


def subspace_iteration(matrix: Tensor, previous: Tensor, compute_dtype: torch.dtype | None = None
                       ) -> tuple[Eigh | None, str | None]:
    """A cheap refresh of an eigenbasis from the previous one: one step of orthogonal (subspace)
    iteration, as SOAP refreshes its bases (Vyas et al. 2024, Alg. 4).

    The previous columns are ordered by descending Rayleigh quotient (so that the QR keeps the
    dominant directions first), ``Q <- qr(C Q)``, and the Rayleigh quotients ``diag(QᵀCQ)`` are
    the eigenvalue estimates. Costs two products with C and one QR instead of an eigh; converges to the
    eigenbasis when repeated on a fixed C. Falls back to :func:`symmetric_eigh` if the QR fails.
    """
    if not torch.isfinite(matrix).all():
        return None, "the factor is not finite"
    dtype = compute_dtype or matrix.dtype
    c, q = matrix.to(dtype), previous.to(dtype)
    try:
        cq = c @ q
        # Reordering the columns of Q reorders those of CQ: one product serves both.
        cq = cq[:, torch.argsort((q * cq).sum(0), descending=True)]
        q, _ = torch.linalg.qr(cq)
        result = Eigh((q * (c @ q)).sum(0).to(matrix.dtype), q.to(matrix.dtype))
        if _finite(result):
            return result, None
        note = "subspace iteration returned non-finite values"
    except RuntimeError as err:
        note = f"subspace iteration failed ({err})"
    result, note_eigh = symmetric_eigh(matrix, compute_dtype)
    return result, f"{note}; full eigh instead" + (f" ({note_eigh})" if note_eigh else "")
