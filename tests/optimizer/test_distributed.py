"""Data-parallel training (:mod:`ekfac_triton.distributed`) on CPU with gloo: two
processes (``torch.multiprocessing.spawn``) equal one process on the concatenated batch, split
the eigendecompositions between them, skip non-finite steps together, and resume from a
checkpoint saved on rank 0 bit-exactly.

All scenarios run in one spawn of two ranks (a process that imports torch takes seconds to
start); the ranks also compute the single-process reference themselves (a second, undistributed
model on the whole batch) and save their results for the tests to compare. The rendezvous is a
file in a temporary folder (no port to find).
"""

from __future__ import annotations

import datetime
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from bench.soak import flatten
from ekfac_triton import EKFAC, Preconditioner
from ekfac_triton.distributed import assign_owners, average_gradients
from tests.helpers import assert_bitwise_equal, half_mse, make_mlp, seeded_batch

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

WORLD = 2
N_LOCAL = 6          # examples per rank and step
STEPS = 10
KWARGS = dict(lr=0.1, damping=1e-2, momentum=0.9, weight_decay=1e-3, factor_decay=0.9, eigen_every=3)


# ---------------------------------------------------------------------------------------------
# models, data, the training loop (run inside the ranks)
# ---------------------------------------------------------------------------------------------
def make_model(kind: str, seed: int = 0) -> nn.Module:
    if kind == "mlp":
        return make_mlp([5, 9, 8, 7, 3], seed=seed, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 3, 2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 2 * 2, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    return model.to(torch.float64)


def global_batch(kind: str, step: int, n: int = WORLD * N_LOCAL) -> tuple[Tensor, Tensor]:
    return seeded_batch(n, (5,) if kind == "mlp" else (2, 5, 5), 3, 1000 + step)


def train(model: nn.Module, opt: EKFAC, kind: str, steps: range, part: slice | None = None,
          manual_average: bool = False) -> None:
    """Steps on the global batches (or their ``part``): each rank's loss is the mean over its own
    examples."""
    for step in steps:
        x, y = global_batch(kind, step)
        if part is not None:
            x, y = x[part], y[part]
        opt.zero_grad()
        half_mse(model(x), y).backward()
        if manual_average:
            average_gradients(model.parameters())
        opt.step()


def snapshot(opt: EKFAC) -> dict[str, Tensor]:
    """Every tensor and count of the optimizer's state, flattened to ``path -> tensor``."""
    return flatten(opt.state_dict())


def distributed_model(kind: str, mode: str) -> tuple[nn.Module, nn.Module, dict]:
    """(the model EKFAC gets, the plain model, EKFAC's extra arguments) for ``mode``."""
    model = make_model(kind)
    if mode == "ddp":
        return DDP(model), model, {}
    return model, model, {"process_group": dist.group.WORLD}


# ---------------------------------------------------------------------------------------------
# scenarios (each runs on every rank and returns what the test compares)
# ---------------------------------------------------------------------------------------------
def scenario_equivalence(rank: int, kind: str, mode: str, curvature: str, scaling: str, **settings) -> dict:
    kwargs = dict(KWARGS, curvature=curvature, scaling=scaling, **settings)
    wrapped, model, extra = distributed_model(kind, mode)
    opt = EKFAC(wrapped, **kwargs, **extra)
    part = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    train(wrapped, opt, kind, range(STEPS), part, manual_average=(mode == "group"))

    reference = make_model(kind)
    ref_opt = EKFAC(reference, **kwargs)
    train(reference, ref_opt, kind, range(STEPS))
    assert ref_opt.preconditioner.distributed is None  # a plain model and no group: not distributed
    return {"params": [p.detach().clone() for p in model.parameters()],
            "reference": [p.detach().clone() for p in reference.parameters()],
            "decompositions": opt.preconditioner.eigen.decompositions,
            "reference_decompositions": ref_opt.preconditioner.eigen.decompositions,
            "state": snapshot(opt)}


def scenario_preconditioner_with_sgd(rank: int) -> dict:
    """The standalone Preconditioner on a DDP model, under torch's SGD."""
    def run(model: nn.Module, part: slice | None) -> Preconditioner:
        pre = Preconditioner(model, damping=1e-2, factor_decay=0.9, eigen_every=3)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(STEPS):
            x, y = global_batch("mlp", step)
            if part is not None:
                x, y = x[part], y[part]
            sgd.zero_grad()
            half_mse(model(x), y).backward()
            pre.step()
            sgd.step()
        return pre

    model, reference = make_model("mlp"), make_model("mlp")
    pre = run(DDP(model), slice(rank * N_LOCAL, (rank + 1) * N_LOCAL))
    assert pre.distributed is not None and pre.preconditioned_modules() == ["0", "2", "4", "6"]
    run(reference, None)
    return {"params": [p.detach().clone() for p in model.parameters()],
            "reference": [p.detach().clone() for p in reference.parameters()]}


def scenario_uneven(rank: int) -> dict:
    """Local batches of 3 and 9 examples: after one step the statistics (factors, bases, scalings)
    are those of the 12 concatenated examples (the gradient is DDP's unweighted mean: not compared)."""
    sizes = [3, 9]
    model = make_model("mlp")
    ddp = DDP(model)
    opt = EKFAC(ddp, **KWARGS)
    x, y = global_batch("mlp", 0)
    start = sum(sizes[:rank])
    opt.zero_grad()
    half_mse(ddp(x[start:start + sizes[rank]]), y[start:start + sizes[rank]]).backward()
    opt.step()
    reference = make_model("mlp")
    ref_opt = EKFAC(reference, **KWARGS)
    train(reference, ref_opt, "mlp", range(1))
    return {"state": snapshot(opt), "reference": snapshot(ref_opt)}


def scenario_nan_on_one_rank(rank: int) -> dict:
    model = make_model("mlp")
    ddp = DDP(model)
    opt = EKFAC(ddp, **KWARGS)
    part = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    train(ddp, opt, "mlp", range(4), part)
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = snapshot(opt)

    x, y = global_batch("mlp", 4)
    opt.zero_grad()
    half_mse(ddp(x[part]), y[part]).backward()  # DDP has averaged the gradients: finite on both ranks
    if rank == 1:
        model[2].weight.grad[0, 0] = float("nan")  # only rank 1 sees it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    skipped_warnings = sum("step skipped" in str(w.message) for w in caught)
    after_params = [p.detach().clone() for p in model.parameters()]
    after_state = snapshot(opt)
    train(ddp, opt, "mlp", range(5, 7), part)  # training goes on, together
    return {"before_params": before_params, "after_params": after_params, "before_state": before_state,
            "after_state": after_state, "warnings": skipped_warnings, "final_state": snapshot(opt),
            "skipped": opt.preconditioner.skipped_steps, "steps": opt.preconditioner.steps}


def scenario_save_on_rank0_load_on_all(rank: int, tmp: str, save_after: int = 5, **settings) -> dict:
    part = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    model = make_model("conv")
    ddp = DDP(model)
    opt = EKFAC(ddp, **KWARGS, **settings)
    train(ddp, opt, "conv", range(save_after), part)
    in_flight = len(opt.preconditioner.distributed.in_flight)
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f"{tmp}/checkpoint-{save_after}.pt")
    dist.barrier()
    train(ddp, opt, "conv", range(save_after, STEPS), part)

    resumed = make_model("conv", seed=123)
    ddp2 = DDP(resumed)
    opt2 = EKFAC(ddp2, **KWARGS, **settings)
    saved = torch.load(f"{tmp}/checkpoint-{save_after}.pt")
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    train(ddp2, opt2, "conv", range(save_after, STEPS), part)
    return {"params": [p.detach().clone() for p in model.parameters()],
            "resumed": [p.detach().clone() for p in resumed.parameters()],
            "state": snapshot(opt), "resumed_state": snapshot(opt2), "in_flight": in_flight}


