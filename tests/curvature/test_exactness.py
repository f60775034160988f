"""Exactness of the optimizer's maths against the independent float64 oracle (tests/curvature/oracle.py).

The exactness contract: with ``momentum=0, weight_decay=0, factor_decay=0, eigen_every=1`` one ``step()``
changes each preconditioned layer by exactly ``-lr·(F̂ + λI)⁻¹ ∇L`` (K-FAC, EKFAC, TEKFAC) and
every other parameter by ``-lr·∇L``; factors follow K-FAC-expand under weight sharing (sequence
Linear, Conv2d positions); EKFAC's scaling is the exact diagonal of the Fisher in the K-FAC
eigenbasis, hence at least as close to F in Frobenius norm as K-FAC (George et al. 2018).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from ekfac_triton import EKFAC

from tests.curvature.oracle import LayerOracle, kron_basis_matrix, layer_oracles
from tests.helpers import (EXACT_STEP, assert_rel_close, grad_matrix_of, library_fhat, make_mlp, mean_ce,
                           preconditioned)

DTYPE = torch.float64
LR = 0.3
DAMPING = 1e-3
CURVATURES = ("kfac", "ekfac", "tekfac")


# -- problems ------------------------------------------------------------------------------------
def mean_mse(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(out, y)


Problem = tuple[nn.Module, Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]


def mlp_problem(seed: int = 0, loss: str = "ce") -> Problem:
    """Three Linear layers (middle one without bias), tanh; (N, d) inputs."""
    g = torch.Generator().manual_seed(seed)
    model = make_mlp([5, 7, 6, 4], bias=[True, False, True], seed=seed, dtype=DTYPE)
    n = 24
    X = torch.randn(n, 5, generator=g, dtype=DTYPE)
    if loss == "ce":
        return model, X, torch.randint(0, 4, (n,), generator=g), mean_ce
    return model, X, torch.randn(n, 4, generator=g, dtype=DTYPE), mean_mse


def seq_problem(seed: int = 0, loss: str = "ce") -> Problem:
    """Linear → tanh → Linear → tanh → Linear per token on (B, T, d) inputs, loss over all tokens."""
    g = torch.Generator().manual_seed(seed)
    model = make_mlp([4, 6, 5, 3], bias=[True, False, True], seed=seed, dtype=DTYPE)
    b, t = 10, 5
    X = torch.randn(b, t, 4, generator=g, dtype=DTYPE)
    if loss == "ce":
        return model, X, torch.randint(0, 3, (b, t), generator=g), mean_ce
    return model, X, torch.randn(b, t, 3, generator=g, dtype=DTYPE), mean_mse


def cnn_problem(seed: int = 0, loss: str = "ce") -> Problem:
    """Conv2d layers with padding, stride, rectangular kernels, dilation and padding='same',
    then Flatten + Linear."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),                                            # 6x7 -> 6x7
        nn.Conv2d(3, 4, (2, 3), stride=2, padding=(1, 0), dilation=(1, 2), bias=False), nn.Tanh(),  # -> 4x2
        # on a 4x2 map the dilated kernel's outer columns only ever see padding: exact zero
        # columns in the patches, so A has a multi-dimensional null space (a stress case)
        nn.Conv2d(4, 3, 3, padding="same", dilation=2), nn.Tanh(),                           # -> 4x2
        nn.Flatten(), nn.Linear(24, 5)).to(DTYPE)
    n = 32
    X = torch.randn(n, 2, 6, 7, generator=g, dtype=DTYPE)
    if loss == "ce":
        return model, X, torch.randint(0, 5, (n,), generator=g), mean_ce
    return model, X, torch.randn(n, 5, generator=g, dtype=DTYPE), mean_mse


