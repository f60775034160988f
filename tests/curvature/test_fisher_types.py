"""Fisher types (``fisher="empirical" | "mc" | "type-2"``, :mod:`ekfac_triton.fisher`).

* type-2, one exact-settings step, against curvlinops 3.0.1 (``fisher_type="type-2"``,
  ``kfac_approx="expand"``, ``separate_weight_and_bias=False``, mean loss): the stored F̂ equals
  curvlinops' block and the step is ``-lr (F̂ + λI)⁻¹ ∇L`` with it (float64, 1e-8), for an MLP, a CNN
  and a sequence model with per-token outputs, each with the three losses. Type-2 needs no
  correction factor for MSE/BCE (curvlinops' √C loss rescaling applies to its empirical and MC
  Fishers only).
* type-2 against an independent oracle (all three curvatures, TEKFAC included): the exact
  Gauss-Newton ``1/N Σ_n J_nᵀ H_n J_n`` with H_n from ``torch.func.hessian`` and factored by its own
  eigendecomposition (a different factor than the library's, which must not matter).
* mc: reproducible for a seed, resumable bit-exactly from a state_dict, and the mean of K-FAC
  factors over many draws converges to the type-2 factors.
* torch.compile: compiled type-2/mc statistics equal eager ones.
* bad input names the argument.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.func import hessian

from ekfac_triton import EKFAC, Preconditioner

from tests.curvature.oracle import LayerOracle, kron_basis_matrix, layer_oracles, unvec, vec
from tests.helpers import (EXACT_STEP, assert_rel_close, curvlinops_dense, grad_matrix_of, layer_indices,
                           library_fhat, make_mlp, pooled_sequence_net, preconditioned, strided_cnn)

DTYPE = torch.float64
LR = 0.3
DAMPING = 1e-3
LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


# -- problems ----------------------------------------------------------------------------------------
class ClassesFirst(nn.Module):
    """(B, T, C) -> (B, C, T), the layout nn.CrossEntropyLoss takes for per-token logits."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


def _model(kind: str, loss: str) -> tuple[nn.Module, tuple[int, ...], tuple[int, ...]]:
    """The model (from the global RNG as problem() seeds it), the input shape and the output shape
    (in the loss's layout)."""
    if kind == "mlp":
        return make_mlp([5, 7, 6, 4], bias=[True, False, True], seed=None, dtype=None), (12, 5), (12, 4)
    if kind == "cnn":
        return strided_cnn(3), (10, 2, 6, 7), (10, 3)
    if kind == "seqpool":  # shared Linear layers on (B, T, d), mean over tokens, a final Linear
        return pooled_sequence_net(), (8, 5, 4), (8, 3)
    # a per-token model on (B, T, d): three shared Linear layers, outputs (B, T, 3)
    layers = make_mlp([4, 6, 5, 3], bias=[True, False, True], seed=None, dtype=None)
    if loss == "ce":
        return nn.Sequential(*layers, ClassesFirst()), (6, 5, 4), (6, 3, 5)
    return layers, (6, 5, 4), (6, 5, 3)


