"""The compiled optimizer step (``compile_step``): trajectories equal the eager
step's, a bounded number of graphs over 50 steps with refreshes, the Triton ops as single graph
nodes, the device-side non-finite skip, and (CUDA only) CUDA-graph capture without host syncs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn
from torch._dynamo.utils import counters

from ekfac_triton import EKFAC

from tests.helpers import COMPILE_MODELS, compile_batch, curvature_tensors, half_mse

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo(one_torch_thread):
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def state(opt: EKFAC) -> list[Tensor]:
    """Every tensor a step updates: factors, bases, scalings, momentum buffers."""
    return curvature_tensors(opt) + [s["momentum_buffer"] for s in opt.state.values() if "momentum_buffer" in s]


def train(kind: str, compile_step, steps: int, dtype: torch.dtype = torch.float64, device: str = "cpu",
          **kwargs) -> tuple[nn.Module, EKFAC]:
    """Batches of 32 exceed every factor's dimension: full-rank factors, unique eigenbases."""
    model = COMPILE_MODELS[kind][0](dtype).to(device)
    settings = dict(lr=0.05, damping=1e-2, eigen_every=3, kl_clip=None)  # the trust region only where a case sets it
    opt = EKFAC(model, **{**settings, **kwargs}, compile_step=compile_step)
    for step in range(steps):
        x, y = (t.to(device) for t in compile_batch(kind, 32, step, dtype))
        opt.zero_grad()
        half_mse(model(x), y).backward()
        opt.step()
    return model, opt


def assert_same_run(a: tuple[nn.Module, EKFAC], b: tuple[nn.Module, EKFAC], atol: float, rtol: float) -> None:
    (model_a, opt_a), (model_b, opt_b) = a, b
    pairs = list(zip(model_a.parameters(), model_b.parameters())) + list(zip(state(opt_a), state(opt_b)))
    assert len(state(opt_a)) == len(state(opt_b))
    for i, (x, y) in enumerate(pairs):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"tensor {i}: {m}")
    assert opt_a.preconditioner.steps == opt_b.preconditioner.steps