def layernorm_problem(seed: int = 0) -> Problem:
    """A LayerNorm between two Linear layers: its parameters get the plain update."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    with torch.no_grad():  # non-trivial affine parameters
        model[1].weight.add_(0.3 * torch.randn(6, generator=g, dtype=DTYPE))
        model[1].bias.add_(0.3 * torch.randn(6, generator=g, dtype=DTYPE))
    n = 20
    return model, torch.randn(n, 5, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g), mean_ce


PROBLEMS = {"mlp": mlp_problem, "seq": seq_problem, "cnn": cnn_problem}


def one_step(problem: Problem, curvature: str, **kwargs) -> tuple[EKFAC, list[LayerOracle], dict[nn.Module, Tensor], dict]:
    """Oracles (computed on a copy, before anything else), then one exact-settings step.

    Returns the optimizer, the oracles, each preconditioned module's parameter change as a
    (d_out, d_in̄) matrix, and ``{param: (before, grad, after)}`` for all parameters.
    """
    model, X, Y, loss_fn = problem
    oracles = layer_oracles(model, X, Y, loss_fn)
    settings = dict(lr=LR, damping=DAMPING, curvature=curvature, **EXACT_STEP)
    settings.update(kwargs)
    opt = EKFAC(model, **settings)
    before = {p: p.detach().clone() for p in model.parameters()}
    opt.zero_grad()
    loss_fn(model(X), Y).backward()
    grads = {p: p.grad.detach().clone() for p in model.parameters()}
    opt.step()
    record = {p: (before[p], grads[p], p.detach().clone()) for p in model.parameters()}
    deltas = {}
    for m in preconditioned(model):
        dw = m.weight.detach() - before[m.weight]
        db = None if m.bias is None else m.bias.detach() - before[m.bias]
        deltas[m] = grad_matrix_of(m, dw, db)
    return opt, oracles, deltas, record


def assert_eigenbasis(q: Tensor, values: Tensor, matrix: Tensor, what: str) -> None:
    """q is orthonormal and ``matrix q = q diag(values)``."""
    __tracebackhide__ = True
    eye = torch.eye(q.shape[0], dtype=DTYPE)
    assert_rel_close(q.T @ q, eye, 1e-12, f"{what}: QᵀQ")
    residual = matrix @ q - q * values
    rel = (residual.norm() / matrix.norm()).item()
    assert rel <= 1e-11, f"{what}: ‖M Q - Q Λ‖/‖M‖ = {rel:.3e}"


# -- 1. the step is exactly -lr (F̂ + λI)⁻¹ ∇L ------------------------------------------------------
@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("kind,loss", [("mlp", "ce"), ("mlp", "mse"), ("seq", "ce"), ("seq", "mse"), ("cnn", "ce"),
                                       ("cnn", "mse")])
def test_step_is_damped_natural_gradient(kind: str, loss: str, curvature: str) -> None:
    problem = PROBLEMS[kind](seed=1, loss=loss)
    opt, oracles, deltas, _ = one_step(problem, curvature)
    modules = preconditioned(problem[0])
    assert len(modules) == len(oracles) == len(opt.preconditioner.layers)
    for m, oracle in zip(modules, oracles):
        expected = oracle.step(curvature, LR, DAMPING)
        assert_rel_close(deltas[m], expected, 1e-8, f"{kind}/{loss}/{curvature} layer {oracle.name!r} step")


def test_oracle_gradient_matches_autograd() -> None:
    """Sanity of the oracle itself: mean_n Ḡ_n equals autograd's gradient of L."""
    model, X, Y, loss_fn = cnn_problem(seed=3)
    oracles = layer_oracles(model, X, Y, loss_fn)
    loss_fn(model(X), Y).backward()
    for m, oracle in zip(preconditioned(model), oracles):
        g = grad_matrix_of(m, m.weight.grad, None if m.bias is None else m.bias.grad)
        assert_rel_close(oracle.grad, g, 1e-12, f"oracle gradient of {oracle.name!r}")


# -- 2. parameters without curvature get the plain update ----------------------------------------------
@pytest.mark.parametrize("curvature", CURVATURES)
def test_plain_parameters_move_by_minus_lr_grad(curvature: str) -> None:
    problem = layernorm_problem(seed=2)
    model = problem[0]
    opt, oracles, deltas, record = one_step(problem, curvature)
    norm = model[1]
    assert opt.preconditioned_modules() == ["0", "3"]
    for p in (norm.weight, norm.bias):
        before, grad, after = record[p]
        assert grad.abs().max() > 0
        assert_rel_close(after - before, -LR * grad, 1e-12, f"{curvature}: LayerNorm parameter change")
    for m, oracle in zip(preconditioned(model), oracles):
        assert_rel_close(deltas[m], oracle.step(curvature, LR, DAMPING), 1e-8,
                         f"{curvature}: layer {oracle.name!r} beside a LayerNorm")