def problem(kind: str, loss: str, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, x_shape, out_shape = _model(kind, loss)
    model = model.to(DTYPE)
    X = torch.randn(x_shape, generator=g, dtype=DTYPE)
    if loss == "ce":
        target_shape = (out_shape[0],) + out_shape[2:]
        Y = torch.randint(0, out_shape[1], target_shape, generator=g)
    elif loss == "mse":
        Y = torch.randn(out_shape, generator=g, dtype=DTYPE)
    else:  # curvlinops' type-2 for BCE wants binary targets
        Y = torch.randint(0, 2, out_shape, generator=g).to(DTYPE)
    return model, X, Y, LOSSES[loss]()


def one_step(model, X, Y, loss_fn, curvature: str, fisher: str = "type-2", **kwargs):
    """One exact-settings step through ``opt.backward``; returns the optimizer, each layer's
    gradient and parameter change as (d_out, d_in̄) matrices."""
    opt = EKFAC(model, lr=LR, damping=DAMPING, curvature=curvature, fisher=fisher, loss=loss_fn,
                **{**EXACT_STEP, **kwargs})
    before = {p: p.detach().clone() for p in model.parameters()}
    opt.backward(model(X), Y)
    grads = {m: grad_matrix_of(m, m.weight.grad, None if m.bias is None else m.bias.grad).clone()
             for m in preconditioned(model)}
    opt.step()
    deltas = {m: grad_matrix_of(m, m.weight.detach() - before[m.weight],
                             None if m.bias is None else m.bias.detach() - before[m.bias])
              for m in preconditioned(model)}
    return opt, grads, deltas


def damped_step(f_hat: Tensor, grad: Tensor) -> Tensor:
    v = torch.linalg.solve(f_hat + DAMPING * torch.eye(f_hat.shape[0], dtype=DTYPE), vec(grad))
    return -LR * unvec(v, grad.shape[0], grad.shape[1])


# -- 1. type-2 against curvlinops ---------------------------------------------------------------------
def curvlinops_type2(curvature: str, model: nn.Module, loss_fn: nn.Module, X: Tensor, Y: Tensor) -> Tensor:
    curvlinops = pytest.importorskip("curvlinops")
    cls = curvlinops.KFACLinearOperator if curvature == "kfac" else curvlinops.EKFACLinearOperator
    return curvlinops_dense(cls, model, loss_fn, X, Y, fisher_type="type-2")


CURVLINOPS_CASES = [(kind, curvature) for kind in ("mlp", "cnn", "seqpool", "seq") for curvature in ("kfac", "ekfac")
                    if (kind, curvature) != ("seq", "ekfac")]  # curvlinops' EKFAC takes 2-D outputs only


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
@pytest.mark.parametrize("kind,curvature", CURVLINOPS_CASES)
def test_type2_step_matches_curvlinops(kind: str, curvature: str, loss: str) -> None:
    """``seqpool``: positions shared inside the model (R = T), 2-D output; ``seq``: per-token
    outputs (B, T, C) — (B, C, T) for cross-entropy — whose loss averages over tokens too
    (K-FAC only: curvlinops 3.0.1's EKFAC refuses outputs with more than two dimensions; the
    Gauss-Newton oracle below covers EKFAC and TEKFAC there)."""
    model, X, Y, loss_fn = problem(kind, loss, seed=3)
    reference = curvlinops_type2(curvature, copy.deepcopy(model), loss_fn, X, Y)
    opt, grads, deltas = one_step(model, X, Y, loss_fn, curvature)
    for module, layer in zip(preconditioned(model), opt.preconditioner.layers):
        idx = layer_indices(model, module)
        block = reference[idx][:, idx]
        what = f"{kind}/{loss}/{curvature} layer {layer.name!r}"
        assert_rel_close(library_fhat(layer.curvature, curvature), block, 1e-8, f"{what}: F̂")
        assert_rel_close(deltas[module], damped_step(block, grads[module]), 1e-8, f"{what}: step")


# -- 2. type-2 against an independent Gauss-Newton oracle ---------------------------------------------
@dataclass
class GaussNewtonOracle(LayerOracle):
    """A :class:`LayerOracle` whose "examples" are the (column, example) pairs of a factor of the
    loss Hessian, weighted so that its Fisher is ``1/N Σ_n J_nᵀ H_n J_n``; ``grad`` is the
    training gradient."""

    loss_grad: Tensor | None = None

    @property
    def grad(self) -> Tensor:
        return self.loss_grad


def gauss_newton_oracles(model: nn.Module, X: Tensor, Y: Tensor, loss_fn: nn.Module) -> list[GaussNewtonOracle]:
    """From the definition: H_n = ∇²_f ℓ_n (torch.func.hessian, ℓ_n the loss of example n alone),
    factored as V diag(√w) (its own eigendecomposition); column k of the factor backpropagated as
    the gradient of the linear loss ``s_kᵀ f`` (tests/curvature/oracle.py's probes); D columns of M = D
    weighted by √D, so that the oracle's mean over its N·D "examples" is Σ_k over columns."""
    with torch.no_grad():
        out = model(X)
    n = out.shape[0]
    columns = []
    for i in range(n):
        h = hessian(lambda f: loss_fn(f[None], Y[i:i + 1]))(out[i])
        d = out[i].numel()
        w, v = torch.linalg.eigh(h.reshape(d, d))
        columns.append(v * w.clamp_min(0).sqrt())       # (D, D): H_n = S Sᵀ
    factor = torch.stack(columns)                         # (N, D, D)
    d = factor.shape[1]
    per_column = []
    for k in range(d):
        s = factor[:, :, k].reshape(out.shape)
        # check=False: columns of a singular H_n (softmax) are zero, whose check would divide 0 by 0
        per_column.append(layer_oracles(model, X, s, lambda f, y: (f * y).flatten(1).sum(1).mean(), check=False))
    true = layer_oracles(model, X, Y, loss_fn)
    oracles = []
    for j, t in enumerate(true):
        cols = [per_column[k][j] for k in range(d)]
        oracles.append(GaussNewtonOracle(
            name=t.name, a=t.a.repeat(d, 1, 1), g=torch.cat([c.g for c in cols]) * d ** 0.5, bias=t.bias,
            per_example_grads=torch.cat([c.per_example_grads for c in cols]) * d ** 0.5, loss_grad=t.grad))
    return oracles


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "tekfac"])
@pytest.mark.parametrize("kind,loss", [("mlp", "ce"), ("mlp", "bce"), ("cnn", "mse"), ("seq", "ce")])
def test_type2_step_matches_gauss_newton_oracle(kind: str, loss: str, curvature: str) -> None:
    """Exact for per-token models too: their positions do not mix, so the column-batched
    backward passes carry no cross-position terms."""
    model, X, Y, loss_fn = problem(kind, loss, seed=5)
    oracles = gauss_newton_oracles(model, X, Y, loss_fn)
    opt, grads, deltas = one_step(model, X, Y, loss_fn, curvature)
    for module, layer, oracle in zip(preconditioned(model), opt.preconditioner.layers, oracles):
        what = f"{kind}/{loss}/{curvature} layer {layer.name!r}"
        assert_rel_close(grads[module], oracle.grad, 1e-12, f"{what}: gradient")
        assert_rel_close(library_fhat(layer.curvature, curvature), oracle.approximation(curvature), 1e-8,
                         f"{what}: F̂")
        assert_rel_close(deltas[module], oracle.step(curvature, LR, DAMPING), 1e-8, f"{what}: step")


