"""K-FAC for physics-informed neural networks (Dangel, Müller & Zeinhofer, NeurIPS 2024).

    from ekfac_triton.pinn import KFACStar, Poisson
    opt = KFACStar(model, Poisson(2))
    opt.step(interior_points, f, boundary_points, g)

See README.md in this folder and ARCHITECTURE.md, "K-FAC for PINNs", at the repository root.
"""

from .equations import Equation, Heat, Poisson, Problem, heat_sin_product, poisson_sin_product
from .laplacian import ForwardLaplacian, Taylor
from .optimizer import KFAC, KFACStar, StepInfo

__all__ = ["KFAC", "Equation", "ForwardLaplacian", "Heat", "KFACStar", "Poisson", "Problem", "StepInfo", "Taylor",
           "heat_sin_product", "poisson_sin_product"]
