"""Fault injection: a step is a transaction, state is exact and crash-safe, nothing fails silently.

Each test injects one fault that the optimizer used to mishandle (NaN parameters from finite
inputs, a batch overwritten before ``step()``, an inexact resume, a half-applied
``load_state_dict``, an optimizer bricked by one exception, a checkpoint lost to a crash,
unclear errors) and checks the state bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from ekfac_triton import EKFAC, KFAC, Preconditioner, load_checkpoint, save_checkpoint
from ekfac_triton import ops
from tests.helpers import curvature_tensors, make_mlp

DTYPE = torch.float64


def mlp(width: int = 6, dtype: torch.dtype = DTYPE, seed: int = 0) -> nn.Sequential:
    return make_mlp([4, width, 3], seed=seed, dtype=dtype)


def batch(step: int, dtype: torch.dtype = DTYPE, n: int = 16) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step, next(model.parameters()).dtype)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def snapshot(model: nn.Module, opt: EKFAC) -> list[Tensor]:
    """Every tensor the optimizer's step may change, cloned."""
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [s["momentum_buffer"].clone() for s in opt.state.values() if "momentum_buffer" in s]
    return tensors + [t.clone() for t in curvature_tensors(opt)]


def same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def interrupted(*args, **kwargs):
    """A stand-in for a kernel call that is interrupted (Ctrl-C)."""
    raise KeyboardInterrupt


def counts(opt: EKFAC) -> list[int]:
    pre = opt.preconditioner
    return [pre.steps, pre.skipped_steps] + [c for layer in pre.layers
                                              for c in (layer.curvature.factor_updates, layer.curvature.scaling_updates)]


# -- 1. the step is a transaction -------------------------------------------------------------------
@pytest.mark.parametrize("step", [3, 4])  # 3: no refresh (decided at the commit), 4: a refresh step
def test_overflowing_statistic_from_finite_inputs_is_skipped(step):
    """float32 activations of 1e20 are finite but overflow A = āāᵀ/N to inf: the step is skipped,
    every tensor stays bit for bit, and training goes on."""
    model = mlp(dtype=torch.float32)
    opt = EKFAC(model, lr=0.1, eigen_every=4, stagger=False)
    train(model, opt, range(step))
    before, before_counts = snapshot(model, opt), counts(opt)
    x, y = batch(step, torch.float32)
    x[0] = 1e20
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert torch.isfinite(model[0].weight.grad).all()  # the gradients themselves are finite
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert same(snapshot(model, opt), before)
    assert counts(opt)[0] == before_counts[0] and counts(opt)[1] == before_counts[1] + 1
    train(model, opt, range(step + 1, step + 3))
    assert all(torch.isfinite(t).all() for t in snapshot(model, opt))


def test_group_values_changed_after_construction_are_validated():
    model = mlp()
    opt = EKFAC(model)
    train(model, opt, range(2))
    before = snapshot(model, opt)
    opt.param_groups[0]["damping"] = 0.0
    with pytest.raises(ValueError, match="damping"):
        train(model, opt, range(2, 3))
    assert same(snapshot(model, opt), before)
    opt.param_groups[0]["damping"] = 1e-3
    train(model, opt, range(3, 4))  # usable again


# -- 2. capture integrity -------------------------------------------------------------------------------
def test_batch_overwritten_before_step_raises():
    model = mlp()
    opt = EKFAC(model)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    x.copy_(batch(1)[0])  # a loader reusing its buffer
    with pytest.raises(RuntimeError, match="modified in place"):
        opt.step()
    before = snapshot(model, opt)
    assert opt.preconditioner.steps == 0 and same(snapshot(model, opt), before)
    train(model, opt, range(2, 4))  # and the optimizer is still usable
    assert opt.preconditioner.steps == 2


# -- 3. exact resume -----------------------------------------------------------------------------------
def test_resume_with_warm_starts_is_exact():
    settings = dict(lr=0.1, eigen_every=2, warm_starts=2, stagger=False)
    model_a = mlp()
    opt_a = EKFAC(model_a, **settings)
    train(model_a, opt_a, range(12))
    model_b = mlp()
    opt_b = EKFAC(model_b, **settings)
    train(model_b, opt_b, range(4))  # refreshes at steps 0 (eigh) and 2 (warm): step 4 is warm again
    saved_model, saved_opt = copy.deepcopy(model_b.state_dict()), copy.deepcopy(opt_b.state_dict())
    model_c = mlp(seed=7)
    opt_c = EKFAC(model_c, **settings)
    model_c.load_state_dict(saved_model)
    opt_c.load_state_dict(saved_opt)
    train(model_c, opt_c, range(4, 12))
    assert same(snapshot(model_c, opt_c), snapshot(model_a, opt_a))


