"""The forward Laplacian (ekfac_triton.pinn.laplacian) against torch.func, float64.

* u, ∇u and Δu equal the network, its gradient and the trace of ``torch.func.hessian`` for random
  tanh/sigmoid/ReLU MLPs and d ∈ {1, 2, 5}; a weighted (spatial-only) Laplacian likewise.
* For every layer, ``Σ_s ĝ ⊗ ā`` equals the brute-force Jacobian of the interior residual with
  respect to that layer's [W | b]; the gradient equals ``Jᵀr/N``; bias-free layers are handled.
* Bad input is refused with errors naming what is wrong.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from ekfac_triton.pinn import ForwardLaplacian, Heat, Poisson
from ekfac_triton.pinn.curvature import LayerSample, layer_gradient
from tests.helpers import assert_rel_close, make_mlp

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py
TOL = 1e-12  # every entry's error relative to the largest entry of the expected tensor (norm="max")


def mlp(d: int, act: type[nn.Module], widths=(7, 5), seed: int = 0, bias: bool | list[bool] = True) -> nn.Sequential:
    return make_mlp([d, *widths, 1], act=act, bias=bias, seed=seed, dtype=DTYPE)


def points(n: int, d: int, seed: int = 1) -> Tensor:
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=DTYPE) * 2 - 0.5


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.ReLU])
@pytest.mark.parametrize("d", [1, 2, 5])
def test_forward_laplacian_equals_hessian_trace(act, d):
    model = mlp(d, act, seed=d)
    x = points(11, d)
    out = ForwardLaplacian(model)(x)

    def scalar(xi: Tensor) -> Tensor:
        return model(xi).squeeze(-1)

    assert_rel_close(out.u, scalar(x), TOL, "u", norm="max")
    assert_rel_close(out.grad, vmap(jacrev(scalar))(x), TOL, "∇u", norm="max")
    lap = vmap(hessian(scalar))(x).diagonal(dim1=-2, dim2=-1).sum(-1)
    if act is nn.ReLU:  # piecewise linear: Δu = 0 away from the kinks
        assert out.lap.abs().max() == 0 and lap.abs().max() == 0
    else:
        assert_rel_close(out.lap, lap, TOL, "Δu", norm="max")


def test_weighted_laplacian_is_weighted_hessian_diagonal():
    model = mlp(4, nn.Tanh, seed=3)
    weights = torch.tensor([0.0, 1.0, 0.5, 2.0], dtype=DTYPE)
    x = points(9, 4)
    out = ForwardLaplacian(model, weights)(x)
    h = vmap(hessian(lambda xi: model(xi).squeeze(-1)))(x).diagonal(dim1=-2, dim2=-1)
    assert_rel_close(out.lap, h @ weights, TOL, "Σ c_i ∂_i² u", norm="max")


def test_value_only_pass_is_the_model():
    model = mlp(3, nn.Sigmoid)
    x = points(6, 3)
    out = ForwardLaplacian(model)(x, derivatives=False)
    assert out.grad is None and out.lap is None
    assert_rel_close(out.u, model(x).squeeze(-1), TOL, "u", norm="max")


class _Residual(nn.Module):
    """The residual as a module of the model's parameters (for torch.func.functional_call)."""

    def __init__(self, model: nn.Sequential, fn, weights) -> None:
        super().__init__()
        self.model, self.fn, self.weights = model, fn, weights

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(ForwardLaplacian(self.model, self.weights), x)


def residual_jacobians(model: nn.Sequential, fn, x: Tensor, weights) -> dict[str, Tensor]:
    """Brute force: d r_n / d θ for every parameter (torch.func over the whole Taylor pass)."""
    module = _Residual(model, fn, weights)
    params = {k: v.detach() for k, v in module.named_parameters()}
    jac = jacrev(lambda p: functional_call(module, p, (x,)))(params)
    return {k.removeprefix("model."): v for k, v in jac.items()}


def combined(jac: dict[str, Tensor], index: int, bias: bool) -> Tensor:
    """(N, d_out, d_in̄) Jacobian of the residual w.r.t. [W | b] of Linear ``index``."""
    w = jac[f"{index}.weight"]
    return torch.cat([w, jac[f"{index}.bias"].unsqueeze(-1)], -1) if bias else w


