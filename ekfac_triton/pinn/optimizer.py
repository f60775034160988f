"""``KFAC`` and ``KFACStar``: K-FAC for PINNs (Dangel, Müller & Zeinhofer 2024;
ARCHITECTURE.md, "K-FAC for PINNs").

One step on interior points (with f) and boundary points (with g):

1. one Taylor-mode forward over the interior points and one ordinary forward over the boundary
   points record each Linear's ā; one backward of each residual's sum gives each ĝ (of the
   residual, weight 1). The loss ``1/(2N_Ω) Σ r_Ω² + 1/(2N_∂) Σ r_∂²``, its gradient and the exact
   Jacobian-vector products all follow from (ā, ĝ, r) without further passes;
2. per layer the four factors (interior A_Ω, B_Ω; boundary A_∂, B_∂) take an exponential moving
   average ``F ← β F + (1 − β) F_batch`` (initialised to I by default, as in the paper's best runs);
3. when due, the inverse of ``(B_Ω + λI) ⊗ (A_Ω + λI) + (B_∂ + λI) ⊗ (A_∂ + λI)`` is rebuilt by the
   joint eigendecompositions of :class:`~ekfac_triton.pinn.curvature.KroneckerSumInverse`; the
   direction is ``Δ = −K⁻¹ ∇L`` per layer;
4. the update:

   * ``KFAC``: heavy-ball momentum ``m ← μ m + Δ`` and either a fixed step size or (default) the
     best step size on a grid (2⁻³⁰ … 2⁰, 31 points) by the loss on the same points, no step if
     none decreases the loss (the authors' rule); the grid's losses come from one batched forward
     with the grid as a leading dimension of the weights;
   * ``KFACStar``: ``u = αΔ + μδ`` (δ the previous update) minimising the quadratic model
     ``M(α, μ) = ½ [α μ] (Gram + λ‖·‖²) [α μ]ᵀ + ∇Lᵀ(αΔ + μδ)`` of the exact damped Gauss-Newton
     matrix on span{Δ, δ} (Martens & Grosse 2015 §7; the 2×2 entries are Gauss-Newton-vector
     products from Jacobian-vector products); first step α = ``initial_lr``, μ = 0.

Scheduling: the inverses are rebuilt on the steps that the library's
:class:`~ekfac_triton.eigen_engine.EigenEngine` marks due with ``period = inverse_every``
(unstaggered, synchronous; the first inverse on step 0). The paper's setting is
``inverse_every=1``: factors and inverses every step. The decompositions follow the engine's
precision policy and :func:`~ekfac_triton.eigen.symmetric_eigh`'s failure policy; if an inverse
still fails, the layer keeps its previous one (warned once per layer).

float64 is the intended precision (the paper's damping is 1e-13…1e-10); a float32 model runs in
float32.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..eigen import eigh_dtype
from ..eigen_engine import EigenEngine
from .curvature import (APPROXIMATIONS, KroneckerSumInverse, LayerSample, boundary_factors, damped,
                        interior_factors, jacobian_vector_product, layer_gradient)
from .equations import Equation
from .laplacian import ForwardLaplacian, LayerRecord, parse_model, taylor_forward

#: the authors' grid: 2⁻³⁰ … 2⁰, 31 points
DEFAULT_GRID = tuple(2.0 ** k for k in range(-30, 1))
#: memory for one batched line-search chunk (the grid is evaluated in chunks of this size)
LINE_SEARCH_BYTES = 64 * 2 ** 20


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True, kw_only=True)
class PINNConfig:
    """Settings shared by :class:`KFAC` and :class:`KFACStar`; bad values raise ``ValueError``."""

    damping: float = 1e-10
    factor_decay: float = 0.95
    approx: str = "expand"
    init_identity: bool = True
    inverse_every: int = 1

    def __post_init__(self) -> None:
        if not _is_number(self.damping) or self.damping <= 0:
            raise ValueError(f"Invalid damping={self.damping!r}: must be a finite number > 0")
        if not _is_number(self.factor_decay) or not 0 <= self.factor_decay < 1:
            raise ValueError(f"Invalid factor_decay={self.factor_decay!r}: must be in [0, 1)")
        if self.approx not in APPROXIMATIONS:
            raise ValueError(f"Invalid approx={self.approx!r}: must be one of {APPROXIMATIONS}")
        if not isinstance(self.init_identity, bool):
            raise ValueError(f"Invalid init_identity={self.init_identity!r}: must be a bool")
        if not isinstance(self.inverse_every, int) or isinstance(self.inverse_every, bool) or self.inverse_every < 1:
            raise ValueError(f"Invalid inverse_every={self.inverse_every!r}: must be an integer >= 1")


@dataclass(frozen=True)
class StepInfo:
    """What one step saw and did: the loss before the step (and its two terms), the step size α
    and momentum μ actually used (KFAC: μ is the heavy-ball coefficient)."""

    loss: float
    interior_loss: float
    boundary_loss: float
    lr: float
    momentum: float


@dataclass(frozen=True)
class Linearization:
    """Residuals and per-layer (ā, ĝ) of both loss terms at the current parameters."""

    interior_residual: Tensor
    interior: list[LayerSample]
    boundary_residual: Tensor
    boundary: list[LayerSample]

    @property
    def interior_loss(self) -> Tensor:
        return self.interior_residual.square().mean() / 2

    @property
    def boundary_loss(self) -> Tensor:
        return self.boundary_residual.square().mean() / 2

    def gradient(self) -> list[Tensor]:
        """∇L per layer as [∇W | ∇b]."""
        return [layer_gradient(i, self.interior_residual) + layer_gradient(b, self.boundary_residual)
                for i, b in zip(self.interior, self.boundary)]

    def gram(self, u: list[Tensor], v: list[Tensor]) -> Tensor:
        """uᵀ G v with G = G_Ω + G_∂ the exact Gauss-Newton matrix (two JVPs per term)."""
        total = 0.0
        for samples in (self.interior, self.boundary):
            ju = sum(jacobian_vector_product(s, x) for s, x in zip(samples, u))
            jv = ju if v is u else sum(jacobian_vector_product(s, x) for s, x in zip(samples, v))
            total = total + (ju * jv).sum() / samples[0].num_points
        return total


def _dot(u: list[Tensor], v: list[Tensor]) -> Tensor:
    return sum((a * b).sum() for a, b in zip(u, v))


def quadratic_model(lin: Linearization, grad: list[Tensor], direction: list[Tensor], previous: list[Tensor],
                    damping: float) -> tuple[Tensor, Tensor]:
    """The 2×2 matrix and vector of ``M(α, μ) = ½ xᵀ Mx + bᵀx``, x = (α, μ), for the update
    ``αΔ + μδ``: ``M = [[ΔᵀGΔ + λΔᵀΔ, δᵀGΔ + λδᵀΔ], [·, δᵀGδ + λδᵀδ]]``, ``b = (∇Lᵀ Δ, ∇Lᵀ δ)``."""
    d_, p_ = direction, previous
    dgd = lin.gram(d_, d_) + damping * _dot(d_, d_)
    pgd = lin.gram(p_, d_) + damping * _dot(p_, d_)
    pgp = lin.gram(p_, p_) + damping * _dot(p_, p_)
    matrix = torch.stack([torch.stack([dgd, pgd]), torch.stack([pgd, pgp])])
    return matrix, torch.stack([_dot(grad, d_), _dot(grad, p_)])


def solve_quadratic_model(matrix: Tensor, vector: Tensor) -> tuple[float, float]:
    """(α, μ) = −M⁻¹ b; α alone (μ = 0) from the 1-D model when the 2×2 system is singular."""
    try:
        alpha, mu = (-torch.linalg.solve(matrix, vector)).tolist()
        if math.isfinite(alpha) and math.isfinite(mu):
            return alpha, mu
    except RuntimeError:
        pass
    return float(-vector[0] / matrix[0, 0]), 0.0


class _PINNKFAC:
    """The shared machinery (curvature, inverses, bookkeeping); subclasses choose the update."""

    def __init__(self, model: nn.Module, equation: Equation, config: PINNConfig) -> None:
        if not isinstance(equation, Equation):
            raise ValueError(f"Invalid equation of type {type(equation).__name__}: must be an ekfac_triton.pinn.Equation")
        self.model = model
        self.equation = equation
        self.config = config
        in_features = parse_model(model)[0][0].in_features
        if in_features != equation.in_features:
            raise ValueError(f"Invalid model: its first Linear takes {in_features} inputs but the "
                             f"equation has {equation.in_features} coordinates")
        self.net = ForwardLaplacian(model, equation.laplacian_weights)
        self.layers = self.net.linears
        dims = [(m.in_features + (m.bias is not None), m.out_features) for m in self.layers]
        p = self.layers[0].weight
        self.engine = EigenEngine([i ** 3 + o ** 3 for i, o in dims], p.device, period=config.inverse_every,
                                  stagger=False, synchronous=True)
        eye = [(torch.eye(i, dtype=p.dtype, device=p.device), torch.eye(o, dtype=p.dtype, device=p.device))
               for i, o in dims]
        # per layer [A_Ω, B_Ω, A_∂, B_∂]; None until the first batch when init_identity is False
        self.factors: list[list[Tensor] | None] = [
            [a, b, a.clone(), b.clone()] if config.init_identity else None for a, b in eye]
        self.inverses: list[KroneckerSumInverse | None] = [None] * len(dims)
        self._warned: set[int] = set()
        self.steps = 0

    # -- public API ----------------------------------------------------------------------------
    @torch.no_grad()
    def loss(self, interior_points: Tensor, f: Tensor, boundary_points: Tensor, g: Tensor) -> float:
        """The PINN loss at the current parameters."""
        f, g = self._check(interior_points, f, boundary_points, g)
        r = self.equation.interior_residual(self.net(interior_points), f)
        rb = self.equation.boundary_residual(self.net(boundary_points, derivatives=False).u, g)
        return float(r.square().mean() / 2 + rb.square().mean() / 2)

    def step(self, interior_points: Tensor, f: Tensor, boundary_points: Tensor, g: Tensor) -> StepInfo:
        """One optimizer step on the loss of these points; returns the loss before the step."""
        f, g = self._check(interior_points, f, boundary_points, g)
        lin = self.linearize(interior_points, f, boundary_points, g)
        grad = lin.gradient()
        self._update_factors(lin)
        self._update_inverses()
        direction = [-self._precondition(i, gr) for i, gr in enumerate(grad)]
        update, lr, momentum = self._update(lin, grad, direction, interior_points, f, boundary_points, g)
        with torch.no_grad():
            for layer, u in zip(self.layers, update):
                layer.weight.add_(u[:, :layer.in_features])
                if layer.bias is not None:
                    layer.bias.add_(u[:, layer.in_features])
        self.steps += 1
        li, lb = float(lin.interior_loss), float(lin.boundary_loss)
        return StepInfo(li + lb, li, lb, lr, momentum)

    def linearize(self, interior_points: Tensor, f: Tensor, boundary_points: Tensor, g: Tensor) -> Linearization:
        """Residuals and per-layer (ā, ĝ) at the current parameters (one forward and one backward
        per term; no parameter gradients are accumulated)."""
        parts = []
        for points, target, interior in ((interior_points, f, True), (boundary_points, g, False)):
            records: list[LayerRecord] = []  # no hooks: the gradients come from autograd.grad below
            out = taylor_forward(self.net.params(), self.net.acts, points, self.net.laplacian_weights,
                                 derivatives=interior, records=records)
            r = (self.equation.interior_residual(out, target) if interior
                 else self.equation.boundary_residual(out.u, target))
            tensors = [t for rec in records for t in rec.output_tensors()]
            grads = iter(torch.autograd.grad(r.sum(), tensors, allow_unused=True))
            for rec in records:
                rec.set_grads([next(grads) for _ in rec.output_tensors()])
            parts.append((r.detach(), [LayerSample(rec.inputs, rec.grads) for rec in records]))
        (ri, si), (rb, sb) = parts
        return Linearization(ri, si, rb, sb)

    # -- internals -------------------------------------------------------------------------------
    def _check(self, interior_points: Tensor, f: Tensor, boundary_points: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        self.net.check_points(interior_points, "interior_points")
        self.net.check_points(boundary_points, "boundary_points")
        out = []
        for name, values, points in (("f", f, interior_points), ("g", g, boundary_points)):
            n = points.shape[0]
            if not isinstance(values, Tensor) or tuple(values.shape) not in ((n,), (n, 1)):
                shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
                raise ValueError(f"Invalid {name} of shape {shape}: must be ({n},) or ({n}, 1), one value per point")
            out.append(values.reshape(-1).to(points.dtype))
        return out[0], out[1]

    def _update_factors(self, lin: Linearization) -> None:
        beta = self.config.factor_decay
        for i, (si, sb) in enumerate(zip(lin.interior, lin.boundary)):
            new = [*interior_factors(si, self.config.approx), *boundary_factors(sb)]
            if self.factors[i] is None:
                self.factors[i] = new
            else:
                for old, fresh in zip(self.factors[i], new):
                    old.mul_(beta).add_(fresh, alpha=1 - beta)

    def _update_inverses(self) -> None:
        lam = self.config.damping
        for i, factors in enumerate(self.factors):
            if self.inverses[i] is not None and not self.engine.due(i, self.steps):
                continue
            a1, b1, a2, b2 = (damped(f, lam) for f in factors)
            dtype = eigh_dtype(max(a1.shape[0], b1.shape[0]), a1.dtype, self.engine.float64_max_dim)
            inverse, note = KroneckerSumInverse.from_factors(a1, b1, a2, b2, dtype)
            if inverse is not None:
                self.inverses[i] = inverse
            if note and i not in self._warned:
                self._warned.add(i)
                kept = "recovered" if inverse is not None else (
                    "keeping the previous inverse" if self.inverses[i] is not None else "using the plain gradient")
                warnings.warn(f"PINN K-FAC layer {i}: {note}; {kept}", RuntimeWarning, stacklevel=3)

    def _precondition(self, i: int, grad: Tensor) -> Tensor:
        inverse = self.inverses[i]
        return grad if inverse is None else inverse.apply(grad)

    def _update(self, lin: Linearization, grad: list[Tensor], direction: list[Tensor], interior_points: Tensor,
                f: Tensor, boundary_points: Tensor, g: Tensor) -> tuple[list[Tensor], float, float]:
        raise NotImplementedError

    @torch.no_grad()
    def grid_losses(self, direction: list[Tensor], grid: tuple[float, ...], interior_points: Tensor, f: Tensor,
                    boundary_points: Tensor, g: Tensor) -> Tensor:
        """The loss at θ + α·direction for every α of the grid, from batched forwards (the grid
        is a leading dimension of the weights), in chunks of about ``LINE_SEARCH_BYTES``."""
        width = max(max(m.in_features, m.out_features) for m in self.layers)
        per_alpha = interior_points.shape[0] * (interior_points.shape[1] + 2) * width * 8 * 4
        chunk = max(1, LINE_SEARCH_BYTES // per_alpha)
        weights = self.net.laplacian_weights
        losses = []
        for start in range(0, len(grid), chunk):
            alphas = torch.tensor(grid[start:start + chunk], dtype=f.dtype, device=f.device)
            params = []
            for layer, d in zip(self.layers, direction):
                k = layer.in_features
                w = layer.weight + alphas.view(-1, 1, 1) * d[:, :k]
                b = None if layer.bias is None else layer.bias + alphas.view(-1, 1) * d[:, k]
                params.append((w, b))
            out = taylor_forward(params, self.net.acts, interior_points, weights)
            r = self.equation.interior_residual(out, f)
            ub = taylor_forward(params, self.net.acts, boundary_points, weights, derivatives=False).u
            rb = self.equation.boundary_residual(ub, g)
            losses.append(r.square().mean(-1) / 2 + rb.square().mean(-1) / 2)
        return torch.cat(losses)


class KFAC(_PINNKFAC):
    """K-FAC for PINNs with momentum and a grid line search of the step size (the paper's "KFAC").

    Args:
        model: ``nn.Sequential`` MLP (Linear + Tanh/Sigmoid/ReLU) with a scalar output.
        equation: the PDE (:class:`~ekfac_triton.pinn.Poisson`, :class:`~ekfac_triton.pinn.Heat`, ...).
        lr: a fixed step size (> 0) or ``"line_search"`` (default): the best of ``line_search_grid``.
        momentum: heavy-ball momentum on the direction, in [0, 1).
        damping: λ added to all four factors (> 0; the paper's runs: 1e-13 … 1e-10).
        factor_decay: β of the factors' EMA, in [0, 1).
        approx: interior factors ``"expand"`` (default, every paper run) or ``"reduce"``.
        init_identity: start every factor at I (the paper's best runs); else at the first batch's.
        inverse_every: rebuild the inverses every this many steps (the paper: 1).
        line_search_grid: step sizes tried by the line search (default 2⁻³⁰ … 2⁰).
    """

    def __init__(self, model: nn.Module, equation: Equation, *, lr: float | str = "line_search", momentum: float = 0.0,
                 damping: float = 1e-10, factor_decay: float = 0.95, approx: str = "expand",
                 init_identity: bool = True, inverse_every: int = 1,
                 line_search_grid: tuple[float, ...] = DEFAULT_GRID) -> None:
        if lr != "line_search" and (not _is_number(lr) or lr <= 0):
            raise ValueError(f"Invalid lr={lr!r}: must be a finite number > 0 or 'line_search'")
        if not _is_number(momentum) or not 0 <= momentum < 1:
            raise ValueError(f"Invalid momentum={momentum!r}: must be in [0, 1)")
        grid = tuple(line_search_grid)
        if not grid or not all(_is_number(a) and a > 0 for a in grid):
            raise ValueError(f"Invalid line_search_grid={line_search_grid!r}: must be a non-empty sequence of numbers > 0")
        super().__init__(model, equation, PINNConfig(damping=damping, factor_decay=factor_decay, approx=approx,
                                                     init_identity=init_identity, inverse_every=inverse_every))
        self.lr, self.momentum, self.grid = lr, float(momentum), grid
        self.momentum_buffer: list[Tensor] | None = None

    def _update(self, lin, grad, direction, interior_points, f, boundary_points, g):
        if self.momentum and self.momentum_buffer is not None:
            for m, d in zip(self.momentum_buffer, direction):
                m.mul_(self.momentum).add_(d)
        elif self.momentum:
            self.momentum_buffer = [d.clone() for d in direction]
        step = self.momentum_buffer if self.momentum else direction
        if self.lr == "line_search":
            losses = self.grid_losses(step, self.grid, interior_points, f, boundary_points, g)
            best = int(torch.argmin(losses))
            current = float(lin.interior_loss + lin.boundary_loss)
            alpha = self.grid[best] if float(losses[best]) <= current else 0.0
        else:
            alpha = float(self.lr)
        return [alpha * s for s in step], alpha, self.momentum


class KFACStar(_PINNKFAC):
    """K-FAC for PINNs with step size and momentum from the quadratic model of the exact damped
    Gauss-Newton matrix on span{direction, previous update} (the paper's "KFAC*"; no line search).

    Args: as :class:`KFAC` without ``lr``, ``momentum`` and the grid, plus
        initial_lr: the step size of the first step (default 1e-6, the authors').
    """

    def __init__(self, model: nn.Module, equation: Equation, *, damping: float = 1e-10, factor_decay: float = 0.95,
                 approx: str = "expand", init_identity: bool = True, inverse_every: int = 1,
                 initial_lr: float = 1e-6) -> None:
        if not _is_number(initial_lr) or initial_lr <= 0:
            raise ValueError(f"Invalid initial_lr={initial_lr!r}: must be a finite number > 0")
        super().__init__(model, equation, PINNConfig(damping=damping, factor_decay=factor_decay, approx=approx,
                                                     init_identity=init_identity, inverse_every=inverse_every))
        self.initial_lr = float(initial_lr)
        self.previous: list[Tensor] | None = None

    def _update(self, lin, grad, direction, interior_points, f, boundary_points, g):
        if self.previous is None:
            alpha, mu = self.initial_lr, 0.0
            update = [alpha * d for d in direction]
        else:
            matrix, vector = quadratic_model(lin, grad, direction, self.previous, self.config.damping)
            alpha, mu = solve_quadratic_model(matrix, vector)
            update = [alpha * d + mu * p for d, p in zip(direction, self.previous)]
        self.previous = update
        return update, alpha, mu
