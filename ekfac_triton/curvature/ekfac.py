"""EKFAC (George et al. 2018): K-FAC's eigenbasis, with the eigenvalue products replaced by the
exact diagonal of the Fisher in that basis, ``S = E_n[(Q_Gᵀ ĝ_n)² (Q_Aᵀ ā_n)²ᵀ]`` (their Eq. 9-10;
positions summed before squaring under weight sharing)."""

from __future__ import annotations

from .eigenbasis import EigenbasisCurvature


class EKFACCurvature(EigenbasisCurvature):
    """Factors as K-FAC; the scaling S estimated per example, per position or from the batch."""

    name = "ekfac"
