"""TEKFAC (Gao et al. 2020, on TKFAC): EKFAC's correction in the eigenbasis of the
trace-weighted factors ``Φ ∝ E[‖ĝ‖² ā āᵀ]`` and ``Ψ ∝ E[‖ā‖² ĝ ĝᵀ]`` (TKFAC's ``F ≈ δ Φ ⊗ Ψ``,
δ = tr F). Only the eigenvectors matter, so Φ and Ψ are kept unnormalised (tr Φ = tr Ψ = δ for a
single position); their EMA weights each batch by its Fisher trace. The scaling Θ is EKFAC's S in
this basis. Optional effective damping (Gao et al. 2020, Eq. 3.5): ``λ_l = max(mean(Θ_l), λ)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import CurvatureOptions, check_bool
from .eigenbasis import EigenbasisCurvature


def trace_weights(a: Tensor, g: Tensor, dtype: torch.dtype, bias: bool, one_hot: bool = False,
                  draws: int = 1) -> tuple[Tensor, Tensor]:
    """Row weights ``(‖ĝ_ns‖², ‖ā_ns‖²)`` of Φ and Ψ (the bias input 1 included in ‖ā‖²).

    One-hot inputs (token indices, -1 a zero row): ‖ā‖² is 1, or 0 at padding. With M ``draws``
    of the output-gradients per example (``g`` is (M·N, R, d_out), draw-major; the (draw,
    example) pairs are the examples) ā_ns is weighted by the mean of its draws' ‖ĝ‖², and every
    draw's ĝ by its example's ‖ā‖².
    """
    a_sq = (a >= 0).to(dtype) if one_hot else a.to(dtype).square().sum(-1) + float(bias)
    g_sq = g.to(dtype).square().sum(-1)
    if draws == 1:
        return g_sq, a_sq
    return g_sq.reshape(draws, *a_sq.shape).mean(0), a_sq.repeat(draws, 1)


@dataclass(frozen=True, kw_only=True)
class TEKFACOptions(CurvatureOptions):
    """TEKFAC's options.

    Attributes:
        effective_damping: damp each layer with ``max(mean(Θ_l), λ)``, its mean Fisher eigenvalue
            floored at λ (Gao et al. 2020, Eq. 3.5), instead of the fixed λ.
    """

    effective_damping: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("effective_damping", self.effective_damping)


class TEKFACCurvature(EigenbasisCurvature):
    """Trace-weighted factors, EKFAC's scaling in their basis."""

    name = "tekfac"
    Options = TEKFACOptions
    row_weights = staticmethod(trace_weights)

    @property
    def effective_damping(self) -> bool:
        return self.options.effective_damping
