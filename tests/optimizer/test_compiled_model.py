"""torch.compile: capture with no graph break, compiled vs eager statistics and trajectories
(CPU, inductor). Each test resets dynamo, so compile counts are per test."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn
from torch._dynamo.utils import counters

from ekfac_triton import EKFAC
from tests.helpers import COMPILE_MODELS, compile_batch, curvature_tensors, half_mse

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# models and data (tests/helpers.py): (N, d) Linear, Conv2d, (B, T, d) sequence
# ---------------------------------------------------------------------------------------------
def train(kind: str, compiled: bool, steps: int, dtype: torch.dtype = torch.float64, batch_sizes=(32,),
          same_batch: bool = False, **kwargs) -> tuple[list[float], nn.Module, EKFAC]:
    """Batches of 32 exceed every factor's dimension: a rank-deficient factor's eigenbasis is
    arbitrary in its null space, where rounding-level differences (compiled vs eager) would
    pick different bases and so different EKFAC directions."""
    model = COMPILE_MODELS[kind][0](dtype)
    # no trust region unless a test sets one: the losses below are those of the unclipped step
    opt = EKFAC(model, **{"lr": 0.05, "damping": 1e-2, "eigen_every": 3, "kl_clip": None, **kwargs})
    run = torch.compile(model, fullgraph=True) if compiled else model
    losses = []
    for step in range(steps):
        x, y = compile_batch(kind, batch_sizes[step % len(batch_sizes)], 0 if same_batch else step, dtype)
        opt.zero_grad()
        loss = half_mse(run(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model, opt


def assert_close_lists(actual: list[Tensor], expected: list[Tensor], atol: float, rtol: float, what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{what}[{i}]: {m}")


# ---------------------------------------------------------------------------------------------
# 1. capture without graph breaks, exactly the eager statistics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(COMPILE_MODELS))
def test_explain_reports_no_graph_break(kind):
    model = COMPILE_MODELS[kind][0](torch.float64)
    opt = EKFAC(model)
    x, _ = compile_batch(kind, 4, 0, torch.float64)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    opt.remove_hooks()


@pytest.mark.parametrize("kind", sorted(COMPILE_MODELS))
@pytest.mark.slow
def test_compiled_capture_gives_the_eager_statistics(kind):
    """fullgraph=True (a graph break would raise), float64: statistics, bases and parameters of
    a compiled model agree with eager ones after several steps, including refresh steps."""
    _, model_e, opt_e = train(kind, compiled=False, steps=5)
    _, model_c, opt_c = train(kind, compiled=True, steps=5)
    assert opt_c.preconditioner.steps == opt_e.preconditioner.steps == 5
    assert_close_lists(curvature_tensors(opt_c), curvature_tensors(opt_e), atol=1e-11, rtol=1e-9, what="statistics")
    assert_close_lists(list(model_c.parameters()), list(model_e.parameters()), atol=1e-11, rtol=1e-9,
                       what="parameters")


def test_captured_tensors_equal_eager_ones():
    """One step's captured (input, output-gradient) pairs themselves, compiled vs eager."""
    captured = {}
    for compiled in (False, True):
        model = COMPILE_MODELS["sequence"][0](torch.float64)
        opt = EKFAC(model)
        run = torch.compile(model, fullgraph=True) if compiled else model
        x, y = compile_batch("sequence", 6, 0, torch.float64)
        half_mse(run(x), y).backward()
        captured[compiled] = [(layer.capture.inputs, layer.capture.grad_output, layer.capture.completed)
                              for layer in opt.preconditioner.layers]
    for (a_c, g_c, n_c), (a_e, g_e, n_e) in zip(captured[True], captured[False]):
        assert n_c == n_e == 1
        torch.testing.assert_close(a_c, a_e, atol=1e-14, rtol=1e-12)  # inductor's tanh rounds differently
        torch.testing.assert_close(g_c, g_e, atol=1e-14, rtol=1e-12)