# (model, settings): every curvature, model kind and scaling mode, KL clip, both weight decays
CASES = {
    "linear-ekfac": ("linear", dict()),
    "conv2d-tekfac": ("conv2d", dict(curvature="tekfac", effective_damping=True, kl_clip=1e-3)),
    "sequence-kfac": ("sequence", dict(curvature="kfac", weight_decay=1e-3)),
    "sequence-ekfac-batch": ("sequence", dict(scaling="batch", weight_decay=1e-2, decoupled_weight_decay=True,
                                              factor_every=2)),
    "conv2d-ekfac-per_position": ("conv2d", dict(scaling="per_position", momentum=0.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.slow
def test_compiled_step_follows_the_eager_trajectory_float64(case):
    """20 steps (with refreshes every 3): parameters, factors, bases, scalings and momentum of
    the compiled step equal the eager ones to rounding (inductor may fuse multiply-adds)."""
    kind, kwargs = CASES[case]
    eager = train(kind, False, 20, **kwargs)
    compiled = train(kind, True, 20, **kwargs)
    assert_same_run(compiled, eager, atol=1e-11, rtol=1e-9)


@pytest.mark.slow
def test_compiled_step_follows_the_eager_trajectory_float32():
    """float32: parameters and factors after one step agree to a few ulps; over 20 steps the float32 eigendecompositions
    amplify rounding differences (float64 above shows the maths is the same) to ~1e-4."""
    (model_c, opt_c), (model_e, opt_e) = (train("linear", cs, 1, dtype=torch.float32) for cs in (True, False))
    for x, y in zip(list(model_c.parameters()) + [layer.curvature.in_factor for layer in opt_c.preconditioner.layers],
                    list(model_e.parameters()) + [layer.curvature.in_factor for layer in opt_e.preconditioner.layers]):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    eager = train("linear", False, 20, dtype=torch.float32)
    compiled = train("linear", True, 20, dtype=torch.float32)
    assert_same_run(compiled, eager, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_graphs_are_bounded_over_50_steps_with_refreshes():
    """eigen_every=5, factor_every=2: 50 steps with 10 refresh rounds and 25 statistics steps
    compile 5 graphs in all (the finite check of statistics and of other steps, factors,
    scalings, update) and never recompile; the trajectory stays the eager one."""
    kwargs = dict(eigen_every=5, factor_every=2)
    eager = train("linear", False, 50, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    compiled = train("linear", True, 50, **kwargs)
    assert compiled[1].preconditioner.eigen.decompositions == eager[1].preconditioner.eigen.decompositions >= 25
    assert counters["stats"]["unique_graphs"] <= 5, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert_same_run(compiled, eager, atol=1e-11, rtol=1e-9)


def test_triton_ops_are_single_nodes_of_the_compiled_graphs():
    """With the Triton backend the kernels enter the graphs as their torch.library ops (a
    recording backend; on CPU tensors the ops run their torch reference)."""
    targets: list[str] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    model = COMPILE_MODELS["linear"][0](torch.float32)
    opt = EKFAC(model, lr=0.05, damping=1e-2, eigen_every=3, compile_step={"backend": record})
    pre = opt.preconditioner
    pre.backend = "triton"  # resolve_backend refuses "triton" without CUDA; the ops fall back on CPU
    for layer in pre.layers:
        layer.curvature.backend = "triton"
    x, y = compile_batch("linear", 32, 0, torch.float32)
    half_mse(model(x), y).backward()
    opt.step()
    n = len(pre.layers)
    assert targets.count("ekfac_triton.factor_update") == 2 * n
    assert targets.count("ekfac_triton.per_example_scaling") == n
    assert targets.count("ekfac_triton.precondition") == n


@pytest.mark.slow
def test_plain_torch_compile_of_step_matches_eager():
    """``torch.compile(opt.step)`` (graph breaks allowed; the orchestration stays eager)."""
    runs = []
    for compiled in (False, True):
        model = COMPILE_MODELS["linear"][0](torch.float64)
        opt = EKFAC(model, lr=0.05, damping=1e-2, eigen_every=3)
        step = torch.compile(opt.step) if compiled else opt.step
        for i in range(6):
            x, y = compile_batch("linear", 32, i, torch.float64)
            opt.zero_grad()
            half_mse(model(x), y).backward()
            step()
        runs.append((model, opt))
    assert_same_run(runs[1], runs[0], atol=1e-11, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# device-side non-finite skip
# ---------------------------------------------------------------------------------------------
def snapshot(model: nn.Module, opt: EKFAC) -> list[Tensor]:
    return [t.detach().clone() for t in list(model.parameters()) + state(opt)]


@pytest.mark.parametrize("poison", ["grad", "activation"])
def test_device_skip_leaves_everything_bit_identical(poison):
    """A non-finite step that refreshes nothing is skipped on the device: parameters, momentum,
    factors, bases and scalings are bit-identical, no warning, the device counter counts it."""
    model, opt = train("linear", True, 4, eigen_every=50, stagger=False)  # step 4: statistics, no refresh
    pre = opt.preconditioner
    before = snapshot(model, opt)
    x, y = compile_batch("linear", 32, 4, torch.float64)
    if poison == "activation":
        x[3, 1] = float("nan")
    opt.zero_grad()
    half_mse(model(x), y).backward()
    if poison == "grad":
        model[0].weight.grad[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step()
    after = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert pre._host_skipped_steps == 0 and pre.skipped_steps == 1  # skipped on the device
    assert opt.state_dict()["preconditioner"]["skipped_steps"] == 1
    x, y = compile_batch("linear", 32, 5, torch.float64)  # and training goes on
    opt.zero_grad()
    half_mse(model(x), y).backward()
    opt.step()
    assert all(torch.isfinite(t).all() for t in list(model.parameters()) + state(opt))
    assert pre.skipped_steps == 1


def test_non_finite_refresh_step_is_skipped_on_the_host():
    """A step that would refresh a basis decides on the host, as the eager step does."""
    model, opt = train("linear", True, 3, eigen_every=3, stagger=False)  # step 3 refreshes
    before = snapshot(model, opt)
    x, y = compile_batch("linear", 32, 3, torch.float64)
    opt.zero_grad()
    half_mse(model(x), y).backward()
    model[0].bias.grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model, opt), before))
    assert opt.preconditioner.skipped_steps == 1 and opt.preconditioner.steps == 3


def test_non_finite_first_scaling_update_after_a_refresh_is_decided_on_the_host():
    """factor_every=2, eigen_every=3: step 3 refreshes on a non-statistics step (S becomes K-FAC's
    product, its EMA restarts); the statistics step 4 after it is its first scaling update, which
    replaces S. A non-finite step 4 must not count that update (the device skip would), so it is
    skipped on the host: the next good step then takes the batch estimate alone, as eagerly."""
    runs = []
    for compiled in (False, True):
        model, opt = train("linear", compiled, 4, eigen_every=3, factor_every=2, stagger=False)
        x, y = compile_batch("linear", 32, 4, torch.float64)
        opt.zero_grad()
        half_mse(model(x), y).backward()
        model[0].weight.grad[0, 0] = float("nan")
        with pytest.warns(RuntimeWarning, match="step skipped"):
            opt.step()
        for step in (5, 6, 7):
            x, y = compile_batch("linear", 32, step, torch.float64)
            opt.zero_grad()
            half_mse(model(x), y).backward()
            opt.step()
        runs.append(snapshot(model, opt))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_invalid_compile_step_is_refused():
    model = COMPILE_MODELS["linear"][0](torch.float64)
    with pytest.raises(ValueError, match="compile_step"):
        EKFAC(model, compile_step="yes")
    with pytest.raises(ValueError, match="compile_step with curvature='mac'"):
        EKFAC(model, curvature="mac", compile_step=True)
    with pytest.raises(ValueError, match="compile_step with fisher='type-2'"):
        EKFAC(model, fisher="type-2", loss=nn.CrossEntropyLoss(), compile_step=True)
    embedding = nn.Sequential(nn.Embedding(7, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"compile_step with layers \['0 \(Embedding\)'\]"):
        EKFAC(embedding, compile_step=True)
    EKFAC(embedding, compile_step=True, params=embedding[1].parameters())  # without it: accepted


# ---------------------------------------------------------------------------------------------
# CUDA graphs (mode="reduce-overhead"): need a CUDA device
# ---------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GRAPHED = {"mode": "reduce-overhead"}


@pytest.mark.cuda
@cuda
def test_reduce_overhead_follows_the_eager_trajectory_on_cuda():
    kwargs = dict(eigen_every=5, factor_every=2, synchronous=True)
    eager = train("linear", False, 30, device="cuda", **kwargs)
    graphed = train("linear", GRAPHED, 30, device="cuda", **kwargs)
    assert_same_run(graphed, eager, atol=1e-11, rtol=1e-9)


def _ordinary_steps(model: nn.Module, opt: EKFAC, first: int, count: int) -> None:
    for step in range(first, first + count):
        x, y = (t.to("cuda") for t in compile_batch("linear", 32, step, torch.float64))
        opt.zero_grad(set_to_none=False)
        half_mse(model(x), y).backward()
        opt.step()


@pytest.mark.cuda
@cuda
def test_ordinary_graphed_steps_do_not_sync_the_host():
    """Steps 6-9 with eigen_every=100, factor_every=2: statistics and plain steps, no refresh."""
    model, opt = train("linear", GRAPHED, 6, device="cuda", eigen_every=100, factor_every=2, synchronous=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _ordinary_steps(model, opt, 6, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@cuda
def test_graphed_steps_launch_fewer_kernels_than_eager():
    from torch.profiler import ProfilerActivity, profile

    launches = {}
    for name, compile_step in (("eager", False), ("graphed", GRAPHED)):
        torch._dynamo.reset()
        model, opt = train("linear", compile_step, 6, device="cuda", eigen_every=100, factor_every=2,
                           synchronous=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _ordinary_steps(model, opt, 6, 2)
            torch.cuda.synchronize()
        launches[name] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    assert launches["graphed"] < launches["eager"], launches
