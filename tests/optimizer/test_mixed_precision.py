"""Mixed precision: factor_dtype / basis_dtype, autocast (bf16 on CPU) and
torch.amp.GradScaler (fp16 recipe; inf steps skipped with the state untouched)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

from ekfac_triton import EKFAC, Preconditioner
from tests.helpers import assert_bitwise_equal, make_mlp, seeded_batch


def mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    return make_mlp([6, 16, 12, 3], seed=seed, dtype=dtype)


def batch(n: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    return seeded_batch(n, (6,), 3, 200 + seed, dtype)


def mse(out: Tensor, y: Tensor) -> Tensor:
    return (out.float() - y.float()).square().sum() / (2 * out.shape[0])


def state_tensors(opt: EKFAC) -> list[tuple[str, Tensor]]:
    """Every tensor of the optimizer's state, with a name."""
    out = []
    for i, layer in enumerate(opt.preconditioner.layers):
        for k, v in layer.curvature.state_dict().items():
            if isinstance(v, Tensor):
                out.append((f"layer{i}.{k}", v.detach().clone()))
    for p, st in opt.state.items():
        for k, v in st.items():
            out.append((f"state.{k}", v.detach().clone()))
    return out


# ---------------------------------------------------------------------------------------------
# factor_dtype / basis_dtype
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["factor_dtype", "basis_dtype"])
@pytest.mark.parametrize("value", [torch.float16, torch.bfloat16, torch.int32, "float32"])
def test_bad_state_dtype_raises_naming_it(name, value):
    with pytest.raises(ValueError, match=name):
        EKFAC(mlp(), **{name: value})
    with pytest.raises(ValueError, match=name):
        Preconditioner(mlp(), **{name: value})


@pytest.mark.parametrize("model_dtype, expected", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                    (torch.bfloat16, torch.float32)])
def test_default_dtypes_unchanged(model_dtype, expected):
    model = mlp(model_dtype)
    opt = EKFAC(model, eigen_every=1)
    x, y = batch(16, 0, model_dtype)
    mse(model(x), y).backward()
    opt.step()
    curv = opt.preconditioner.layers[0].curvature
    assert curv.in_factor.dtype == curv.out_factor.dtype == expected
    assert curv.q_in.dtype == curv.q_out.dtype == curv.scaling.dtype == curv.in_eigenvalues.dtype == expected


@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "tekfac"])
@pytest.mark.parametrize("factor_dtype, basis_dtype", [(torch.float64, None), (torch.float64, torch.float32),
                                                       (torch.float32, torch.float64)])
def test_configured_dtypes_are_used_and_agree_with_float64(curvature, factor_dtype, basis_dtype):
    """A float32 model with the state in the requested dtypes trains like the all-float64 run."""
    runs = {}
    for key, kwargs in (("ref", dict(factor_dtype=torch.float64)), ("run", dict(factor_dtype=factor_dtype,
                                                                                  basis_dtype=basis_dtype))):
        model = mlp(torch.float32)
        opt = EKFAC(model, lr=0.05, damping=1e-2, eigen_every=2, curvature=curvature, **kwargs)
        for step in range(4):
            x, y = batch(32, step)
            opt.zero_grad()
            mse(model(x), y).backward()
            opt.step()
        runs[key] = (model, opt)
    curv = runs["run"][1].preconditioner.layers[1].curvature
    assert curv.in_factor.dtype == curv.out_factor.dtype == factor_dtype
    basis = basis_dtype or factor_dtype
    assert curv.q_in.dtype == curv.q_out.dtype == curv.scaling.dtype == basis
    for p, q in zip(runs["run"][0].parameters(), runs["ref"][0].parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)


