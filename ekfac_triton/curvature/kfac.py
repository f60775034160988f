"""K-FAC (Martens & Grosse 2015) in its eigenbasis form: ``F̂ = A ⊗ G``, and
``(A ⊗ G + λI)⁻¹ vec(∇W̄) = vec(Q_G [(Q_Gᵀ ∇W̄ Q_A) / (λ_G λ_Aᵀ + λ)] Q_Aᵀ)``."""

from __future__ import annotations

from .eigenbasis import EigenbasisCurvature


class KFACCurvature(EigenbasisCurvature):
    """A = E[ā āᵀ], G = E[ĝ ĝᵀ]; the scaling is the eigenvalue products, never estimated."""

    name = "kfac"
    estimates_scaling = False