# -- 4. transactional load_state_dict --------------------------------------------------------------------------
@pytest.mark.parametrize("other", ["width", "curvature", "scaling", "dtype"])
def test_refused_load_state_dict_changes_nothing(other):
    model = mlp()
    opt = EKFAC(model)
    train(model, opt, range(3))
    source_model = {"width": mlp(width=8), "dtype": mlp(dtype=torch.float32)}.get(other, mlp())
    make = {"curvature": lambda m: KFAC(m), "scaling": lambda m: EKFAC(m, scaling="batch")}
    source_opt = make.get(other, lambda m: EKFAC(m))(source_model)
    train(source_model, source_opt, range(3))
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match={"width": "shape", "curvature": "curvature", "scaling": "scaling",
                                          "dtype": "float"}[other]):
        opt.load_state_dict(source_opt.state_dict())
    assert same(snapshot(model, opt), before)
    train(model, opt, range(3, 5))


# -- 5. exception safety -----------------------------------------------------------------------------
def test_refused_shared_module_does_not_brick_the_optimizer():
    """A module called twice in one graph is refused at the step (two backwards of their own
    are gradient accumulation: tests/optimizer/test_accumulation.py); the next steps work."""
    model = mlp()
    opt = EKFAC(model)
    train(model, opt, range(2))
    x, y = batch(2)
    nn.functional.cross_entropy(model(x) + model(x), y).backward()  # every layer twice in one graph
    with pytest.raises(RuntimeError, match="ran 2 times in one backward pass"):
        opt.step()
    train(model, opt, range(3, 6))
    assert opt.preconditioner.steps == 5


@pytest.mark.parametrize("where", ["statistics", "directions", "update"])
def test_interrupted_step_is_undone(monkeypatch, where):
    """KeyboardInterrupt inside step(): the state is as before that step, the counts agree, and
    the next steps give the same trajectory as a run that was never interrupted."""
    reference_model = mlp()
    reference = EKFAC(reference_model, lr=0.1, eigen_every=2)
    train(reference_model, reference, range(6))
    model = mlp()
    opt = EKFAC(model, lr=0.1, eigen_every=2)
    train(model, opt, range(3))
    before, before_counts = snapshot(model, opt), counts(opt)
    target = {"statistics": "factor_update", "directions": "precondition", "update": "moment_update"}[where]
    real = getattr(ops, target)

    monkeypatch.setattr(ops, target, interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(model, opt, range(3, 4))
    monkeypatch.setattr(ops, target, real)
    assert same(snapshot(model, opt), before) and counts(opt) == before_counts
    train(model, opt, range(3, 6))
    assert same(snapshot(model, opt), snapshot(reference_model, reference))


def test_failed_preconditioner_step_leaves_gradients():
    model = mlp()
    pre = Preconditioner(model)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        assert pre.step() is False


# -- 6. crash-safe checkpoints -------------------------------------------------------------------------
def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    model_a = mlp()
    opt_a = EKFAC(model_a, lr=0.1, eigen_every=2)
    train(model_a, opt_a, range(8))
    model_b = mlp()
    opt_b = EKFAC(model_b, lr=0.1, eigen_every=2)
    train(model_b, opt_b, range(4))
    path = save_checkpoint(tmp_path / "run.pt", model=model_b, optimizer=opt_b, extra={"step": 4})
    model_c = mlp(seed=3)
    opt_c = EKFAC(model_c, lr=0.1, eigen_every=2)
    assert load_checkpoint(path, model=model_c, optimizer=opt_c)["extra"] == {"step": 4}
    train(model_c, opt_c, range(4, 8))
    assert same(snapshot(model_c, opt_c), snapshot(model_a, opt_a))


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = mlp()
    opt = EKFAC(model)
    path = save_checkpoint(tmp_path / "run.pt", model=model, optimizer=opt, extra="good")
    train(model, opt, range(2))

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model=model, optimizer=opt)
    monkeypatch.undo()
    assert load_checkpoint(path, model=mlp(), optimizer=None)["extra"] == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary file left


def test_truncated_checkpoint_is_a_clear_error_and_loads_nothing(tmp_path):
    model = mlp()
    opt = EKFAC(model)
    train(model, opt, range(2))
    path = save_checkpoint(tmp_path / "run.pt", model=model, optimizer=opt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(path, model=model, optimizer=opt)
    assert same(snapshot(model, opt), before)


# -- 8. clear errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(grad_scaler="scaler"), "grad_scaler"),
    (dict(compile_step={"bogus": 1}), "compile_step"),
    (dict(params=[nn.Parameter(torch.zeros(3))]), "params"),
])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EKFAC(mlp(), **kwargs)