def test_state_dict_round_trip_keeps_configured_dtypes():
    model = mlp()
    opt = EKFAC(model, factor_dtype=torch.float64, basis_dtype=torch.float32, eigen_every=1)
    x, y = batch(16, 0)
    mse(model(x), y).backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    other = EKFAC(mlp(), factor_dtype=torch.float64, basis_dtype=torch.float32, eigen_every=1)
    other.load_state_dict(saved)
    curv = other.preconditioner.layers[0].curvature
    assert curv.in_factor.dtype == torch.float64 and curv.q_in.dtype == curv.scaling.dtype == torch.float32
    torch.testing.assert_close(curv.q_in, opt.preconditioner.layers[0].curvature.q_in, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# autocast (bf16 on CPU)
# ---------------------------------------------------------------------------------------------
def train_autocast(autocast_dtype: torch.dtype | None, steps: int = 6, compiled: bool = False) -> tuple[list, EKFAC]:
    model = mlp(torch.float32)
    opt = EKFAC(model, lr=0.05, damping=1e-2, eigen_every=2)
    run = torch.compile(model, fullgraph=True) if compiled else model
    losses = []
    for step in range(steps):
        x, y = batch(32, 0)  # one batch: a run that visibly trains
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = mse(run(x), y)
        loss.backward()
        if step == 0:
            captured = [(layer.capture.inputs.dtype, layer.capture.grad_output.dtype)
                        for layer in opt.preconditioner.layers]
        opt.step()
        losses.append(loss.item())
    return losses, opt, captured


def test_autocast_bf16_finite_and_close_to_fp32():
    ref, opt_ref, _ = train_autocast(None)
    losses, opt, captured = train_autocast(torch.bfloat16)
    # the statistics really came from bf16 activations and output-gradients ...
    assert captured[1] == (torch.bfloat16, torch.bfloat16) and captured[2] == (torch.bfloat16, torch.bfloat16)
    # ... and accumulated in float32
    for layer in opt.preconditioner.layers:
        assert layer.curvature.in_factor.dtype == layer.curvature.out_factor.dtype == torch.float32
        assert all(torch.isfinite(t).all() for t in (layer.curvature.in_factor, layer.curvature.scaling))
    assert all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), atol=0.03, rtol=0.03)
    assert losses[-1] < 0.9 * losses[0]
    # factors within bf16's resolution of the fp32 ones
    for a, b in zip(opt.preconditioner.layers, opt_ref.preconditioner.layers):
        torch.testing.assert_close(a.curvature.in_factor, b.curvature.in_factor, atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_autocast_bf16_compiled_model_no_graph_break():
    torch._dynamo.reset()
    ref, _, _ = train_autocast(torch.bfloat16, steps=4)
    losses, _, captured = train_autocast(torch.bfloat16, steps=4, compiled=True)
    torch._dynamo.reset()
    assert captured[2] == (torch.bfloat16, torch.bfloat16)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), atol=0.03, rtol=0.03)


