"""Curvatures: one file per method. Add one by adding a file and a line in ``CURVATURES``."""

from __future__ import annotations

from .base import SCALINGS, EigenbasisCurvature, LayerShape, ema_weights
from .ekfac import EKFACCurvature
from .kfac import KFACCurvature
from .tekfac import TEKFACCurvature

CURVATURES: dict[str, type[EigenbasisCurvature]] = {
    "ekfac": EKFACCurvature,
    "kfac": KFACCurvature,
    "tekfac": TEKFACCurvature,
}

__all__ = ["CURVATURES", "SCALINGS", "EigenbasisCurvature", "LayerShape", "ema_weights",
           "EKFACCurvature", "KFACCurvature", "TEKFACCurvature"]
