"""Curvatures: one file per method. A new one is a :class:`Curvature` subclass in its own file,
passed as ``curvature=TheClass`` or named here in ``CURVATURES``."""

from __future__ import annotations

from .base import SCALINGS, Curvature, CurvatureOptions, LayerShape, RefreshRequest, ema_weights
from .eigenbasis import EigenbasisCurvature
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


def curvature_class(curvature: str | type[Curvature]) -> type[Curvature]:
    """The class of ``curvature``: a name in :data:`CURVATURES` or a :class:`Curvature` subclass."""
    if isinstance(curvature, type) and issubclass(curvature, Curvature):
        return curvature
    if isinstance(curvature, str) and curvature in CURVATURES:
        return CURVATURES[curvature]
    raise ValueError(f"Invalid curvature={curvature!r}: must be one of {tuple(CURVATURES)} or a Curvature subclass")


__all__ = ["CURVATURES", "SCALINGS", "Curvature", "CurvatureOptions", "EigenbasisCurvature", "LayerShape",
           "RefreshRequest", "curvature_class", "ema_weights", "EKFACCurvature", "KFACCurvature", "MACCurvature",
           "TEKFACCurvature"]