# -- 3 (continued) and 5: asynchronous refreshes ---------------------------------------------------------
def test_resume_with_an_asynchronous_refresh_in_flight_is_exact():
    """synchronous=False: a refresh submitted before the save is waited for and saved with its
    result; the run that saved (and goes on) and the one resumed from the save install it at the
    same step. (Without a save the install step depends on the worker's timing.)"""
    settings = dict(lr=0.1, eigen_every=3, synchronous=False, stagger=False)
    model_a, model_b = mlp(), mlp()
    opt_a, opt_b = EKFAC(model_a, **settings), EKFAC(model_b, **settings)
    train(model_a, opt_a, range(4))  # step 3 submitted the refreshes
    train(model_b, opt_b, range(4))
    saved = copy.deepcopy((model_b.state_dict(), opt_b.state_dict()))
    assert saved[1]["preconditioner"]["eigen"]["pending"], "the test needs a refresh in flight at the save"
    opt_a.state_dict()  # run a takes the same checkpoint and goes on
    installed = opt_a.preconditioner.eigen.decompositions
    train(model_a, opt_a, range(4, 6))  # up to the next refresh (step 6), whose install is timing's
    assert not torch.equal(opt_a.preconditioner.layers[0].curvature.q_out, saved[1]["preconditioner"]["layers"][0]["q_out"])
    model_c = mlp(seed=5)
    opt_c = EKFAC(model_c, **settings)
    model_c.load_state_dict(saved[0])
    opt_c.load_state_dict(saved[1])
    train(model_c, opt_c, range(4, 6))
    assert same(snapshot(model_c, opt_c), snapshot(model_a, opt_a))
    assert installed == opt_a.preconditioner.eigen.decompositions


def test_failed_eigendecomposition_worker_keeps_the_basis(monkeypatch):
    model = mlp()
    opt = EKFAC(model, lr=0.1, eigen_every=2, synchronous=False, stagger=False)
    train(model, opt, range(2))
    engine = opt.preconditioner.eigen

    def broken(*args, **kwargs):
        raise RuntimeError("worker crashed")

    monkeypatch.setattr(engine, "_work", broken)
    bases = [layer.curvature.q_out.clone() for layer in opt.preconditioner.layers]
    with pytest.warns(RuntimeWarning, match="worker failed"):
        train(model, opt, range(2, 6))
    assert all(torch.equal(b, layer.curvature.q_out) for b, layer in zip(bases, opt.preconditioner.layers))
    assert opt.preconditioner.steps == 6


def test_undone_first_step_creates_no_optimizer_state(monkeypatch):
    """Momentum buffers are created by the step's update: an undone first step leaves none."""
    model = mlp()
    opt = EKFAC(model)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()

    monkeypatch.setattr(ops, "precondition", interrupted)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    assert opt.preconditioner.steps == 0 and opt.state_dict()["state"] == {}


def test_failed_first_eigendecomposition_says_it_uses_the_identity(monkeypatch):
    model = mlp()
    opt = EKFAC(model)

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with pytest.warns(RuntimeWarning, match="identity basis"):
        train(model, opt, range(1))
    q_in = opt.preconditioner.layers[0].curvature.q_in
    assert torch.equal(q_in, torch.eye(q_in.shape[0], dtype=q_in.dtype))


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    model = mlp()
    stale = tmp_path / ".run.pt.999999999.tmp"  # a writer that died mid-write (no such process)
    stale.write_bytes(b"half")
    save_checkpoint(tmp_path / "run.pt", model=model)
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]


def test_load_refuses_other_curvature_options():
    from ekfac_triton import TEKFAC

    model = mlp()
    opt = TEKFAC(model, effective_damping=True)
    train(model, opt, range(2))
    other_model = mlp()
    other = TEKFAC(other_model)
    before = snapshot(other_model, other)
    with pytest.raises(ValueError, match="effective_damping=True"):
        other.load_state_dict(opt.state_dict())
    assert same(snapshot(other_model, other), before)


@pytest.mark.slow
def test_resume_of_the_compiled_step_is_exact():
    settings = dict(lr=0.1, eigen_every=2, compile_step=True)
    model_a, model_b = mlp(), mlp()
    opt_a, opt_b = EKFAC(model_a, **settings), EKFAC(model_b, **settings)
    train(model_a, opt_a, range(8))
    train(model_b, opt_b, range(4))
    saved = copy.deepcopy((model_b.state_dict(), opt_b.state_dict()))
    model_c = mlp(seed=9)
    opt_c = EKFAC(model_c, **settings)
    model_c.load_state_dict(saved[0])
    opt_c.load_state_dict(saved[1])
    train(model_c, opt_c, range(4, 8))
    assert same(snapshot(model_c, opt_c), snapshot(model_a, opt_a))