def test_type2_differs_from_empirical() -> None:
    """Not vacuous: the type-2 statistics are not the empirical ones."""
    model, X, Y, loss_fn = problem("mlp", "ce", seed=1)
    factors = {}
    for fisher in ("empirical", "type-2"):
        opt, _, _ = one_step(copy.deepcopy(model), X, Y, loss_fn, "kfac", fisher=fisher)
        factors[fisher] = opt.preconditioner.layers[0].curvature.out_factor
    rel = ((factors["type-2"] - factors["empirical"]).norm() / factors["empirical"].norm()).item()
    assert rel > 1e-2


@pytest.mark.parametrize("scaling", ["batch", "per_position"])
def test_type2_other_scalings_run(scaling: str) -> None:
    """``batch`` takes S from the training gradient, ``per_position`` from the type-2 draws."""
    model, X, Y, loss_fn = problem("seq", "mse", seed=2)
    opt, grads, deltas = one_step(model, X, Y, loss_fn, "ekfac", scaling=scaling)
    for layer, module in zip(opt.preconditioner.layers, preconditioned(model)):
        curv = layer.curvature
        f_hat = kron_basis_matrix(curv.q_in, curv.q_out, curv.scaling)
        assert_rel_close(deltas[module], damped_step(f_hat, grads[module]), 1e-8, f"{scaling}: step")
        if scaling == "batch":
            expected = X.shape[0] * (curv.q_out.T @ grads[module] @ curv.q_in).square()
            assert_rel_close(curv.scaling, expected, 1e-10, "batch scaling from the training gradient")


