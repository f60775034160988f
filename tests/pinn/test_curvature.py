"""PINN curvature (ekfac_triton.pinn.curvature) against direct float64 evaluations.

* interior factors (expand, reduce) and boundary factors equal the formulas evaluated loop by loop;
  with S = 1 expand = reduce = ordinary K-FAC (``A = E[ā āᵀ]``, ``B = E[g gᵀ]``);
* for a single boundary point the K-FAC block B ⊗ A equals the exact Gauss-Newton block;
* the two-Kronecker-sum inverse equals a dense solve to 1e-10;
* Gauss-Newton-vector products equal dense ``1/N Jᵀ J v``;
* KFAC*'s (α, μ) is a stationary point of the quadratic model of the dense damped Gauss-Newton.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from ekfac_triton.pinn import ForwardLaplacian, KFACStar, Poisson
from ekfac_triton.pinn.curvature import (KroneckerSumInverse, LayerSample, boundary_factors, damped,
                                         gauss_newton_vector_product, interior_factors, joint_diagonalization)
from ekfac_triton.pinn.optimizer import quadratic_model, solve_quadratic_model

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def random_sample(n: int = 7, s: int = 4, d_in: int = 5, d_out: int = 3, seed: int = 0) -> LayerSample:
    g = gen(seed)
    return LayerSample(torch.randn(n, s, d_in, generator=g, dtype=DTYPE), torch.randn(n, s, d_out, generator=g, dtype=DTYPE))


def test_interior_factors_equal_the_formulas():
    sample = random_sample()
    a, g = sample.inputs, sample.grads
    n, s = a.shape[:2]
    A_exp = sum(torch.outer(a[i, j], a[i, j]) for i in range(n) for j in range(s)) / (n * s)
    B_exp = sum(torch.outer(g[i, j], g[i, j]) for i in range(n) for j in range(s)) / n
    A, B = interior_factors(sample, "expand")
    assert rel_err(A, A_exp) < 1e-14 and rel_err(B, B_exp) < 1e-14
    A_red = sum(torch.outer(a[i].mean(0), a[i].mean(0)) for i in range(n)) / n
    B_red = sum(torch.outer(g[i].sum(0), g[i].sum(0)) for i in range(n)) / n
    A, B = interior_factors(sample, "reduce")
    assert rel_err(A, A_red) < 1e-14 and rel_err(B, B_red) < 1e-14
    with pytest.raises(ValueError, match="approx"):
        interior_factors(sample, "exact")


def test_single_position_expand_equals_reduce_equals_kfac():
    sample = random_sample(s=1, seed=3)
    a, g = sample.inputs[:, 0], sample.grads[:, 0]
    kfac = (a.T @ a / len(a), g.T @ g / len(g))
    for A, B in (interior_factors(sample, "expand"), interior_factors(sample, "reduce"), boundary_factors(sample)):
        assert rel_err(A, kfac[0]) < 1e-14 and rel_err(B, kfac[1]) < 1e-14


def model_and_points(seed: int = 0, d: int = 2, n: int = 6):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 1)).to(DTYPE)
    x = torch.rand(n, d, generator=gen(seed + 1), dtype=DTYPE)
    f = torch.randn(n, generator=gen(seed + 2), dtype=DTYPE)
    return model, x, f


class _Residual(nn.Module):
    def __init__(self, model: nn.Sequential, boundary: bool) -> None:
        super().__init__()
        self.model, self.boundary = model, boundary

    def forward(self, x: Tensor, f: Tensor) -> Tensor:
        net = ForwardLaplacian(self.model)
        if self.boundary:
            return net(x, derivatives=False).u - f
        return Poisson(x.shape[1]).interior_residual(net(x), f)


def dense_jacobian(model: nn.Sequential, x: Tensor, f: Tensor, boundary: bool) -> tuple[Tensor, list[slice]]:
    """(N, D) Jacobian of the residual w.r.t. all parameters as [W | b] blocks (row-major), and the
    column range of each layer."""
    module = _Residual(model, boundary)
    params = {k: v.detach() for k, v in module.named_parameters()}
    jac = jacrev(lambda p: functional_call(module, p, (x, f)))(params)
    blocks, slices, start = [], [], 0
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            w, b = jac[f"model.{i}.weight"], jac[f"model.{i}.bias"]
            block = torch.cat([w, b.unsqueeze(-1)], -1).flatten(1)
            blocks.append(block)
            slices.append(slice(start, start + block.shape[1]))
            start += block.shape[1]
    return torch.cat(blocks, 1), slices


def samples_of(model, x, f, boundary: bool) -> list[LayerSample]:
    net = ForwardLaplacian(model)
    out = net(x, derivatives=not boundary, record=True)
    r = out.u - f if boundary else Poisson(x.shape[1]).interior_residual(out, f)
    r.sum().backward()
    return [LayerSample(rec.inputs, rec.grads) for rec in net.records]


def test_single_boundary_point_kfac_is_exact_gauss_newton():
    model, x, f = model_and_points(n=1)
    samples = samples_of(model, x, f, boundary=True)
    jac, slices = dense_jacobian(model, x, f, boundary=True)
    for sample, cols in zip(samples, slices):
        A, B = boundary_factors(sample)
        exact = jac[:, cols].T @ jac[:, cols]
        assert rel_err(torch.kron(B, A), exact) < 1e-12


@pytest.mark.parametrize("shape", [(4, 3), (1, 6), (5, 1), (9, 7)])
def test_kronecker_sum_inverse_equals_dense_solve(shape):
    d_out, d_in = shape
    g = gen(sum(shape))

    def spd(n: int, rank: int) -> Tensor:
        m = torch.randn(n, rank, generator=g, dtype=DTYPE)
        return m @ m.T / rank

    lam = 1e-3
    a1, a2 = damped(spd(d_in, max(1, d_in - 2)), lam), damped(spd(d_in, 2), lam)
    b1, b2 = damped(spd(d_out, 3), lam), damped(spd(d_out, max(1, d_out - 1)), lam)
    inverse, note = KroneckerSumInverse.from_factors(a1, b1, a2, b2)
    assert inverse is not None and note is None
    r = torch.randn(d_out, d_in, generator=g, dtype=DTYPE)
    dense = torch.kron(b1, a1) + torch.kron(b2, a2)
    expected = torch.linalg.solve(dense, r.flatten()).reshape(d_out, d_in)
    assert rel_err(inverse.apply(r), expected) < 1e-10
    assert rel_err(inverse.dense(), torch.linalg.inv(dense)) < 1e-10


def test_joint_diagonalization_refuses_an_indefinite_first_matrix():
    first = torch.diag(torch.tensor([1.0, -1.0], dtype=DTYPE))
    result, note = joint_diagonalization(first, torch.eye(2, dtype=DTYPE))
    assert result is None and "positive definite" in note


@pytest.mark.parametrize("boundary", [False, True], ids=["interior", "boundary"])
def test_gauss_newton_vector_products_equal_dense(boundary):
    model, x, f = model_and_points(seed=4, n=5)
    samples = samples_of(model, x, f, boundary)
    jac, slices = dense_jacobian(model, x, f, boundary)
    g = gen(9)
    vs = [torch.randn(s.grads.shape[-1], s.inputs.shape[-1], generator=g, dtype=DTYPE) for s in samples]
    dense = jac.T @ (jac @ torch.cat([v.flatten() for v in vs])) / len(x)
    got = gauss_newton_vector_product(samples, vs)
    assert rel_err(torch.cat([v.flatten() for v in got]), dense) < 1e-12
    assert all(dense[c].numel() == v.numel() for c, v in zip(slices, got))


def test_kfac_star_step_is_a_stationary_point_of_the_quadratic_model():
    model, x, f = model_and_points(seed=6, n=8)
    xb = torch.rand(5, 2, generator=gen(11), dtype=DTYPE)
    gb = torch.randn(5, generator=gen(12), dtype=DTYPE)
    damping = 1e-4
    opt = KFACStar(model, Poisson(2), damping=damping, initial_lr=1e-2)
    opt.step(x, f, xb, gb)  # the first step sets the previous update
    previous = [p.clone() for p in opt.previous]
    lin = opt.linearize(x, f, xb, gb)
    grad = lin.gradient()
    gd = gen(13)
    direction = [torch.randn(g.shape, generator=gd, dtype=DTYPE) for g in grad]
    matrix, vector = quadratic_model(lin, grad, direction, previous, damping)
    alpha, mu = solve_quadratic_model(matrix, vector)
    # dense model: G = J_Ωᵀ J_Ω / N_Ω + J_∂ᵀ J_∂ / N_∂, with the same damping
    j_in, _ = dense_jacobian(model, x, f, boundary=False)
    j_bd, _ = dense_jacobian(model, xb, gb, boundary=True)
    gram = j_in.T @ j_in / len(x) + j_bd.T @ j_bd / len(xb) + damping * torch.eye(j_in.shape[1], dtype=DTYPE)
    flat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
    basis = torch.stack([flat(direction), flat(previous)], 1)
    grad_dense = j_in.T @ lin.interior_residual / len(x) + j_bd.T @ lin.boundary_residual / len(xb)
    assert rel_err(flat(grad), grad_dense) < 1e-12
    dense_matrix, dense_vector = basis.T @ gram @ basis, basis.T @ grad_dense
    assert rel_err(matrix, dense_matrix) < 1e-12 and rel_err(vector, dense_vector) < 1e-12
    stationary = dense_matrix @ torch.tensor([alpha, mu], dtype=DTYPE) + dense_vector
    assert float(stationary.abs().max()) < 1e-10 * float(dense_vector.abs().max())