@pytest.mark.slow
def test_changing_batch_size_recompiles_at_most_once():
    """No preallocated buffers: a new batch size costs dynamo's one dynamic-shape recompile, no more."""
    sizes = (32, 20, 41, 32, 24, 37)  # >= d̄ of every factor: full rank, a unique basis
    _, model_e, opt_e = train("linear", compiled=False, steps=len(sizes), batch_sizes=sizes)
    torch._dynamo.reset()
    counters.clear()
    _, model_c, opt_c = train("linear", compiled=True, steps=len(sizes), batch_sizes=sizes)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert_close_lists(curvature_tensors(opt_c), curvature_tensors(opt_e), atol=1e-11, rtol=1e-9, what="statistics")


def test_factor_every_shares_one_graph():
    """Statistics and non-statistics steps run the same graph (the choice is made at run time)."""
    _, model_e, opt_e = train("linear", compiled=False, steps=6, factor_every=2)
    torch._dynamo.reset()
    counters.clear()
    _, model_c, opt_c = train("linear", compiled=True, steps=6, factor_every=2)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert opt_c.preconditioner.layers[0].curvature.factor_updates == 3
    assert_close_lists(curvature_tensors(opt_c), curvature_tensors(opt_e), atol=1e-11, rtol=1e-9, what="statistics")
    assert_close_lists(list(model_c.parameters()), list(model_e.parameters()), atol=1e-11, rtol=1e-9,
                       what="parameters")


def test_compiled_forward_without_backward_is_ignored():
    model = COMPILE_MODELS["linear"][0](torch.float64)
    opt = EKFAC(model)
    run = torch.compile(model, fullgraph=True)
    x, y = compile_batch("linear", 8, 0, torch.float64)
    half_mse(run(x), y).backward()
    expected = [layer.capture.inputs.clone() for layer in opt.preconditioner.layers]
    run(torch.randn(3, 5, dtype=torch.float64))  # a metric with grad enabled, never backpropagated
    for layer, inputs in zip(opt.preconditioner.layers, expected):
        assert layer.capture.completed == 1
        assert torch.equal(layer.capture.inputs, inputs)
    opt.step()


def test_compiled_module_run_twice_is_refused():
    model = COMPILE_MODELS["linear"][0](torch.float64)
    opt = EKFAC(model)
    run = torch.compile(model, fullgraph=True)
    x, y = compile_batch("linear", 8, 0, torch.float64)
    (half_mse(run(x), y) + half_mse(run(x + 1), y)).backward()
    with pytest.raises(RuntimeError, match="ran 2 times"):
        opt.step()


def test_compiled_no_grad_forward_is_ignored_and_hooks_removable():
    model = COMPILE_MODELS["linear"][0](torch.float64)
    opt = EKFAC(model)
    run = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        run(torch.randn(4, 5, dtype=torch.float64))
    assert all(layer.capture.completed == 0 for layer in opt.preconditioner.layers)
    opt.remove_hooks()
    torch._dynamo.reset()
    x, y = compile_batch("linear", 8, 0, torch.float64)
    half_mse(torch.compile(model, fullgraph=True)(x), y).backward()
    assert all(layer.capture.completed == 0 for layer in opt.preconditioner.layers)


# ---------------------------------------------------------------------------------------------
# compiled vs eager training: losses over 20 steps, float32
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(COMPILE_MODELS))
@pytest.mark.slow
def test_compiled_training_matches_eager_losses(kind):
    losses_e, _, _ = train(kind, compiled=False, steps=20, dtype=torch.float32, same_batch=True)
    losses_c, _, _ = train(kind, compiled=True, steps=20, dtype=torch.float32, same_batch=True)
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), atol=1e-4, rtol=1e-3)
    assert losses_c[-1] < 0.5 * losses_c[0]  # it trains (one batch, fitted)
