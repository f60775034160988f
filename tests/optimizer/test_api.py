"""The public contract of EKFAC/KFAC/TEKFAC and Preconditioner: argument validation,
the skip policy for non-finite steps, the eigendecomposition failure policy, amortisation,
EMA and batch-scaling semantics, serialisation, parameter groups, KL clipping and capture."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import ekfac_triton
from ekfac_triton import EKFAC, KFAC, TEKFAC, Preconditioner
from tests.helpers import assert_allclose, assert_bitwise_equal, half_mse, make_mlp, seeded_batch

D_IN, D_H1, D_H2, D_OUT = 5, 7, 6, 3


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def mlp(dtype: torch.dtype = torch.float64, seed: int = 0, norm: bool = False) -> nn.Sequential:
    """A 3-Linear MLP (odd widths); with ``norm`` a LayerNorm (a plain parameter) after the first."""
    return make_mlp([D_IN, D_H1, D_H2, D_OUT], norm_after=(0,) if norm else (), seed=seed, dtype=dtype)


def conv_net(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 6),
                         nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, D_OUT)).to(dtype)


def batch(n: int, seed: int, dtype: torch.dtype = torch.float64, image: bool = False) -> tuple[Tensor, Tensor]:
    return seeded_batch(n, (2, 5, 5) if image else (D_IN,), D_OUT, 1000 + seed, dtype)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    half_mse(model(x), y).backward()
    opt.step()


def params_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def leaves(obj, path: str = ""):
    """(path, value) of every leaf of a nested dict/list state."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}/{i}")
    else:
        yield path, obj


def snapshot(opt: torch.optim.Optimizer) -> dict:
    return {k: (v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v))
            for k, v in leaves(opt.state_dict())}


def assert_same_state(before: dict, after: dict, ignore: tuple[str, ...] = ()) -> None:
    assert sorted(before) == sorted(after), "the set of state entries changed"
    n_tensors = 0
    for k, v in before.items():
        if k.endswith(ignore):
            continue
        w = after[k]
        if isinstance(v, Tensor):
            n_tensors += 1
            assert_bitwise_equal(w, v, f"state tensor {k}")
        else:
            assert v == w, f"state entry {k}: {v!r} -> {w!r}"
    assert n_tensors > 0


def grad_matrix(linear: nn.Linear) -> Tensor:
    return torch.cat([linear.weight.grad, linear.bias.grad[:, None]], 1).detach().clone()


def param_matrix(linear: nn.Linear) -> Tensor:
    return torch.cat([linear.weight, linear.bias[:, None]], 1).detach().clone()


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