def scenario_asynchronous(rank: int) -> dict:
    """Refreshes on the owner's worker thread, shared at the next step: identical state on all ranks."""
    model = make_model("mlp")
    ddp = DDP(model)
    opt = EKFAC(ddp, **KWARGS, synchronous=False)
    part = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    train(ddp, opt, "mlp", range(STEPS), part)
    opt.preconditioner.eigen.wait()
    return {"state": snapshot(opt), "decompositions": opt.preconditioner.eigen.decompositions,
            "params": [p.detach().clone() for p in model.parameters()]}


def scenario_accumulation(rank: int) -> dict:
    """DDP with ``no_sync()`` gradient accumulation: each rank's 6 examples as micro-batches of 2
    and 4, each loss scaled by n_i / N_local; equals one process on the concatenated batch."""
    kwargs = dict(KWARGS, eigen_every=2)
    model = make_model("mlp")
    ddp = DDP(model)
    opt = EKFAC(ddp, **kwargs)
    part = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    for step in range(4):
        x, y = global_batch("mlp", step)
        x, y = x[part], y[part]
        opt.zero_grad()
        with ddp.no_sync():
            (half_mse(ddp(x[:2]), y[:2]) * (2 / N_LOCAL)).backward()
        (half_mse(ddp(x[2:]), y[2:]) * (4 / N_LOCAL)).backward()
        opt.step()
    reference = make_model("mlp")
    ref_opt = EKFAC(reference, **kwargs)
    train(reference, ref_opt, "mlp", range(4))
    return {"params": [p.detach().clone() for p in model.parameters()],
            "reference": [p.detach().clone() for p in reference.parameters()], "state": snapshot(opt)}