# -- 3. mc --------------------------------------------------------------------------------------------
def kfac_factors_after_step(model, X, Y, loss_fn, fisher: str, **kwargs) -> list[tuple[Tensor, Tensor]]:
    opt, _, _ = one_step(copy.deepcopy(model), X, Y, loss_fn, "kfac", fisher=fisher, **kwargs)
    return [(layer.curvature.in_factor.clone(), layer.curvature.out_factor.clone())
            for layer in opt.preconditioner.layers]


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_mc_factors_converge_to_type2(loss: str) -> None:
    """G_mc with k draws is an average of k·N i.i.d. terms whose mean is G_type-2. With
    mc_samples = 4000 (one statistics step, N = 12 examples: 48,000 draws) the relative error of
    each G is ~1/√(48000) · (spread of one term): measured 0.002-0.010 over the three losses and
    layers, against a tolerance of 0.03; the seeds are fixed, so the test is deterministic. A (the
    inputs) is identical. A single draw is far off (measured 0.20-0.79 > 0.1), so the tolerance
    discriminates."""
    model, X, Y, loss_fn = problem("mlp", loss, seed=4)
    type2 = kfac_factors_after_step(model, X, Y, loss_fn, "type-2")
    many = kfac_factors_after_step(model, X, Y, loss_fn, "mc", mc_samples=4000, seed=11)
    one = kfac_factors_after_step(model, X, Y, loss_fn, "mc", mc_samples=1, seed=11)
    worst_one = 0.0
    for (a2, g2), (am, gm), (_, g1) in zip(type2, many, one):
        assert_rel_close(am, a2, 1e-12, f"{loss}: A does not depend on the Fisher type")
        assert_rel_close(gm, g2, 0.03, f"{loss}: mean of MC G over 4000 draws vs type-2 G")
        worst_one = max(worst_one, ((g1 - g2).norm() / g2.norm()).item())
    assert worst_one > 0.1


@pytest.mark.parametrize("fisher", ["type-2", "mc"])
def test_loss_scale_scales_the_curvature_and_the_trained_loss(fisher: str) -> None:
    """loss_scale = c: the training loss is c·loss, so G (from the curvature passes) is exactly c
    times that of c = 1 with the same draws, A is unchanged, and backward() trains on c·loss."""
    model, X, Y, loss_fn = problem("mlp", "bce", seed=9)
    plain = kfac_factors_after_step(model, X, Y, loss_fn, fisher, seed=2)
    scaled = kfac_factors_after_step(model, X, Y, loss_fn, fisher, seed=2, loss_scale=7.0)
    for (a1, g1), (a7, g7) in zip(plain, scaled):
        assert_rel_close(a7, a1, 1e-14, "A does not depend on the loss scale")
        assert_rel_close(g7, 7.0 * g1, 1e-12, "G of the scaled loss")
    trained = copy.deepcopy(model)
    opt = EKFAC(trained, fisher=fisher, loss=loss_fn, loss_scale=7.0, seed=2)
    returned = opt.backward(trained(X), Y)
    assert torch.allclose(returned, 7.0 * loss_fn(model(X), Y), rtol=1e-14, atol=0)
    expected = torch.autograd.grad(7.0 * loss_fn(model(X), Y), model[0].weight)[0]
    assert torch.allclose(trained[0].weight.grad, expected, rtol=1e-12, atol=1e-15)


def test_backward_with_a_grad_scaler_scales_the_loss() -> None:
    """opt.backward under a GradScaler backpropagates the scaled loss, as the user's own loop
    would, so scaler.step works; a power-of-two scale is exact: the run equals the unscaled one."""
    runs = []
    for scaled in (False, True):
        model, X, Y, loss_fn = problem("mlp", "ce", seed=10)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
        opt = EKFAC(model, lr=0.1, damping=1e-2, fisher="mc", loss=loss_fn, seed=3, eigen_every=2,
                    grad_scaler=scaler)
        for _ in range(3):
            opt.zero_grad()
            opt.backward(model(X), Y)
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, atol=1e-13, rtol=1e-11)


