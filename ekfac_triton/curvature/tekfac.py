"""TEKFAC (Gao et al. 2020, on TKFAC): EKFAC's correction in the eigenbasis of the
trace-weighted factors ``Φ ∝ E[‖ĝ‖² ā āᵀ]`` and ``Ψ ∝ E[‖ā‖² ĝ ĝᵀ]`` (TKFAC's ``F ≈ δ Φ ⊗ Ψ``,
δ = tr F). Only the eigenvectors matter, so Φ and Ψ are kept unnormalised (tr Φ = tr Ψ = δ for a
single position); their EMA weights each batch by its Fisher trace. The scaling Θ is EKFAC's S in
this basis. Optional effective damping (Gao et al. 2020, Eq. 3.5): ``λ_l = max(mean(Θ_l), λ)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layers import LayerBatch
from .base import EigenbasisCurvature, LayerShape


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


class TEKFACCurvature(EigenbasisCurvature):
    """Trace-weighted factors, EKFAC's scaling in their basis."""

    name = "tekfac"

    def __init__(self, shape: LayerShape, dtype: torch.dtype, device: torch.device, scaling: str = "per_example",
                 effective_damping: bool = False):
        super().__init__(shape, dtype, device, scaling)
        self.effective_damping = effective_damping

    def _factor_weights(self, batch: LayerBatch) -> tuple[Tensor, Tensor]:
        return trace_weights(batch.a, batch.g, self.in_factor.dtype, self.shape.bias, self.shape.one_hot,
                             batch.draws)

    def damping_for(self, damping: float) -> float | Tensor:
        if not self.effective_damping:
            return damping
        return self.scaling.mean().clamp_min(damping)
