"""Curvatures: one file per method. Add one by adding a file and a line in ``CURVATURES``."""

from __future__ import annotations

from .base import SCALINGS, Curvature, EigenbasisCurvature, LayerShape, ema_weights
from .ekfac import EKFACCurvature
from .kfac import KFACCurvature
from .mac import MACCurvature
from .tekfac import TEKFACCurvature

CURVATURES: dict[str, type[Curvature]] = {
    "ekfac": EKFACCurvature,
    "kfac": KFACCurvature,
    "tekfac": TEKFACCurvature,
    "mac": MACCurvature,
}

__all__ = ["CURVATURES", "SCALINGS", "Curvature", "EigenbasisCurvature", "LayerShape", "ema_weights",
           "EKFACCurvature", "KFACCurvature", "MACCurvature", "TEKFACCurvature"]