class RecordWarnings:
    """Record every warning (no de-duplication), as a context manager."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self.records = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

    def of(self, category, text: str = "") -> list[str]:
        return [str(w.message) for w in self.records if issubclass(w.category, category) and text in str(w.message)]


EXACT = dict(momentum=0.0, weight_decay=0.0, factor_decay=0.0, eigen_every=1, factor_every=1, kl_clip=None)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
BAD_ARGS = [
    ("lr", -0.1), ("lr", float("nan")), ("lr", "0.1"),
    ("damping", -1e-3), ("damping", 0.0), ("damping", float("inf")),
    ("factor_decay", 1.0), ("factor_decay", -0.1), ("factor_decay", 1.5),
    ("momentum", 1.0), ("momentum", -0.1),
    ("weight_decay", -1e-4),
    ("curvature", "shampoo"), ("scaling", "exact"), ("backend", "cuda"),
    ("factor_every", 0), ("factor_every", 1.5), ("factor_every", True),
    ("eigen_every", 0), ("eigen_every", -3), ("eigen_every", 2.0),
    ("kl_clip", 0.0), ("kl_clip", -1.0),
    ("effective_damping", "yes"),
]


@pytest.mark.parametrize(("name", "value"), BAD_ARGS, ids=[f"{n}={v!r}" for n, v in BAD_ARGS])
def test_bad_argument_raises_naming_it(name, value):
    with pytest.raises((ValueError, TypeError), match=name):
        EKFAC(mlp(), **{name: value})


@pytest.mark.parametrize(("name", "value"), [("damping", 0.0), ("factor_decay", 1.0), ("curvature", "x"),
                                             ("eigen_every", 0), ("kl_clip", -1.0), ("scaling", "x")])
def test_preconditioner_bad_argument_raises_naming_it(name, value):
    with pytest.raises(ValueError, match=name):
        Preconditioner(mlp(), **{name: value})


def test_triton_backend_on_cpu_model_raises():
    with pytest.raises(ValueError, match="backend"):
        EKFAC(mlp(), backend="triton")


def test_model_without_supported_layer_raises():
    with pytest.raises(ValueError, match="model"):
        EKFAC(nn.Sequential(nn.LayerNorm(4), nn.Tanh()))


@pytest.mark.parametrize("not_a_model", [[nn.Parameter(torch.zeros(3))], None, "model"])
def test_non_module_model_raises(not_a_model):
    with pytest.raises(TypeError, match="model"):
        EKFAC(not_a_model)


def test_weight_and_bias_split_across_groups_raises():
    model = mlp()
    first = model[0]
    rest = [p for p in model.parameters() if p is not first.weight]
    with pytest.raises(ValueError, match="params"):
        EKFAC(model, params=[{"params": [first.weight], "lr": 0.1}, {"params": rest}])


@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
def test_effective_damping_needs_tekfac(curvature):
    with pytest.raises(ValueError, match="effective_damping"):
        EKFAC(mlp(), curvature=curvature, effective_damping=True)
    TEKFAC(mlp(), effective_damping=True)  # fine


def test_presets_refuse_other_curvatures():
    with pytest.raises(ValueError, match="curvature"):
        KFAC(mlp(), curvature="ekfac")
    with pytest.raises(ValueError, match="curvature"):
        TEKFAC(mlp(), curvature="kfac")
    assert KFAC(mlp()).preconditioner.config.curvature == "kfac"
    assert TEKFAC(mlp()).preconditioner.config.curvature == "tekfac"


def _without_last_layer() -> tuple[nn.Sequential, EKFAC]:
    model = mlp()
    last = model[-1]
    return model, EKFAC(model, params=[p for p in model.parameters() if p is not last.weight and p is not last.bias])


@pytest.mark.parametrize(("name", "value"), [("lr", -1.0), ("damping", 0.0), ("momentum", 1.0),
                                             ("weight_decay", -0.5)])
def test_add_param_group_validates(name, value):
    model, opt = _without_last_layer()
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": list(model[-1].parameters()), name: value})


def test_add_param_group_fills_defaults():
    model, opt = _without_last_layer()
    opt.add_param_group({"params": list(model[-1].parameters()), "lr": 0.01})
    assert opt.param_groups[-1]["lr"] == 0.01 and opt.param_groups[-1]["damping"] == opt.defaults["damping"]


def test_rejected_param_group_is_not_added():
    model, opt = _without_last_layer()
    n_groups = len(opt.param_groups)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": list(model[-1].parameters()), "lr": -1.0})
    assert len(opt.param_groups) == n_groups


# ---------------------------------------------------------------------------------------------
# non-finite steps are skipped
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "tekfac"])
@pytest.mark.parametrize("factor_every", [1, 2])
@pytest.mark.parametrize("how", ["nan_input", "inf_grad_preconditioned", "inf_grad_plain", "nan_bias_grad"])
def test_non_finite_step_is_skipped(how, factor_every, curvature):
    model = mlp(norm=True)
    opt = EKFAC(model, lr=0.05, curvature=curvature, momentum=0.9, weight_decay=1e-3, factor_every=factor_every,
                eigen_every=2)
    for i in range(3):  # non-trivial state: momentum buffers, EMAs, a basis
        train_step(model, opt, *batch(9, i))
    pre = opt.preconditioner
    steps, skipped = pre.steps, pre.skipped_steps
    params, state = params_of(model), snapshot(opt)

    x, y = batch(9, 10)
    if how == "nan_input":
        x[4, 2] = float("nan")
    opt.zero_grad()
    half_mse(model(x), y).backward()
    if how == "inf_grad_preconditioned":
        model[3].weight.grad[1, 2] = float("inf")
    elif how == "inf_grad_plain":
        model[1].weight.grad[0] = float("-inf")  # the LayerNorm: not preconditioned
    elif how == "nan_bias_grad":
        model[-1].bias.grad[0] = float("nan")
    with RecordWarnings() as rec:
        opt.step()
    assert len(rec.of(RuntimeWarning)) == 1, "one RuntimeWarning for the skipped step"
    for i, (p, q) in enumerate(zip(model.parameters(), params)):
        assert_bitwise_equal(p.detach(), q, f"parameter {i} after the skipped step")
    assert_same_state(state, snapshot(opt), ignore=("skipped_steps",))
    assert pre.steps == steps
    assert pre.skipped_steps == skipped + 1

    # training continues normally
    train_step(model, opt, *batch(9, 11))
    assert pre.skipped_steps == skipped + 1 and pre.steps == steps + 1
    after = params_of(model)
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(p, q) for p, q in zip(after, params))
    for k, v in leaves(opt.state_dict()):
        if isinstance(v, Tensor):
            assert torch.isfinite(v).all(), f"state tensor {k} is not finite"


def test_preconditioner_mode_skips_non_finite_step():
    model = mlp()
    pre = Preconditioner(model, damping=1e-2)
    x, y = batch(9, 0)
    x[0, 0] = float("inf")
    half_mse(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with RecordWarnings() as rec:
        assert pre.step() is False
    assert len(rec.of(RuntimeWarning)) == 1
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad.nan_to_num(), g.nan_to_num())  # gradients left untouched
    assert pre.skipped_steps == 1 and pre.steps == 0


# ---------------------------------------------------------------------------------------------
# failed eigendecompositions
# ---------------------------------------------------------------------------------------------
def _failing_eigh(monkeypatch, when):
    real = torch.linalg.eigh
    calls = {"n": 0, "failed": 0}

    def fake(a, *args, **kwargs):
        calls["n"] += 1
        if when(a):
            calls["failed"] += 1
            raise torch.linalg.LinAlgError("injected failure")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fake)
    return calls


def _check_eigenbasis(factor: Tensor, q: Tensor, values: Tensor, tol: float) -> None:
    f, q, lam = factor.double(), q.double(), values.double()
    scale = max(1.0, f.abs().max().item())
    assert_allclose(f @ q, q * lam, atol=tol * scale, rtol=0, what="A Q = Q diag(λ)")
    assert_allclose(q.T @ q, torch.eye(q.shape[0], dtype=torch.float64), atol=tol, rtol=0, what="QᵀQ = I")


@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "tekfac"])
def test_eigh_float32_failure_retries_in_float64(monkeypatch, curvature):
    model = mlp(torch.float32)
    opt = EKFAC(model, lr=0.05, curvature=curvature, eigen_every=1)
    calls = _failing_eigh(monkeypatch, lambda a: a.dtype == torch.float32)
    with RecordWarnings() as rec:
        for i in range(3):
            train_step(model, opt, *batch(9, i, torch.float32))
    assert calls["failed"] == 3 * 3 * 2 and calls["n"] == 2 * calls["failed"]
    msgs = rec.of(RuntimeWarning, "eigendecomposition")
    assert len(msgs) == 3, "one warning per layer, not per step"
    assert sorted(m.split("'")[1] for m in msgs) == sorted(opt.preconditioned_modules())
    for layer in opt.preconditioner.layers:
        c = layer.curvature
        assert c.q_in.dtype == torch.float32
        _check_eigenbasis(c.in_factor, c.q_in, c.in_eigenvalues, 1e-5)
        _check_eigenbasis(c.out_factor, c.q_out, c.out_eigenvalues, 1e-5)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "tekfac"])
def test_eigh_failure_keeps_previous_basis(monkeypatch, curvature):
    model = mlp(torch.float32)
    opt = EKFAC(model, lr=0.05, curvature=curvature, eigen_every=1)
    train_step(model, opt, *batch(9, 0, torch.float32))
    bases = [(c.q_in.clone(), c.q_out.clone(), c.in_eigenvalues.clone(), c.out_eigenvalues.clone())
             for c in (layer.curvature for layer in opt.preconditioner.layers)]
    calls = _failing_eigh(monkeypatch, lambda a: True)
    before = params_of(model)
    with RecordWarnings() as rec:
        for i in range(1, 4):
            train_step(model, opt, *batch(9, i, torch.float32))
    assert calls["failed"] > 0
    assert len(rec.of(RuntimeWarning, "eigendecomposition")) == 3, "one warning per layer, not per step"
    for layer, saved in zip(opt.preconditioner.layers, bases):
        c = layer.curvature
        for now, then, what in zip((c.q_in, c.q_out, c.in_eigenvalues, c.out_eigenvalues), saved,
                                   ("q_in", "q_out", "in_eigenvalues", "out_eigenvalues")):
            assert_bitwise_equal(now, then, f"{layer.name}.{what}")
    after = params_of(model)
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(p, q) for p, q in zip(after, before))


@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "tekfac"])
def test_eigh_failure_on_first_step_uses_identity_basis(monkeypatch, curvature):
    model = mlp(torch.float32)
    opt = EKFAC(model, lr=0.05, curvature=curvature, eigen_every=1)
    _failing_eigh(monkeypatch, lambda a: True)
    before = params_of(model)
    with RecordWarnings() as rec:
        train_step(model, opt, *batch(9, 0, torch.float32))
        for layer in opt.preconditioner.layers:
            c = layer.curvature
            assert_bitwise_equal(c.q_in, torch.eye(c.q_in.shape[0]), f"{layer.name}.q_in")
            assert_bitwise_equal(c.q_out, torch.eye(c.q_out.shape[0]), f"{layer.name}.q_out")
            assert_bitwise_equal(c.in_eigenvalues, c.in_factor.diagonal(), f"{layer.name}.in_eigenvalues")
            assert_bitwise_equal(c.out_eigenvalues, c.out_factor.diagonal(), f"{layer.name}.out_eigenvalues")
        after = params_of(model)
        assert all(torch.isfinite(p).all() for p in after)
        assert all(not torch.equal(p, q) for p, q in zip(after, before))
        for i in range(1, 3):
            train_step(model, opt, *batch(9, i, torch.float32))
    assert len(rec.of(RuntimeWarning, "eigendecomposition")) == 3, "one warning per layer, not per step"
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# amortisation
# ---------------------------------------------------------------------------------------------
def test_eigen_every_is_honoured(monkeypatch):
    model = mlp()
    opt = EKFAC(model, lr=0.01, eigen_every=5, stagger=False)
    calls = _failing_eigh(monkeypatch, lambda a: False)
    seen = []
    for i in range(12):
        n0 = calls["n"]
        train_step(model, opt, *batch(9, i))
        seen.append(calls["n"] - n0)
    assert seen == [6 if i % 5 == 0 else 0 for i in range(12)]  # 2 per layer per refresh, 3 layers
    assert calls["n"] == 18


@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "tekfac"])
def test_factor_every_is_honoured(curvature):
    model = mlp()
    opt = EKFAC(model, lr=0.01, curvature=curvature, factor_every=3, eigen_every=4)
    counts = []
    for i in range(12):
        train_step(model, opt, *batch(9, i))
        counts.append(opt.preconditioner.layers[0].curvature.factor_updates)
    assert counts == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    for layer in opt.preconditioner.layers:
        assert layer.curvature.factor_updates == 4


# ---------------------------------------------------------------------------------------------
# EMA semantics and the batch scaling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
def test_factor_ema_is_bias_corrected(curvature):
    beta = 0.8
    model = mlp()
    opt = EKFAC(model, lr=0.05, curvature=curvature, factor_decay=beta, momentum=0.5, eigen_every=1)
    first, last = model[0], model[-1]
    estimates_a, estimates_g = [], []
    for i, n in enumerate((5, 11)):
        x, y = batch(n, i)
        xbar = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
        estimates_a.append(xbar.T @ xbar / n)
        with torch.no_grad():
            ghat = model(x) - y  # ĝ_n = ∂ℓ_n/∂z_n of ℓ_n = ½‖z_n − y_n‖² at the last layer
        estimates_g.append(ghat.T @ ghat / n)
        train_step(model, opt, x, y)
        c_first = opt.preconditioner.layers[0].curvature
        c_last = opt.preconditioner.layers[-1].curvature
        if i == 0:
            assert_allclose(c_first.in_factor, estimates_a[0], 1e-13, 1e-12, "A after one update")
            assert_allclose(c_last.out_factor, estimates_g[0], 1e-13, 1e-12, "G after one update")
    ema_a = (beta * (1 - beta) * estimates_a[0] + (1 - beta) * estimates_a[1]) / (1 - beta**2)
    ema_g = (beta * (1 - beta) * estimates_g[0] + (1 - beta) * estimates_g[1]) / (1 - beta**2)
    assert_allclose(c_first.in_factor, ema_a, 1e-13, 1e-12, "A after two updates")
    assert_allclose(c_last.out_factor, ema_g, 1e-13, 1e-12, "G after two updates")
    assert first is opt.preconditioner.layers[0].adapter.module and last is opt.preconditioner.layers[-1].adapter.module


@pytest.mark.parametrize("curvature", ["ekfac", "tekfac"])
def test_batch_scaling(curvature):
    beta, lr, damping = 0.7, 0.05, 1e-2
    model = mlp()
    opt = EKFAC(model, lr=lr, damping=damping, curvature=curvature, scaling="batch", factor_decay=beta,
                momentum=0.0, eigen_every=100, kl_clip=None)
    pre = opt.preconditioner
    history = []
    for i, n in enumerate((5, 8)):
        x, y = batch(n, i)
        opt.zero_grad()
        half_mse(model(x), y).backward()
        grads = [grad_matrix(m) for m in linears(model)]
        before = [param_matrix(m) for m in linears(model)]
        if i == 1:
            bases = [(l.curvature.q_in.clone(), l.curvature.q_out.clone()) for l in pre.layers]
        opt.step()
        for j, layer in enumerate(pre.layers):
            c = layer.curvature
            if i == 1:
                assert_bitwise_equal(c.q_in, bases[j][0], "q_in (no refresh)")
                assert_bitwise_equal(c.q_out, bases[j][1], "q_out (no refresh)")
            p = c.q_out.T @ grads[j] @ c.q_in
            if i == 0:
                history.append(n * p.square())
                expected = history[j]
            else:
                expected = (beta * (1 - beta) * history[j] + (1 - beta) * n * p.square()) / (1 - beta**2)
            assert_allclose(c.scaling, expected, 1e-12, 1e-10, f"S of {layer.name} after step {i}")
            step = -lr * c.q_out @ (p / (expected + damping)) @ c.q_in.T
            assert_allclose(param_matrix(linears(model)[j]) - before[j], step, 1e-12, 1e-9, f"update of {layer.name}")


# ---------------------------------------------------------------------------------------------
# state_dict round trip
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("curvature", "scaling"), [("ekfac", "per_example"), ("ekfac", "batch"),
                                                    ("tekfac", "per_example"), ("kfac", "per_example")])
def test_state_dict_round_trip(curvature, scaling):
    kwargs = dict(lr=0.05, damping=1e-2, curvature=curvature, scaling=scaling, momentum=0.9, weight_decay=1e-3,
                  factor_decay=0.9, factor_every=2, eigen_every=2)
    model = conv_net()
    opt = EKFAC(model, **kwargs)
    for i in range(3):
        train_step(model, opt, *batch(7, i, torch.float32, image=True))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)

    restored = conv_net(seed=123)
    opt2 = EKFAC(restored, **kwargs)
    restored.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.preconditioner.steps == opt.preconditioner.steps == 3
    for i in range(3, 6):
        x, y = batch(7, i, torch.float32, image=True)
        train_step(model, opt, x, y)
        train_step(restored, opt2, x, y)
        for (name, p), q in zip(model.named_parameters(), restored.parameters()):
            assert_bitwise_equal(q.detach(), p.detach(), f"{name} after step {i}")
    assert_same_state(snapshot(opt), snapshot(opt2))


def test_load_state_dict_rejects_foreign_state():
    opt = EKFAC(mlp(), lr=0.1)
    with pytest.raises(ValueError, match="preconditioner"):
        opt.load_state_dict(torch.optim.SGD(mlp().parameters(), lr=0.1).state_dict())
    other = EKFAC(mlp(), curvature="kfac")
    with pytest.raises(ValueError, match="curvature"):
        opt.load_state_dict(other.state_dict())


# ---------------------------------------------------------------------------------------------
# param groups, schedulers, zero_grad
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "tekfac"])
def test_param_groups_use_their_own_lr_and_damping(curvature):
    g0 = dict(lr=0.1, damping=1e-2)
    g1 = dict(lr=0.01, damping=1e-3)
    model = mlp(norm=True)
    first = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    opt = EKFAC(model, curvature=curvature, params=[{"params": first, **g0}, {"params": rest}], **g1, **EXACT)
    ref0, ref1 = copy.deepcopy(model), copy.deepcopy(model)
    opt0 = EKFAC(ref0, curvature=curvature, **g0, **EXACT)
    opt1 = EKFAC(ref1, curvature=curvature, **g1, **EXACT)
    x, y = batch(9, 0)
    for m, o in ((model, opt), (ref0, opt0), (ref1, opt1)):
        train_step(m, o, x, y)
    n_first = len(first)
    for i, (p, p0, p1) in enumerate(zip(model.parameters(), ref0.parameters(), ref1.parameters())):
        expected, other = (p0, p1) if i < n_first else (p1, p0)
        assert_bitwise_equal(p.detach(), expected.detach(), f"parameter {i}")
        assert not torch.equal(p, other), f"parameter {i}: the groups' settings made no difference"


def test_lr_scheduler_changes_the_step():
    model = mlp(norm=True)
    ref = copy.deepcopy(model)
    opt = EKFAC(model, lr=0.1, **EXACT)
    opt_ref = EKFAC(ref, lr=0.1, **EXACT)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch(9, 0)
    train_step(model, opt, x, y)
    train_step(ref, opt_ref, x, y)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_bitwise_equal(p.detach(), q.detach(), "after the first step")
    before = params_of(model)
    x, y = batch(9, 1)
    train_step(model, opt, x, y)
    train_step(ref, opt_ref, x, y)
    for p, q, b in zip(model.parameters(), ref.parameters(), before):
        assert_allclose(p.detach() - b, 0.5 * (q.detach() - b), 1e-14, 1e-9, "step with the scheduled lr")


def test_zero_grad_set_to_none():
    model = mlp()
    opt = EKFAC(model)
    x, y = batch(9, 0)
    half_mse(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# introspection, unsupported layers, hooks
# ---------------------------------------------------------------------------------------------
def grouped_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
                         nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, D_OUT))


def test_preconditioned_modules_repr_and_grouped_conv():
    model = grouped_net()
    with RecordWarnings() as rec:
        opt = EKFAC(model, lr=0.1, momentum=0.9)
    msgs = rec.of(UserWarning, "not preconditioned")
    assert len(msgs) == 1 and "'2'" in msgs[0] and "groups" in msgs[0]
    assert opt.preconditioned_modules() == ["0", "4", "6"]
    text = repr(opt)
    for name in ("Conv2d(2, 4", "Linear(in_features=4, out_features=5", "not preconditioned 2"):
        assert name in text
    x = torch.randn(7, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    y = torch.randn(7, D_OUT, generator=torch.Generator().manual_seed(1))
    grouped = model[2]
    w, b = grouped.weight.detach().clone(), grouped.bias.detach().clone()
    opt.zero_grad()
    half_mse(model(x), y).backward()
    gw, gb = grouped.weight.grad.clone(), grouped.bias.grad.clone()
    opt.step()
    assert_bitwise_equal(grouped.weight.detach(), w.add(gw, alpha=-0.1), "grouped conv weight (plain momentum update)")
    assert_bitwise_equal(grouped.bias.detach(), b.add(gb, alpha=-0.1), "grouped conv bias (plain momentum update)")


def test_remove_hooks():
    model = grouped_net()
    with RecordWarnings():
        opt = EKFAC(model)
    assert all(len(model[i]._forward_hooks) == 1 for i in (0, 4, 6))
    opt.remove_hooks()
    for m in model.modules():
        assert len(m._forward_hooks) == 0


# ---------------------------------------------------------------------------------------------
# Preconditioner with a plain torch optimizer; KL clipping
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "tekfac"])
def test_preconditioner_with_sgd_equals_ekfac(curvature):
    lr, damping = 0.05, 1e-2
    model = mlp(torch.float32, norm=True)
    ref = copy.deepcopy(model)
    pre = Preconditioner(model, damping=damping, curvature=curvature, factor_decay=0.0, eigen_every=1)
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0, foreach=False)
    opt = EKFAC(ref, lr=lr, damping=damping, curvature=curvature, **EXACT)
    for i in range(3):
        x, y = batch(9, i, torch.float32)
        sgd.zero_grad()
        half_mse(model(x), y).backward()
        assert pre.step() is True
        sgd.step()
        train_step(ref, opt, x, y)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert_bitwise_equal(p.detach(), q.detach(), f"{name} after step {i}")


def _kl_run(kl_clip, lr=0.1):
    model = mlp(norm=True)
    opt = EKFAC(model, lr=lr, damping=1e-2, **{**EXACT, "kl_clip": kl_clip})
    x, y = batch(9, 0)
    opt.zero_grad()
    half_mse(model(x), y).backward()
    grads = {id(m): grad_matrix(m) for m in linears(model)}
    before = params_of(model)
    opt.step()
    return model, grads, [p.detach() - b for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("kl_clip", [1e-6, 1e-4])
def test_kl_clip_scales_preconditioned_directions(kl_clip):
    lr = 0.1
    model, grads, delta_none = _kl_run(None, lr)
    _, _, delta_clip = _kl_run(kl_clip, lr)
    # ν from the unclipped directions v = -Δ/lr and the raw gradients
    names = [n for n, _ in model.named_parameters()]
    delta = dict(zip(names, delta_none))
    total = 0.0
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            v = -torch.cat([delta[f"{i}.weight"], delta[f"{i}.bias"][:, None]], 1) / lr
            total += lr * lr * (v * grads[id(m)]).sum().item()
    nu = min(1.0, math.sqrt(kl_clip / abs(total)))
    assert nu < 0.5, "the test needs an active clip"
    for name, dn, dc in zip(names, delta_none, delta_clip):
        if name.startswith("1."):  # the LayerNorm: plain update, not scaled
            assert_bitwise_equal(dc, dn, f"{name} (not preconditioned)")
        else:
            assert_allclose(dc, nu * dn, 1e-15, 1e-9, f"{name} (preconditioned)")


def test_kl_clip_inactive_when_large():
    _, _, delta_none = _kl_run(None)
    _, _, delta_clip = _kl_run(1e6)
    for dn, dc in zip(delta_none, delta_clip):
        assert_bitwise_equal(dc, dn, "update with an inactive clip")


# ---------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling", ["per_example", "batch"])
def test_no_grad_evaluation_does_not_disturb_capture(scaling):
    model = mlp(norm=True)
    ref = copy.deepcopy(model)
    kwargs = dict(lr=0.05, scaling=scaling, eigen_every=2)
    opt, opt_ref = EKFAC(model, **kwargs), EKFAC(ref, **kwargs)
    for i in range(4):
        x, y = batch(9, i)
        opt.zero_grad()
        half_mse(model(x), y).backward()
        with torch.no_grad():  # an evaluation between backward and step, another batch size
            model(batch(4, 100 + i)[0])
        opt.step()
        with torch.no_grad():  # and between steps
            model(batch(13, 200 + i)[0])
        train_step(ref, opt_ref, x, y)
        for p, q in zip(model.parameters(), ref.parameters()):
            assert_bitwise_equal(p.detach(), q.detach(), f"after step {i}")


def test_forward_before_step_and_backward_after_raises():
    """A backward whose forward ran before the last step: the capture saw the gradient arrive but
    has no input of this step (the statistics would mix two batches)."""
    model = mlp()
    opt = EKFAC(model)
    x, y = batch(9, 0)
    half_mse(model(x), y).backward()
    opt.step()
    for layer in opt.preconditioner.layers:  # as on a step without statistics (factor_every > 1)
        layer.capture.enabled = False
    loss = half_mse(model(x), y)
    opt.zero_grad()
    opt.preconditioner._arm_capture()  # a step between this forward and its backward would re-arm
    loss.backward()
    with pytest.raises(RuntimeError, match="forward ran before the last step"):
        opt.step()


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(D_IN, D_IN)
        self.head = nn.Linear(D_IN, D_OUT)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_module_called_twice_raises():
    model = Twice().double()
    opt = EKFAC(model)
    x, y = batch(9, 0)
    half_mse(model(x), y).backward()
    with pytest.raises(RuntimeError, match="shared"):
        opt.step()


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "tekfac"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_models(dtype, curvature):
    model = conv_net(dtype)
    opt = EKFAC(model, lr=0.05, curvature=curvature, eigen_every=2)
    before = params_of(model)
    for i in range(3):
        x, y = batch(7, i, dtype, image=True)
        opt.zero_grad()
        loss = ((model(x).float() - y.float()).square().sum() / (2 * x.shape[0]))
        loss.backward()
        opt.step()
    for layer in opt.preconditioner.layers:
        assert layer.curvature.in_factor.dtype == torch.float32
        assert layer.curvature.q_in.dtype == torch.float32
    for p, b in zip(model.parameters(), before):
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
        assert not torch.equal(p, b)
    assert opt.preconditioner.skipped_steps == 0


def test_package_exports():
    assert set(ekfac_triton.__all__) >= {"EKFAC", "KFAC", "TEKFAC", "Preconditioner"}
    assert issubclass(EKFAC, torch.optim.Optimizer)


def test_step_with_closure_returns_loss():
    model = mlp()
    opt = EKFAC(model, lr=0.05)
    x, y = batch(9, 0)

    def closure():
        opt.zero_grad()
        loss = half_mse(model(x), y)
        loss.backward()
        return loss

    before = params_of(model)
    loss = opt.step(closure)
    assert isinstance(loss, Tensor) and torch.isfinite(loss)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_preconditioner_kl_clip_without_lr_raises_at_construction():
    with pytest.raises(ValueError, match="lr"):
        Preconditioner(mlp(), kl_clip=1e-3)


def test_grad_enabled_forward_before_step_does_not_change_batch_scaling():
    model = mlp()
    ref = copy.deepcopy(model)
    opt = EKFAC(model, lr=0.05, scaling="batch", momentum=0.0)
    opt_ref = EKFAC(ref, lr=0.05, scaling="batch", momentum=0.0)
    x, y = batch(9, 0)
    opt.zero_grad()
    half_mse(model(x), y).backward()
    model(batch(2, 1)[0])  # e.g. a metric computed without torch.no_grad()
    opt.step()
    train_step(ref, opt_ref, x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_bitwise_equal(p.detach(), q.detach(), "parameters")