# -- 3. EKFAC is at least as close to F as K-FAC; TEKFAC == EKFAC for constant norms ------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["mlp", "seq", "cnn"])
def test_ekfac_no_farther_from_fisher_than_kfac(kind: str, seed: int) -> None:
    """‖F - F̂_EKFAC‖_F ≤ ‖F - F̂_KFAC‖_F in the same (K-FAC) basis: S is the optimal diagonal
    there (George et al. 2018, §3.2). Checked on the library's stored state and on the oracle."""
    problem = PROBLEMS[kind](seed=seed + 10, loss="ce" if seed % 2 == 0 else "mse")
    opt, oracles, _, _ = one_step(problem, "ekfac")
    for layer, oracle in zip(opt.preconditioner.layers, oracles):
        fisher = oracle.fisher()
        curv = layer.curvature
        d_ekfac = (fisher - library_fhat(curv, "ekfac")).norm().item()
        d_kfac = (fisher - library_fhat(curv, "kfac")).norm().item()
        assert d_ekfac <= d_kfac * (1 + 1e-10), (
            f"{kind} seed {seed} layer {layer.name!r}: EKFAC distance {d_ekfac:.6e} > K-FAC {d_kfac:.6e}")
        o_ekfac = (fisher - oracle.approximation("ekfac")).norm().item()
        o_kfac = (fisher - oracle.approximation("kfac")).norm().item()
        assert o_ekfac <= o_kfac * (1 + 1e-10)
        assert abs(d_ekfac - o_ekfac) <= 1e-8 * max(o_ekfac, fisher.norm().item())


def constant_norm_problem(bias: bool, seed: int = 0) -> Problem:
    """A single Linear layer where every ‖ā_n‖ and every ‖g_n‖ is the same.

    Construction: inputs x_n on the unit sphere (so ‖ā_n‖² = 1 + bias), MSE loss with targets
    ``y_n = W x_n + b - u_n``, ‖u_n‖ = 1: the residual is u_n and g_n = ∂ℓ_n/∂z_n = (2/C) u_n, so
    ‖g_n‖ = 2/C for all n. Then Φ ∝ Σ ‖g_n‖² ā ā ᵀ = c·A and Ψ ∝ Σ ‖ā_n‖² g gᵀ = c'·G: TEKFAC's
    basis is K-FAC's, Θ = S, and the TEKFAC step equals the EKFAC step.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d_in, c, n = 6, 4, 30
    model = nn.Sequential(nn.Linear(d_in, c, bias=bias)).to(DTYPE)
    X = torch.randn(n, d_in, generator=g, dtype=DTYPE)
    X = X / X.norm(dim=1, keepdim=True)
    u = torch.randn(n, c, generator=g, dtype=DTYPE)
    u = u / u.norm(dim=1, keepdim=True)
    with torch.no_grad():
        Y = model(X) - u
    return model, X, Y, mean_mse


@pytest.mark.parametrize("bias", [True, False])
def test_tekfac_equals_ekfac_for_constant_norms(bias: bool) -> None:
    problem = constant_norm_problem(bias)
    steps = {}
    for curvature in ("ekfac", "tekfac"):
        model, X, Y, loss_fn = problem
        fresh = (copy.deepcopy(model), X, Y, loss_fn)
        _, oracles, deltas, _ = one_step(fresh, curvature)
        (oracle,) = oracles
        norms_a = oracle.a_bar.norm(dim=-1)
        norms_g = oracle.g.norm(dim=-1)
        assert_rel_close(norms_a, torch.full_like(norms_a, norms_a[0, 0].item()), 1e-12, "‖ā_n‖ constant")
        assert_rel_close(norms_g, torch.full_like(norms_g, 2 / 4), 1e-12, "‖g_n‖ constant")
        steps[curvature] = next(iter(deltas.values()))
    assert_rel_close(steps["tekfac"], steps["ekfac"], 1e-8, "TEKFAC vs EKFAC step with constant norms")


def test_tekfac_differs_from_ekfac_in_general() -> None:
    """The previous test is not vacuous: with varying norms TEKFAC's basis and step differ."""
    problem = mlp_problem(seed=4)
    steps = {}
    for curvature in ("ekfac", "tekfac"):
        model, X, Y, loss_fn = problem
        _, _, deltas, _ = one_step((copy.deepcopy(model), X, Y, loss_fn), curvature)
        steps[curvature] = list(deltas.values())
    rel = max(((t - e).norm() / e.norm()).item() for t, e in zip(steps["tekfac"], steps["ekfac"]))
    assert rel > 1e-4