def test_step_inside_autocast_region_runs_in_state_dtypes():
    """A step called (by mistake) inside autocast still preconditions in float32."""
    runs = []
    for inside in (False, True):
        model = mlp()
        opt = EKFAC(model, eigen_every=1)
        x, y = batch(32, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mse(model(x), y)
            loss.backward()
            if inside:
                opt.step()
        if not inside:
            opt.step()
        runs.append(list(model.parameters()))
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# GradScaler
# ---------------------------------------------------------------------------------------------
def train_scaled(unscale_first: bool | None, steps: int = 5, dtype=torch.float64,
                 pass_scaler: bool = True, init_scale: float = 2.0**12) -> tuple[nn.Module, EKFAC]:
    """``unscale_first`` None: no scaler; True/False: the GradScaler recipe with/without
    ``scaler.unscale_(opt)`` before ``scaler.step(opt)``; ``pass_scaler``: the scaler is also
    given as ``grad_scaler=`` (the documented path)."""
    model = mlp(dtype)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if unscale_first is not None else None
    opt = EKFAC(model, lr=0.05, damping=1e-2, eigen_every=2, grad_scaler=scaler if pass_scaler else None)
    for step in range(steps):
        x, y = batch(32, step, dtype)
        opt.zero_grad()
        loss = mse(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
            continue
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # what unscale_ is for
        scaler.step(opt)
        scaler.update()
    return model, opt


@pytest.mark.parametrize("unscale_first", [True, False])
def test_grad_scaler_gives_the_unscaled_trajectory(unscale_first):
    """A power-of-two loss scale is exact: gradients and captured output-gradients are unscaled,
    so the run equals the one without a scaler (float64)."""
    model_ref, opt_ref = train_scaled(None)
    model, opt = train_scaled(unscale_first)
    assert opt.preconditioner.steps == 5 and opt.preconditioner.skipped_steps == 0
    for (name, a), (_, b) in zip(state_tensors(opt), state_tensors(opt_ref)):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-11, msg=lambda m: f"{name}: {m}")
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-13, rtol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaler_step_without_grad_scaler_equals_the_documented_path(dtype):
    """``scaler.step(opt)`` of an optimizer built without ``grad_scaler=`` (torch's protocol
    hands it the scale) gives bit-for-bit the run of the documented ``grad_scaler=scaler`` path
    (a scale that is not a power of two, so any difference in the unscaling would show)."""
    model_ref, opt_ref = train_scaled(False, dtype=dtype, init_scale=3000.0)
    model, opt = train_scaled(False, dtype=dtype, pass_scaler=False, init_scale=3000.0)
    assert opt.preconditioner.steps == 5
    for (name, a), (_, b) in zip(state_tensors(opt), state_tensors(opt_ref)):
        assert_bitwise_equal(a, b, name)
    for p, q in zip(model.parameters(), model_ref.parameters()):
        assert_bitwise_equal(p.detach(), q.detach(), "parameters")


def test_scaler_step_after_unscale_without_grad_scaler_raises():
    with pytest.raises(RuntimeError, match="built without grad_scaler=.*Pass grad_scaler=scaler"):
        train_scaled(True, pass_scaler=False)


@pytest.mark.parametrize("unscale_first", [True, False])
def test_grad_scaler_inf_step_leaves_state_untouched(unscale_first):
    model = mlp(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = EKFAC(model, lr=0.05, damping=1e-2, eigen_every=2, grad_scaler=scaler)

    def iteration(step: int, poison: bool) -> None:
        x, y = batch(32, step)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = mse(model(x), y)
        scaler.scale(loss).backward()
        if poison:  # an overflow in one gradient, as fp16 produces
            next(model.parameters()).grad[0, 0] = float("inf")
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()

    for step in range(3):
        iteration(step, poison=False)
    before_state, before_params = state_tensors(opt), [p.detach().clone() for p in model.parameters()]
    steps = opt.preconditioner.steps
    scale = scaler.get_scale()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a scaler-detected overflow is routine: no warning
        iteration(3, poison=True)
    assert scaler.get_scale() == scale / 2
    assert opt.preconditioner.steps == steps and opt.preconditioner.skipped_steps == 1
    for p, q in zip(model.parameters(), before_params):
        assert torch.equal(p, q)
    after = state_tensors(opt)
    assert [n for n, _ in after] == [n for n, _ in before_state]
    for (name, a), (_, b) in zip(after, before_state):
        assert torch.equal(a, b), name
    # training goes on (the skipped step's captures were dropped), finite
    for step in range(4, 7):
        iteration(step, poison=False)
    assert opt.preconditioner.steps == steps + 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_preconditioner_with_grad_scaler_and_sgd():
    """Preconditioner + torch SGD + GradScaler: unscale_, pre.step(), scaler.step(opt)."""
    runs = []
    for use_scaler in (False, True):
        model = mlp(torch.float64)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=use_scaler)
        pre = Preconditioner(model, damping=1e-2, eigen_every=1, grad_scaler=scaler)
        sgd = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(3):
            x, y = batch(32, step, torch.float64)
            sgd.zero_grad()
            scaler.scale(mse(model(x), y)).backward()
            scaler.unscale_(sgd)
            pre.step()
            scaler.step(sgd)
            scaler.update()
        runs.append(list(model.parameters()))
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, atol=1e-13, rtol=1e-11)
