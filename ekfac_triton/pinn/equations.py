"""Linear second-order PDEs for PINNs, and the paper's manufactured problems.

The loss of a PINN (ARCHITECTURE.md, "K-FAC for PINNs") is
``L = 1/(2N_Ω) Σ_n r_Ω(x_n)² + 1/(2N_∂) Σ_b r_∂(x_b)²`` with the interior residual r_Ω (the PDE)
and the boundary residual ``r_∂ = u(x_b) − g_b`` (Dirichlet and initial data alike). The user
supplies interior points with f and boundary points with g.

**Adding another operator.** Subclass :class:`Equation`: set ``in_features`` and the weights c_i
of the Laplacian channel (the network computes Σ_i c_i ∂_i² u), and write ``interior_residual``
as a *linear* function of the :class:`~ekfac_triton.pinn.laplacian.Taylor` fields u, ∇u and that
weighted Laplacian, minus or plus f. Every operator ``Σ_i c_i ∂_i² u + bᵀ∇u + c·u`` (constant or
point-dependent coefficients b, c; constant c_i) fits; mixed second derivatives do not (the
forward Laplacian carries only the weighted trace of the Hessian). Because the residual is
linear in the network's outputs, its Gauss-Newton matrix is exact and K-FAC needs nothing else::

    class Helmholtz(Equation):          # −Δu − k²u = f
        def __init__(self, dim, k):
            super().__init__(dim)
            self.k = k
        def interior_residual(self, taylor, f):
            return taylor.lap + self.k ** 2 * taylor.u + f
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .laplacian import Taylor


class Equation:
    """A linear second-order PDE on points of ``in_features`` coordinates.

    Args:
        in_features: the number of input coordinates of the network.
        laplacian_weights: the c_i of the Laplacian channel (default all ones).
    """

    def __init__(self, in_features: int, laplacian_weights: list[float] | None = None) -> None:
        if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
            raise ValueError(f"Invalid in_features={in_features!r}: must be an integer >= 1")
        self.in_features = in_features
        self.laplacian_weights = [1.0] * in_features if laplacian_weights is None else list(laplacian_weights)
        if len(self.laplacian_weights) != in_features:
            raise ValueError(f"Invalid laplacian_weights: {len(self.laplacian_weights)} for {in_features} inputs")

    def interior_residual(self, taylor: Taylor, f: Tensor) -> Tensor:
        """r_Ω (N,) from u, ∇u, the weighted Laplacian and the right-hand side f (N,)."""
        raise NotImplementedError

    def boundary_residual(self, u: Tensor, g: Tensor) -> Tensor:
        """r_∂ = u − g (N,)."""
        return u - g


class Poisson(Equation):
    """−Δu = f on a domain in R^dim. Residual ``Δu + f`` (the authors' sign; the loss, gradient
    and Gauss-Newton matrix do not depend on it)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)

    def interior_residual(self, taylor: Taylor, f: Tensor) -> Tensor:
        return taylor.lap + f


class Heat(Equation):
    """∂_t u − κ Δ_x u = f on points (t, x) ∈ R^(1+dim), time first. Residual
    ``∂_t u − κΔ_x u − f``; κ = 1/4 as in the paper."""

    def __init__(self, dim: int, kappa: float = 0.25) -> None:
        super().__init__(dim + 1, [0.0] + [1.0] * dim)
        if not isinstance(kappa, (int, float)) or isinstance(kappa, bool) or not kappa > 0:
            raise ValueError(f"Invalid kappa={kappa!r}: must be a number > 0")
        self.kappa = float(kappa)

    def interior_residual(self, taylor: Taylor, f: Tensor) -> Tensor:
        return taylor.grad[..., 0] - self.kappa * taylor.lap - f


# -- the paper's manufactured problems ---------------------------------------------------------------
def unit_cube(n: int, dim: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """n points uniform in [0, 1]^dim."""
    return torch.rand(n, dim, generator=generator, dtype=dtype)


def cube_boundary(n: int, dim: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """n points on the boundary of [0, 1]^dim: uniform in the cube, then one random coordinate set
    to 0 or 1 (the authors' sampler)."""
    x = unit_cube(n, dim, generator, dtype)
    face = torch.randint(0, dim, (n,), generator=generator)
    side = torch.randint(0, 2, (n,), generator=generator).to(dtype)
    x[torch.arange(n), face] = side
    return x


@dataclass(frozen=True)
class Problem:
    """An equation with its exact solution u*, right-hand side f, boundary data g and samplers."""

    name: str
    equation: Equation
    solution: Callable[[Tensor], Tensor]
    source: Callable[[Tensor], Tensor]
    sample_interior: Callable[[int, torch.Generator, torch.dtype], Tensor]
    sample_boundary: Callable[[int, torch.Generator, torch.dtype], Tensor]

    def boundary_value(self, x: Tensor) -> Tensor:
        return self.solution(x)


def poisson_sin_product(dim: int = 2) -> Problem:
    """−Δu = f on [0, 1]^dim with u* = Π_i sin(π x_i) (zero on the boundary), f = dim·π²·u*."""

    def solution(x: Tensor) -> Tensor:
        return torch.sin(math.pi * x).prod(dim=-1)

    return Problem(f"poisson{dim}d", Poisson(dim), solution, lambda x: dim * math.pi ** 2 * solution(x),
                   lambda n, gen, dt: unit_cube(n, dim, gen, dt), lambda n, gen, dt: cube_boundary(n, dim, gen, dt))


def heat_sin_product(dim: int = 4, kappa: float = 0.25) -> Problem:
    """∂_t u = κΔu on [0, 1] × [0, 1]^dim with u* = exp(−κ dim π² t) Π_i sin(π x_i): zero on the
    spatial boundary, Π sin at t = 0, f = 0. Boundary points: half on the spatial boundary at
    random times, half at t = 0 (the authors' split)."""

    def solution(x: Tensor) -> Tensor:
        t, xs = x[..., 0], x[..., 1:]
        return torch.exp(-kappa * dim * math.pi ** 2 * t) * torch.sin(math.pi * xs).prod(dim=-1)

    def boundary(n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
        half = n // 2
        walls = torch.cat([unit_cube(half, 1, gen, dtype), cube_boundary(half, dim, gen, dtype)], dim=1)
        start = torch.cat([torch.zeros(n - half, 1, dtype=dtype), unit_cube(n - half, dim, gen, dtype)], dim=1)
        return torch.cat([walls, start])

    return Problem(f"heat{dim}+1d", Heat(dim, kappa), solution, lambda x: torch.zeros_like(x[..., 0]),
                   lambda n, gen, dt: unit_cube(n, dim + 1, gen, dt), boundary)