# -- 4. stored factors and scalings follow K-FAC-expand ----------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "seq", "cnn"])
def test_factors_and_scaling_follow_kfac_expand(kind: str) -> None:
    problem = PROBLEMS[kind](seed=5)
    opt, oracles, _, _ = one_step(problem, "ekfac")
    if kind != "mlp":
        assert any(o.r > 1 for o in oracles)
    for layer, oracle in zip(opt.preconditioner.layers, oracles):
        curv = layer.curvature
        A, G = oracle.kfac_factors()
        what = f"{kind} layer {layer.name!r} (R={oracle.r})"
        assert_rel_close(curv.in_factor, A, 1e-10, f"{what}: in_factor vs A = 1/(NR) Σ ā āᵀ")
        assert_rel_close(curv.out_factor, G, 1e-10, f"{what}: out_factor vs G = 1/N Σ ĝ ĝᵀ")
        assert_eigenbasis(curv.q_in, curv.in_eigenvalues, A, f"{what}: q_in")
        assert_eigenbasis(curv.q_out, curv.out_eigenvalues, G, f"{what}: q_out")
        # S is the exact diagonal of F in the library's own basis ...
        assert_rel_close(curv.scaling, oracle.diagonal_in_basis(curv.q_in, curv.q_out), 1e-10,
                         f"{what}: scaling vs diag of F in the basis")
        # ... and equals the oracle's S in the oracle's basis (signs do not matter, spectra simple)
        assert_rel_close(curv.scaling, oracle.ekfac_scaling(), 1e-10, f"{what}: scaling vs oracle S")
        # and the implied F̂ is the oracle's
        assert_rel_close(library_fhat(curv, "ekfac"), oracle.approximation("ekfac"), 1e-10, f"{what}: F̂_EKFAC")


@pytest.mark.parametrize("kind", ["mlp", "seq", "cnn"])
def test_tekfac_factors_and_scaling(kind: str) -> None:
    """TEKFAC's stored factors are proportional to Φ, Ψ (only eigenvectors matter: compare after
    normalising to unit trace) and its scaling is Θ, the diagonal of F in their basis."""
    problem = PROBLEMS[kind](seed=6)
    opt, oracles, _, _ = one_step(problem, "tekfac")
    for layer, oracle in zip(opt.preconditioner.layers, oracles):
        curv = layer.curvature
        phi, psi = oracle.tekfac_factors()
        what = f"{kind} layer {layer.name!r}"
        assert_rel_close(curv.in_factor / curv.in_factor.trace(), phi, 1e-10, f"{what}: Φ")
        assert_rel_close(curv.out_factor / curv.out_factor.trace(), psi, 1e-10, f"{what}: Ψ")
        assert_rel_close(curv.scaling, oracle.diagonal_in_basis(curv.q_in, curv.q_out), 1e-10, f"{what}: Θ")
        assert_rel_close(library_fhat(curv, "tekfac"), oracle.approximation("tekfac"), 1e-10, f"{what}: F̂_TEKFAC")


# -- 5. the per_position approximation ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["seq", "cnn"])
def test_per_position_scaling(kind: str) -> None:
    """``scaling="per_position"`` treats positions as examples:
    ``S_pp = 1/N Σ_{n,s} (Q_Gᵀ ĝ_ns)² (Q_Aᵀ ā_ns)²ᵀ``. It drops the cross-position terms of the
    exact ``S = 1/N Σ_n (Σ_s (Q_Gᵀ ĝ_ns)(Q_Aᵀ ā_ns)ᵀ)²`` and is only an approximation when R > 1."""
    problem = PROBLEMS[kind](seed=7)
    model, X, Y, loss_fn = problem
    opt, oracles, deltas, _ = one_step((copy.deepcopy(model), X, Y, loss_fn), "ekfac", scaling="per_position")
    for layer, oracle, delta in zip(opt.preconditioner.layers, oracles, deltas.values()):
        curv = layer.curvature
        what = f"{kind} layer {layer.name!r} (R={oracle.r})"
        expected = oracle.per_position_scaling(curv.q_in, curv.q_out)
        assert_rel_close(curv.scaling, expected, 1e-10, f"{what}: per_position scaling")
        # the step uses it: -lr (Q diag(S_pp) Qᵀ + λI)⁻¹ ∇L
        f_hat = kron_basis_matrix(curv.q_in, curv.q_out, expected)
        v = torch.linalg.solve(f_hat + DAMPING * torch.eye(f_hat.shape[0], dtype=DTYPE),
                               oracle.grad.T.reshape(-1))
        assert_rel_close(delta, -LR * v.reshape(oracle.d_in_bar, oracle.d_out).T, 1e-8, f"{what}: per_position step")
        exact = oracle.diagonal_in_basis(curv.q_in, curv.q_out)
        if oracle.r > 1:
            rel = ((curv.scaling - exact).norm() / exact.norm()).item()
            assert rel > 1e-3, f"{what}: per_position is expected to differ from the exact S when R > 1"
        else:
            assert_rel_close(curv.scaling, exact, 1e-10, f"{what}: per_position == per_example for R = 1")


