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


class TEKFACCurvature(EigenbasisCurvature):
    """Trace-weighted factors, EKFAC's scaling in their basis."""

    name = "tekfac"

    def __init__(self, shape: LayerShape, dtype: torch.dtype, device: torch.device, scaling: str = "per_example",
                 effective_damping: bool = False):
        super().__init__(shape, dtype, device, scaling)
        self.effective_damping = effective_damping

    def _factor_weights(self, batch: LayerBatch) -> tuple[Tensor, Tensor]:
        dtype = self.in_factor.dtype
        if self.shape.one_hot:  # ‖ā_ns‖² of a one-hot row: 1, or 0 at padding
            a_sq = (batch.a >= 0).to(dtype)
        else:
            a_sq = batch.a.to(dtype).square().sum(-1) + float(self.shape.bias)  # ‖ā_ns‖², the bias 1 included
        g_sq = batch.g.to(dtype).square().sum(-1)                           # ‖ĝ_jns‖², (M·N, R)
        m = batch.draws
        # M draws per example ((draw, example) pairs as examples): ā_ns is weighted by the mean of
        # its draws' ‖ĝ‖², and every draw's ĝ by its example's ‖ā‖²
        w_in = g_sq if m == 1 else g_sq.reshape(m, *a_sq.shape).mean(0)
        w_out = a_sq if m == 1 else a_sq.repeat(m, 1)
        return w_in, w_out

    def damping_for(self, damping: float) -> float | Tensor:
        if not self.effective_damping:
            return damping
        return self.scaling.mean().clamp_min(damping)