def test_mc_seed_reproducible_and_distinct() -> None:
    model, X, Y, loss_fn = problem("cnn", "ce", seed=6)
    a = kfac_factors_after_step(model, X, Y, loss_fn, "mc", seed=3)
    b = kfac_factors_after_step(model, X, Y, loss_fn, "mc", seed=3)
    c = kfac_factors_after_step(model, X, Y, loss_fn, "mc", seed=4)
    for (_, ga), (_, gb), (_, gc) in zip(a, b, c):
        assert torch.equal(ga, gb)
    assert any(not torch.equal(ga, gc) for (_, ga), (_, gc) in zip(a, c))


@pytest.mark.parametrize("fisher", ["empirical", "type-2"])
def test_construction_leaves_the_global_rng_alone(fisher: str) -> None:
    """Only fisher='mc' without a seed reads torch's global RNG (to seed its generator): any other
    optimizer must not shift a user's seeded data order."""
    model, _, _, loss_fn = problem("mlp", "ce", seed=8)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    EKFAC(model, fisher=fisher, loss=loss_fn)
    assert torch.equal(torch.rand(3), expected)


def test_mc_resume_is_bit_exact() -> None:
    """Train 3 steps, save, train 3 more; a fresh optimizer loaded from the save (and the saved
    model) trains the same 3 steps bit-identically: the generator's state is in the state_dict."""
    model, X, Y, loss_fn = problem("mlp", "bce", seed=7)
    settings = dict(lr=0.1, damping=1e-2, fisher="mc", loss=loss_fn, mc_samples=2, seed=5, eigen_every=2)

    def train(m, opt, steps):
        for i in range(steps):
            opt.zero_grad()
            opt.backward(m(X[i % 3:]), Y[i % 3:])
            opt.step()

    opt = EKFAC(model, **settings)
    train(model, opt, 3)
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 3)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_model)
    opt2 = EKFAC(resumed, **{**settings, "seed": 99})
    opt2.load_state_dict(saved_state)
    train(resumed, opt2, 3)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# -- 4. the curvature backward touches no .grad; plain loops; compiled ------------------------------------
def test_curvature_backward_leaves_grads_alone() -> None:
    model, X, Y, loss_fn = problem("mlp", "ce", seed=8)
    opt = EKFAC(model, fisher="type-2", loss=loss_fn)
    out = model(X)
    opt.curvature_backward(out)
    assert all(p.grad is None for p in model.parameters())
    loss_fn(out, Y).backward()  # the graph is still there
    reference = copy.deepcopy(model)
    loss_fn(reference(X), Y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)
    opt.step()


def test_missing_curvature_backward_raises() -> None:
    model, X, Y, loss_fn = problem("mlp", "ce", seed=9)
    opt = EKFAC(model, fisher="mc", loss=loss_fn)
    loss_fn(model(X), Y).backward()
    with pytest.raises(RuntimeError, match="fisher='mc' needs a curvature backward"):
        opt.step()


def test_no_curvature_backward_needed_off_statistics_steps() -> None:
    """With factor_every=2, step 1 has no statistics: the plain loop works there, and
    curvature_backward is a no-op (no pass runs)."""
    model, X, Y, loss_fn = problem("mlp", "mse", seed=10)
    opt = EKFAC(model, fisher="type-2", loss=loss_fn, factor_every=2)
    opt.backward(model(X), Y)
    opt.step()
    opt.zero_grad()
    out = model(X)
    opt.curvature_backward(out)
    assert opt.preconditioner._curvature_passes == 0
    loss_fn(out, Y).backward()
    opt.step()


def test_empirical_backward_equals_plain_loop() -> None:
    model, X, Y, loss_fn = problem("cnn", "ce", seed=12)
    other = copy.deepcopy(model)
    opt = EKFAC(model, loss=loss_fn, **EXACT_STEP)
    opt.backward(model(X), Y)
    opt.step()
    opt2 = EKFAC(other, **EXACT_STEP)
    loss_fn(other(X), Y).backward()
    opt2.step()
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