def test_per_position_equals_per_example_without_sharing() -> None:
    """For one position per example the two estimators are the same formula."""
    problem = mlp_problem(seed=8)
    model, X, Y, loss_fn = problem
    scalings = {}
    for mode in ("per_example", "per_position"):
        opt, _, _, _ = one_step((copy.deepcopy(model), X, Y, loss_fn), "ekfac", scaling=mode)
        scalings[mode] = [layer.curvature.scaling for layer in opt.preconditioner.layers]
    for s_pp, s_pe in zip(scalings["per_position"], scalings["per_example"]):
        assert_rel_close(s_pp, s_pe, 1e-12, "per_position vs per_example, R = 1")


# -- 6. the other documented estimators, exactly ------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_batch_scaling_step(kind: str) -> None:
    """``scaling="batch"`` with ``factor_decay=0``: ``S = N·(Q_Gᵀ ∇L̄ Q_A)²`` from the mini-batch
    gradient, and the step is ``-lr (Q diag(vec S) Qᵀ + λI)⁻¹ ∇L``."""
    problem = PROBLEMS[kind](seed=9)
    opt, oracles, deltas, _ = one_step(problem, "ekfac", scaling="batch")
    for layer, oracle, delta in zip(opt.preconditioner.layers, oracles, deltas.values()):
        curv = layer.curvature
        what = f"{kind} layer {layer.name!r}"
        A, G = oracle.kfac_factors()
        assert_eigenbasis(curv.q_in, curv.in_eigenvalues, A, f"{what}: q_in")
        assert_eigenbasis(curv.q_out, curv.out_eigenvalues, G, f"{what}: q_out")
        expected = oracle.n * (curv.q_out.T @ oracle.grad @ curv.q_in).square()
        assert_rel_close(curv.scaling, expected, 1e-10, f"{what}: batch scaling")
        f_hat = kron_basis_matrix(curv.q_in, curv.q_out, expected)
        v = torch.linalg.solve(f_hat + DAMPING * torch.eye(f_hat.shape[0], dtype=DTYPE), oracle.grad.T.reshape(-1))
        assert_rel_close(delta, -LR * v.reshape(oracle.d_in_bar, oracle.d_out).T, 1e-8, f"{what}: batch-scaling step")


@pytest.mark.parametrize("damping", [1e-9, 1e3])
def test_tekfac_effective_damping_step(damping: float) -> None:
    """TEKFAC with ``effective_damping=True``: each layer is damped with ``max(mean(Θ_l), λ)``
    (Gao et al. 2020, Eq. 3.5); a large λ is the floor, a small one is replaced by mean(Θ_l)."""
    problem = PROBLEMS["cnn"](seed=11)
    opt, oracles, deltas, _ = one_step(problem, "tekfac", effective_damping=True, damping=damping)
    for layer, oracle, delta in zip(opt.preconditioner.layers, oracles, deltas.values()):
        f_hat = oracle.approximation("tekfac")
        theta_mean = (f_hat.trace() / f_hat.shape[0]).item()  # tr Θ / dim Θ (tr F̂ = tr Θ)
        lam = max(theta_mean, damping)
        assert (lam == theta_mean) == (damping < 1), "the test should exercise both branches of the max"
        v = torch.linalg.solve(f_hat + lam * torch.eye(f_hat.shape[0], dtype=DTYPE), oracle.grad.T.reshape(-1))
        assert_rel_close(delta, -LR * v.reshape(oracle.d_in_bar, oracle.d_out).T, 1e-8,
                         f"layer {layer.name!r}: TEKFAC step with effective damping {lam:.3e}")