EQUIVALENCE = {  # (kind, how the gradients are averaged, curvature, scaling, other settings)
    "mlp-ddp-ekfac": ("mlp", "ddp", "ekfac", "per_example", {}),
    "conv-ddp-ekfac": ("conv", "ddp", "ekfac", "per_example", {}),
    "mlp-group-ekfac": ("mlp", "group", "ekfac", "per_example", {}),
    "conv-group-tekfac": ("conv", "group", "tekfac", "per_example", {}),
    "conv-ddp-kfac": ("conv", "ddp", "kfac", "per_example", {}),
    # the batch scaling (S = N·P² of one gradient) divides by tiny entries: with λ = 1e-2 rounding
    # differences of 1e-16 grow to 5e-10 in 10 steps, in one process just as in two; λ = 0.1 keeps
    # the comparison at 1e-10 meaningful (a wrong N would be off by O(1))
    "mlp-ddp-ekfac-batch": ("mlp", "ddp", "ekfac", "batch", {"damping": 0.1}),
    # MAC: its mean statistic is averaged like the factors; no eigendecomposition to split
    "conv-ddp-mac": ("conv", "ddp", "mac", "per_example", {}),
}
CASES = {
    **{f"equivalence/{name}": (scenario_equivalence, dict(kind=kind, mode=mode, curvature=curvature,
                                                             scaling=scaling, **settings))
       for name, (kind, mode, curvature, scaling, settings) in EQUIVALENCE.items()},
    "preconditioner": (scenario_preconditioner_with_sgd, {}),
    "uneven": (scenario_uneven, {}),
    "accumulation": (scenario_accumulation, {}),
    "nan": (scenario_nan_on_one_rank, {}),
    "checkpoint": (scenario_save_on_rank0_load_on_all, {}),
    # eigen_every=3, all layers at offset 0: step 6 submits every refresh, the save follows it
    "checkpoint-asynchronous": (scenario_save_on_rank0_load_on_all,
                                dict(save_after=7, synchronous=False, stagger=False)),
    "asynchronous": (scenario_asynchronous, {}),
}


