"""KFAC and KFACStar for PINNs (ekfac_triton.pinn.optimizer): one exact step, the line search, the
inverse schedule, training on small Poisson/heat problems, float32, and argument validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ekfac_triton.pinn import KFAC, Heat, KFACStar, Poisson, heat_sin_product, poisson_sin_product
from ekfac_triton.pinn.curvature import boundary_factors, damped, interior_factors
from tests.helpers import make_mlp

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def setup(problem=None, widths=(8,), n_in=40, n_bd=12, seed=0, dtype=DTYPE, bias=True):
    problem = problem or poisson_sin_product(2)
    d = problem.equation.in_features
    sizes = [d, *widths, 1]
    model = make_mlp(sizes, bias=[bias or i == len(sizes) - 2 for i in range(len(sizes) - 1)], seed=seed,
                     dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    xi, xb = problem.sample_interior(n_in, g, dtype), problem.sample_boundary(n_bd, g, dtype)
    return model, problem, (xi, problem.source(xi), xb, problem.boundary_value(xb))


def test_one_step_is_minus_lr_times_inverse_curvature_times_gradient():
    model, problem, data = setup(widths=(6, 5))
    damping, lr = 1e-3, 0.5
    opt = KFAC(model, problem.equation, lr=lr, damping=damping, factor_decay=0.0, init_identity=False)
    lin = opt.linearize(*data)
    grad = lin.gradient()
    before = [torch.cat([m.weight, m.bias.unsqueeze(-1)], 1).detach().clone() for m in opt.layers]
    opt.step(*data)
    for i, m in enumerate(opt.layers):
        a1, b1 = (damped(f, damping) for f in interior_factors(lin.interior[i]))
        a2, b2 = (damped(f, damping) for f in boundary_factors(lin.boundary[i]))
        dense = torch.kron(b1, a1) + torch.kron(b2, a2)
        expected = -lr * torch.linalg.solve(dense, grad[i].flatten()).reshape(grad[i].shape)
        after = torch.cat([m.weight, m.bias.unsqueeze(-1)], 1).detach()
        assert float((after - before[i] - expected).norm() / expected.norm()) < 1e-10, i


def test_line_search_takes_the_best_grid_point():
    model, problem, data = setup()
    grid = (1e-3, 1e-2, 0.1, 0.5)
    opt = KFAC(model, problem.equation, damping=1e-6, line_search_grid=grid)
    start = [p.detach().clone() for p in model.parameters()]
    info = opt.step(*data)
    assert info.lr in grid
    after_loss = opt.loss(*data)
    # every other grid point gives a loss at least as high
    with torch.no_grad():
        step = [p - s for p, s in zip(model.parameters(), start)]
        for alpha in grid:
            for p, s, d in zip(model.parameters(), start, step):
                p.copy_(s + d * (alpha / info.lr))
            assert opt.loss(*data) >= after_loss * (1 - 1e-12)


def test_inverses_follow_the_engine_schedule():
    model, problem, data = setup()
    opt = KFACStar(model, problem.equation, inverse_every=3)
    ids = []
    for _ in range(7):
        opt.step(*data)
        ids.append(id(opt.inverses[0]))
    # rebuilt on steps 0, 3, 6
    assert ids[0] == ids[1] == ids[2] != ids[3] == ids[4] == ids[5] != ids[6]


@pytest.mark.parametrize("name", ["kfac", "kfac_star"])
@pytest.mark.parametrize("which", ["poisson", "heat", "bias-free"])
def test_training_reduces_the_loss(name, which):
    problem = heat_sin_product(2) if which == "heat" else poisson_sin_product(2)
    model, problem, data = setup(problem, widths=(10, 6), bias=which != "bias-free")
    if name == "kfac":
        opt = KFAC(model, problem.equation, momentum=0.5, damping=1e-8, factor_decay=0.5)
    else:
        opt = KFACStar(model, problem.equation, damping=1e-8, factor_decay=0.9)
    first = opt.loss(*data)
    for _ in range(40):
        info = opt.step(*data)
        assert math.isfinite(info.loss)
    assert opt.loss(*data) < (0.1 if name == "kfac" else 0.5) * first


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_float32_runs(approx):
    model, problem, data = setup(dtype=torch.float32)
    opt = KFACStar(model, problem.equation, damping=1e-4, approx=approx)
    first = opt.loss(*data)
    for _ in range(10):
        opt.step(*data)
    assert model[0].weight.dtype == torch.float32
    assert opt.loss(*data) < first


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(damping=0.0), "damping"), (dict(damping=float("nan")), "damping"), (dict(factor_decay=1.0), "factor_decay"),
    (dict(approx="full"), "approx"), (dict(inverse_every=0), "inverse_every"), (dict(init_identity=1), "init_identity"),
    (dict(lr=-1.0), "lr"), (dict(lr="armijo"), "lr"), (dict(momentum=1.0), "momentum"),
    (dict(line_search_grid=()), "line_search_grid"), (dict(line_search_grid=(0.1, -1.0)), "line_search_grid"),
])
def test_kfac_arguments_are_validated(kwargs, match):
    model, problem, _ = setup()
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        KFAC(model, problem.equation, **kwargs)


def test_kfac_star_arguments_are_validated():
    model, problem, _ = setup()
    with pytest.raises(ValueError, match="Invalid initial_lr"):
        KFACStar(model, problem.equation, initial_lr=0.0)
    with pytest.raises(TypeError):
        KFACStar(model, problem.equation, momentum=0.5)  # KFAC* chooses its own momentum


def test_bad_points_and_models_are_refused():
    model, problem, (xi, f, xb, g) = setup()
    opt = KFACStar(model, problem.equation)
    with pytest.raises(ValueError, match=r"Invalid interior_points of shape \(40, 3\)"):
        opt.step(torch.cat([xi, xi[:, :1]], 1), f, xb, g)
    with pytest.raises(ValueError, match=r"Invalid boundary_points of shape \(12,\)"):
        opt.step(xi, f, xb[:, 0], g)
    with pytest.raises(ValueError, match="Invalid f of shape"):
        opt.step(xi, f[:-1], xb, g)
    with pytest.raises(ValueError, match="Invalid g of shape"):
        opt.step(xi, f, xb, g.reshape(3, 4))
    with pytest.raises(ValueError, match="2 inputs but the equation has 3"):
        KFAC(model, Heat(2))
    with pytest.raises(ValueError, match="Invalid equation"):
        KFAC(model, "poisson")
    with pytest.raises(ValueError, match="unsupported layer GELU"):
        KFAC(nn.Sequential(nn.Linear(2, 3), nn.GELU(), nn.Linear(3, 1)).to(DTYPE), Poisson(2))