@pytest.mark.slow
@pytest.mark.parametrize("fisher", ["type-2", "mc"])
def test_compiled_statistics_equal_eager(fisher: str) -> None:
    torch._dynamo.reset()
    model, X, Y, loss_fn = problem("seq", "ce", seed=13)
    stats = {}
    for mode in ("eager", "compiled"):
        m = copy.deepcopy(model)
        opt = EKFAC(m, fisher=fisher, loss=loss_fn, seed=2, mc_samples=3 if fisher == "mc" else 1, **EXACT_STEP)
        run = torch.compile(m, fullgraph=True) if mode == "compiled" else m
        for _ in range(2):
            opt.zero_grad()
            opt.backward(run(X), Y)
            opt.step()
        stats[mode] = [(layer.curvature.in_factor, layer.curvature.out_factor, layer.curvature.scaling)
                       for layer in opt.preconditioner.layers]
        stats[mode + " params"] = [p.detach().clone() for p in m.parameters()]
    torch._dynamo.reset()
    for eager, compiled in zip(stats["eager"], stats["compiled"]):
        for e, c in zip(eager, compiled):
            assert_rel_close(c, e, 1e-10, f"{fisher}: compiled vs eager statistic")
    for e, c in zip(stats["eager params"], stats["compiled params"]):
        assert_rel_close(c, e, 1e-10, f"{fisher}: compiled vs eager parameters")


# -- 5. bad input ---------------------------------------------------------------------------------------
def _model_only() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(fisher="true"), "fisher='true'"),
    (dict(fisher="mc"), "loss=None"),
    (dict(fisher="type-2"), "loss=None"),
    (dict(fisher="mc", loss=nn.NLLLoss()), "loss=NLLLoss"),
    (dict(fisher="mc", loss=nn.CrossEntropyLoss(reduction="sum")), "reduction='sum'"),
    (dict(fisher="type-2", loss=nn.MSELoss(reduction="none")), "reduction='none'"),
    (dict(fisher="mc", loss=nn.CrossEntropyLoss(label_smoothing=0.1)), "label_smoothing"),
    (dict(fisher="mc", loss=nn.BCEWithLogitsLoss(pos_weight=torch.ones(2))), "pos_weight"),
    (dict(fisher="mc", loss=nn.MSELoss(), mc_samples=0), "mc_samples=0"),
    (dict(fisher="mc", loss=nn.MSELoss(), mc_samples=1.5), "mc_samples=1.5"),
    (dict(fisher="type-2", loss=nn.MSELoss(), mc_samples=2), "mc_samples=2"),
    (dict(loss=nn.MSELoss(), mc_samples=2), "mc_samples=2"),
    (dict(fisher="mc", loss=nn.MSELoss(), seed="x"), "seed='x'"),
    (dict(fisher="mc", loss=nn.MSELoss(), curvature="mac"), "curvature='mac'"),
    (dict(fisher="type-2", loss=nn.MSELoss(), loss_scale=0.0), "loss_scale=0.0"),
    (dict(fisher="type-2", loss=nn.MSELoss(), loss_scale=float("inf")), "loss_scale=inf"),
])
def test_bad_fisher_arguments_raise_naming_them(kwargs: dict, match: str) -> None:
    for cls in (EKFAC, Preconditioner):
        with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
            cls(_model_only(), **kwargs)


def test_backward_without_loss_raises() -> None:
    model = _model_only()
    opt = EKFAC(model)
    with pytest.raises(ValueError, match="loss=None"):
        opt.backward(model(torch.randn(4, 3)), torch.zeros(4, dtype=torch.long))


def test_ignore_index_targets_refused() -> None:
    model = _model_only()
    opt = EKFAC(model, fisher="type-2", loss=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="ignore_index=-100"):
        opt.backward(model(torch.randn(4, 3)), torch.tensor([0, 1, -100, 1]))