def _worker(rank: int, tmp: str) -> None:
    """Run every case on this rank (one spawn for the whole module: starting a process that
    imports torch costs seconds); a failing case records its traceback instead of a result."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results: dict[str, object] = {}
    try:
        for name, (scenario, kwargs) in CASES.items():
            if scenario is scenario_save_on_rank0_load_on_all:
                kwargs = dict(kwargs, tmp=tmp)
            try:
                results[name] = scenario(rank, **kwargs)
            except Exception:  # noqa: BLE001 - reported by the test of this case
                results[name] = traceback.format_exc()
                break  # the other rank may be waiting in a collective of this case
            dist.barrier()
    finally:
        torch.save(results, f"{tmp}/rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def case(ranks: list[dict], name: str) -> list[dict]:
    """Both ranks' results of one case (the test fails with a rank's traceback if it raised)."""
    out = []
    for rank, results in enumerate(ranks):
        if name not in results:
            pytest.fail(f"case {name!r} did not run on rank {rank} (an earlier case failed)")
        if isinstance(results[name], str):
            pytest.fail(f"case {name!r} raised on rank {rank}:\n{results[name]}")
        out.append(results[name])
    return out


# ---------------------------------------------------------------------------------------------
# assertions
# ---------------------------------------------------------------------------------------------
def assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor], what: str, ignore: tuple[str, ...] = ()) -> None:
    keys = [k for k in a if not k.endswith(ignore)] if ignore else list(a)
    assert set(keys) == {k for k in b if not (ignore and k.endswith(ignore))}, f"{what}: different state keys"
    for k in keys:
        assert_bitwise_equal(a[k], b[k], f"{what}: state {k}")


def assert_params_close(actual: list[Tensor], expected: list[Tensor], tol: float, what: str) -> None:
    for i, (p, q) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(p, q, atol=tol, rtol=tol, msg=lambda m: f"{what}, parameter {i}: {m}")


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
# the tests on `ranks` are slow: the module's fixture spawns two processes that import torch
@pytest.mark.parametrize("name", list(EQUIVALENCE))
@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_concatenated_batch(ranks, name):
    ranks = case(ranks, f"equivalence/{name}")
    for rank, result in enumerate(ranks):
        assert_params_close(result["params"], result["reference"], 1e-10, f"rank {rank} vs one process")
    assert_same_state(ranks[0]["state"], ranks[1]["state"], "rank 0 vs rank 1")  # bitwise
    if EQUIVALENCE[name][2] == "mac":
        assert all(r["decompositions"] == 0 for r in ranks)
        return
    # each decomposition ran once, on one rank, and both ranks did their share
    counts = [r["decompositions"] for r in ranks]
    assert sum(counts) == ranks[0]["reference_decompositions"]
    assert min(counts) > 0 and abs(counts[0] - counts[1]) <= 2, counts


@pytest.mark.slow
def test_preconditioner_on_a_ddp_model_under_sgd(ranks):
    for rank, result in enumerate(case(ranks, "preconditioner")):
        assert_params_close(result["params"], result["reference"], 1e-10, f"rank {rank} vs one process")


@pytest.mark.slow
def test_statistics_with_uneven_local_batches_are_those_of_the_union(ranks):
    ranks = case(ranks, "uneven")
    assert_same_state(ranks[0]["state"], ranks[1]["state"], "rank 0 vs rank 1")
    state, reference = ranks[0]["state"], ranks[0]["reference"]
    statistics = [k for k in reference if "/preconditioner/layers/" in k
                  and k.rsplit("/", 1)[1] in ("in_factor", "out_factor", "in_eigenvalues", "out_eigenvalues",
                                              "scaling")]
    assert statistics
    for k in statistics:
        torch.testing.assert_close(state[k], reference[k], atol=1e-12, rtol=1e-10, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_no_sync_gradient_accumulation_equals_one_process(ranks):
    ranks = case(ranks, "accumulation")
    for rank, result in enumerate(ranks):
        assert_params_close(result["params"], result["reference"], 1e-10, f"rank {rank} vs one process")
    assert_same_state(ranks[0]["state"], ranks[1]["state"], "rank 0 vs rank 1")


@pytest.mark.slow
def test_non_finite_gradient_on_one_rank_makes_every_rank_skip(ranks):
    ranks = case(ranks, "nan")
    for rank, r in enumerate(ranks):
        assert r["warnings"] == 1, f"rank {rank} did not warn about the skipped step"
        for p, q in zip(r["after_params"], r["before_params"]):
            assert torch.equal(p, q), f"rank {rank} changed its parameters on the skipped step"
        assert_same_state(r["after_state"], r["before_state"], f"rank {rank} across the skipped step",
                          ignore=("skipped_steps",))
        assert r["skipped"] == 1 and r["steps"] == 6
    assert_same_state(ranks[0]["final_state"], ranks[1]["final_state"], "rank 0 vs rank 1 after the skip")


@pytest.mark.slow
def test_checkpoint_saved_on_rank0_and_loaded_on_all_resumes_exactly(ranks):
    ranks = case(ranks, "checkpoint")
    for rank, r in enumerate(ranks):
        for i, (p, q) in enumerate(zip(r["resumed"], r["params"])):
            assert torch.equal(p, q), f"rank {rank}: parameter {i} after resuming differs"
        assert_same_state(r["resumed_state"], r["state"], f"rank {rank}, resumed vs uninterrupted")
    assert_same_state(ranks[0]["state"], ranks[1]["state"], "rank 0 vs rank 1")


@pytest.mark.slow
def test_resume_with_asynchronous_refreshes_in_flight_is_exact(ranks):
    """Refreshes in flight at the save live on their owners: the resumed run recomputes them from
    the saved factors and shares them at the same step as the run that saved."""
    ranks = case(ranks, "checkpoint-asynchronous")
    assert all(r["in_flight"] > 0 for r in ranks), "the test needs refreshes in flight at the save"
    for rank, r in enumerate(ranks):
        for i, (p, q) in enumerate(zip(r["resumed"], r["params"])):
            assert torch.equal(p, q), f"rank {rank}: parameter {i} after resuming differs"
        assert_same_state(r["resumed_state"], r["state"], f"rank {rank}, resumed vs uninterrupted")


@pytest.mark.slow
def test_asynchronous_refreshes_keep_the_ranks_identical(ranks):
    ranks = case(ranks, "asynchronous")
    assert_same_state(ranks[0]["state"], ranks[1]["state"], "rank 0 vs rank 1")
    for p, q in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p, q) and torch.isfinite(p).all()
    assert min(r["decompositions"] for r in ranks) > 0


# -- single process: the group rule and the owner assignment ---------------------------------------
def test_owners_balance_cost_deterministically():
    costs = [8.0, 1.0, 1.0, 4.0, 4.0, 2.0]
    owners = assign_owners(costs, [0.0, 0.0])
    assert owners == assign_owners(costs, [0.0, 0.0])
    loads = [sum(c for c, o in zip(costs, owners) if o == rank) for rank in range(2)]
    assert sorted(loads) == [10.0, 10.0]  # LPT within the step: 8+2 | 4+4+1+1
    assert assign_owners(costs, [0.0]) == [0] * len(costs)
    assert assign_owners([3.0], [5.0, 1.0, 2.0]) == [1]  # a lone layer goes to the least busy rank
    # the heavier share of a step goes to the rank that has done less so far
    assert assign_owners([4.0, 1.0], [0.0, 10.0]) == [0, 1]
    assert assign_owners([4.0, 1.0], [10.0, 0.0]) == [1, 0]


def test_plain_model_is_not_distributed_and_a_group_needs_initialisation():
    model = make_model("mlp")
    assert EKFAC(model).preconditioner.distributed is None
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="process_group"):
            EKFAC(make_model("mlp"), process_group=object())


def test_world_size_one_group_equals_the_plain_path(tmp_path):
    """The distributed code path with one rank computes the same (weights 1, sums of one term);
    only to rounding, as the bases it installs are row-major copies of eigh's column-major ones."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        results = []
        for group in (None, dist.group.WORLD):
            model = make_model("conv")
            opt = EKFAC(model, **KWARGS, process_group=group)
            assert (opt.preconditioner.distributed is None) == (group is None)
            train(model, opt, "conv", range(STEPS))
            results.append(([p.detach().clone() for p in model.parameters()], snapshot(opt),
                            opt.preconditioner.eigen.decompositions))
        assert_params_close(results[1][0], results[0][0], 1e-12, "world size 1 vs plain")
        assert results[0][1].keys() == results[1][1].keys()
        assert results[0][2] == results[1][2]
        with pytest.raises(ValueError, match="process_group"):
            EKFAC(make_model("mlp"), process_group="world")
        # nn.Embedding's one-hot curvature has no distributed path yet: refused, not silently wrong
        embedding_model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 3))
        with pytest.raises(ValueError, match="process_group.*Embedding"):
            EKFAC(embedding_model, process_group=dist.group.WORLD)
        assert not any(m._forward_hooks for m in embedding_model.modules())  # a refused model keeps no hook
        EKFAC(embedding_model, process_group=dist.group.WORLD, params=embedding_model[1].parameters())
    finally:
        dist.destroy_process_group()
