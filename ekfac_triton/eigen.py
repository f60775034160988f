"""Eigendecomposition of a symmetric factor with a documented failure policy.

Policy (DESIGN §2): ``torch.linalg.eigh`` in the factor's dtype; if it raises or returns
non-finite values, retry once in float64 with a small diagonal jitter (a multiple of the identity
moves the eigenvalues, not the eigenvectors; the jitter is subtracted again); if that fails too,
the caller keeps its previous basis. The caller warns once per layer.
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


def symmetric_eigh(matrix: Tensor) -> tuple[Eigh | None, str | None]:
    """Eigendecompose ``matrix`` under the policy above.

    Returns ``(result, None)`` on success (the result in ``matrix``'s dtype; ``note`` is set when
    the float64 retry was needed) or ``(None, reason)`` when both attempts failed.
    """
    note = None
    if not torch.isfinite(matrix).all():
        return None, "the factor is not finite"
    try:
        values, vectors = torch.linalg.eigh(matrix)
        result = Eigh(values, vectors)
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