@pytest.mark.parametrize("problem", ["poisson", "heat", "boundary"])
@pytest.mark.parametrize("bias", [True, [True, False, True]], ids=["bias", "bias-free-middle"])
def test_position_jacobians_equal_residual_jacobian(problem, bias):
    d = 3
    model = mlp(d, nn.Tanh, widths=(6, 4), seed=5, bias=bias)
    eq = Heat(d - 1) if problem == "heat" else Poisson(d)
    x = points(8, d, seed=2)
    f = torch.randn(8, generator=torch.Generator().manual_seed(4), dtype=DTYPE)

    def residual(net, xs):
        if problem == "boundary":
            return eq.boundary_residual(net(xs, derivatives=False).u, f)
        return eq.interior_residual(net(xs), f)

    net = ForwardLaplacian(model, eq.laplacian_weights)
    r = residual(lambda xs, **kw: net(xs, record=True, **kw), x)
    r.sum().backward()
    jac = residual_jacobians(model, lambda n, xs: residual(n, xs), x, eq.laplacian_weights)
    linear_idx = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    assert len(net.records) == len(linear_idx)
    for rec, i in zip(net.records, linear_idx):
        has_bias = model[i].bias is not None
        per_point = torch.einsum("nso,nsi->noi", rec.grads, rec.inputs)
        expected = combined(jac, i, has_bias)
        assert_rel_close(per_point, expected, TOL, f"Σ_s ĝ ⊗ ā, layer {i}", norm="max")
        grad = layer_gradient(LayerSample(rec.inputs, rec.grads), r.detach())
        assert_rel_close(grad, torch.einsum("noi,n->oi", expected, r.detach()) / len(r), TOL, f"gradient, layer {i}",
                         norm="max")
        # and it is the autograd gradient of the loss 1/(2N) Σ r²
    model.zero_grad()
    r2 = residual(lambda xs, **kw: net(xs, **kw), x)
    (r2.pow(2).sum() / (2 * len(r2))).backward()
    for rec, i in zip(net.records, linear_idx):
        auto = _combined_grad(model[i])
        grad = layer_gradient(LayerSample(rec.inputs, rec.grads), r.detach())
        assert_rel_close(grad, auto, TOL, f"gradient vs autograd, layer {i}", norm="max")


def _combined_grad(lin: nn.Linear) -> Tensor:
    """[∇W | ∇b] from autograd (a bias the residual does not reach has gradient 0)."""
    if lin.bias is None:
        return lin.weight.grad
    bias = torch.zeros_like(lin.bias) if lin.bias.grad is None else lin.bias.grad
    return torch.cat([lin.weight.grad, bias.unsqueeze(-1)], -1)


# -- bad input ------------------------------------------------------------------------------------
def test_unsupported_activation_is_refused():
    model = nn.Sequential(nn.Linear(2, 4), nn.GELU(), nn.Linear(4, 1)).to(DTYPE)
    with pytest.raises(ValueError, match="unsupported layer GELU"):
        ForwardLaplacian(model)


@pytest.mark.parametrize("model, match", [
    (nn.Linear(2, 1), "nn.Sequential"),
    (nn.Sequential(nn.Linear(2, 3), nn.Tanh()), "last layer"),
    (nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)), "out_features=1"),
    (nn.Sequential(nn.Tanh(), nn.Linear(2, 1)), "must follow"),
    (nn.Sequential(nn.Linear(2, 3), nn.Conv1d(3, 3, 1), nn.Linear(3, 1)), "unsupported layer Conv1d"),
])
def test_unsupported_models_are_refused(model, match):
    with pytest.raises(ValueError, match=match):
        ForwardLaplacian(model.to(DTYPE))


def test_points_of_the_wrong_dimension_are_refused():
    net = ForwardLaplacian(mlp(2, nn.Tanh))
    with pytest.raises(ValueError, match=r"points of shape \(5, 3\): must be \(N, 2\)"):
        net(torch.zeros(5, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"must be \(N, 2\)"):
        net(torch.zeros(5, dtype=DTYPE))
    with pytest.raises(ValueError, match="dtype"):
        net(torch.zeros(5, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="laplacian_weights"):
        ForwardLaplacian(mlp(2, nn.Tanh), [1.0, 1.0, 0.0])


def test_recorded_graphs_are_freed():
    # A record's hooks must not keep its graph alive once the record is dropped (a leak of
    # ~10 MB per step on the paper's problem before the hooks held the record weakly).
    import weakref

    net = ForwardLaplacian(mlp(2, nn.Tanh))
    x = points(5, 2)
    net(x, record=True).lap.sum().backward()
    assert net.records[0].grads is not None
    output = weakref.ref(net.records[0].outputs[0])
    net(x, record=True)
    assert output() is None
