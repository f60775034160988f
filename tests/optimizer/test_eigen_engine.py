"""The eigendecomposition engine: staggered schedule, precision policy, asynchronous refreshes,
and the re-initialisation of the scalings on a basis change."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from ekfac_triton import EKFAC
from ekfac_triton.eigen import eigh_dtype
from ekfac_triton.eigen_engine import EigenEngine, stagger_offsets
from tests.helpers import make_mlp


def model_of(widths: list[int], seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    return make_mlp(widths, seed=seed, dtype=dtype)


def step(model: nn.Module, opt: EKFAC, seed: int, n: int = 17) -> None:
    g = torch.Generator().manual_seed(1000 + seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(n, model[0].in_features, generator=g, dtype=dtype)
    y = torch.randn(n, model[-1].out_features, generator=g, dtype=dtype)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def count_refreshes(monkeypatch, opt: EKFAC) -> list[list[int]]:
    """Per step, the indices of the layers whose bases were decomposed (patched engine)."""
    engine = opt.preconditioner.eigen
    log: list[list[int]] = []
    real = engine.decompose

    def spy(in_factor, out_factor, *rest):
        for i, layer in enumerate(opt.preconditioner.layers):
            if layer.curvature.in_factor is in_factor:
                log[-1].append(i)
        return real(in_factor, out_factor, *rest)

    monkeypatch.setattr(engine, "decompose", spy)
    return log


# -- the schedule ---------------------------------------------------------------------------------
def test_stagger_offsets_balance_costs_deterministically():
    costs = [8.0, 1.0, 1.0, 4.0, 4.0, 2.0]
    offsets = stagger_offsets(costs, 3)
    assert offsets == stagger_offsets(costs, 3)
    loads = [sum(c for c, o in zip(costs, offsets) if o == slot) for slot in range(3)]
    assert sorted(loads) == [6.0, 6.0, 8.0]  # LPT: 8 | 4+2 | 4+1+1
    assert stagger_offsets(costs, 1) == [0] * len(costs)
    assert sorted(stagger_offsets([1.0] * 4, 4)) == [0, 1, 2, 3]


@pytest.mark.parametrize("stagger", [True, False])
def test_each_layer_refreshes_once_per_period(monkeypatch, stagger):
    model = model_of([9, 13, 11, 7, 5])
    opt = EKFAC(model, lr=0.01, eigen_every=4, stagger=stagger)
    log = count_refreshes(monkeypatch, opt)
    for k in range(16):
        log.append([])
        step(model, opt, k)
    assert sorted(log[0]) == [0, 1, 2, 3]  # the warm-up step computes every first basis
    assert all(not log[k] for k in range(1, 4))  # a basis is kept at least eigen_every steps
    for period in range(1, 4):
        window = [i for k in range(4 * period, 4 * period + 4) for i in log[k]]
        assert sorted(window) == [0, 1, 2, 3]  # each layer exactly once per period
    offsets = opt.preconditioner.eigen.offsets
    for k in range(4, 16):
        assert sorted(log[k]) == sorted(i for i, o in enumerate(offsets) if k % 4 == o)
    busiest = max(len(log[k]) for k in range(4, 16))
    assert busiest == (1 if stagger else 4)


def test_eigen_every_one_refreshes_everything_every_step(monkeypatch):
    model = model_of([9, 13, 11, 7])
    opt = EKFAC(model, lr=0.01, eigen_every=1)
    log = count_refreshes(monkeypatch, opt)
    for k in range(4):
        log.append([])
        step(model, opt, k)
    assert all(sorted(entry) == [0, 1, 2] for entry in log)


# -- precision ------------------------------------------------------------------------------------
def test_precision_policy():
    assert eigh_dtype(512, torch.float32, 1024) == torch.float64
    assert eigh_dtype(1025, torch.float32, 1024) == torch.float32
    assert eigh_dtype(4096, torch.float64, 0) == torch.float64  # never below the factor's own
    assert eigh_dtype(3, torch.float32, 0) == torch.float32


def test_float64_max_dim_selects_eigh_dtype(monkeypatch):
    model = model_of([30, 8, 5], dtype=torch.float32)  # factor dims 31, 8 and 9, 5
    seen: list[tuple[int, torch.dtype]] = []
    real = torch.linalg.eigh

    def spy(a, *args, **kwargs):
        seen.append((a.shape[0], a.dtype))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    opt = EKFAC(model, lr=0.01, float64_max_dim=9)
    step(model, opt, 0)
    assert sorted(seen) == sorted([(31, torch.float32), (8, torch.float64), (9, torch.float64), (5, torch.float64)])
    for layer in opt.preconditioner.layers:  # results come back in the factor's dtype
        assert layer.curvature.q_in.dtype == torch.float32


def test_bad_engine_arguments_raise():
    model = model_of([4, 3])
    for kwargs, name in [({"float64_max_dim": -1}, "float64_max_dim"), ({"stagger": 1}, "stagger"),
                         ({"synchronous": "yes"}, "synchronous")]:
        with pytest.raises(ValueError, match=name):
            EKFAC(model, **kwargs)


# -- asynchronous refreshes -----------------------------------------------------------------------
def test_async_refresh_installs_basis_of_the_snapshot_at_a_later_step():
    model = model_of([9, 13, 7])
    opt = EKFAC(model, lr=0.01, eigen_every=2, synchronous=False, stagger=False)
    engine = opt.preconditioner.eigen
    assert not engine.synchronous
    step(model, opt, 0)  # first bases: synchronous
    step(model, opt, 1)
    layer = opt.preconditioner.layers[0].curvature
    q_before = layer.q_in.clone()
    step(model, opt, 2)  # due: submitted, the step still uses the old basis
    assert torch.equal(layer.q_in, q_before)
    snapshot = layer.in_factor.clone()  # factor_decay EMA: what the worker decomposed at step 2
    engine.wait()
    step(model, opt, 3)  # installed at this step boundary
    assert not torch.equal(layer.q_in, q_before)
    expected = torch.linalg.eigh(snapshot)
    torch.testing.assert_close(layer.in_eigenvalues, expected.eigenvalues, rtol=1e-10, atol=1e-12)
    # same eigenvectors up to sign
    overlap = (layer.q_in.T @ expected.eigenvectors).abs()
    torch.testing.assert_close(overlap.diagonal(), torch.ones_like(overlap.diagonal()), rtol=0, atol=1e-6)
    opt.remove_hooks()


def test_async_steps_never_wait_for_the_worker(monkeypatch):
    model = model_of([9, 13, 7])
    opt = EKFAC(model, lr=0.01, eigen_every=1, synchronous=False)
    engine = opt.preconditioner.eigen
    step(model, opt, 0)
    gate = threading.Event()
    timed_out = []
    real = engine.decompose

    def gated(in_factor, out_factor, *rest):
        # Held until the main thread has run its steps: a step that waited for the worker would
        # stall here until the timeout, which the test then reports.
        if not gate.wait(timeout=30):
            timed_out.append(True)
        return real(in_factor, out_factor, *rest)

    monkeypatch.setattr(engine, "decompose", gated)
    bases = [layer.curvature.q_in.clone() for layer in opt.preconditioner.layers]
    for k in range(1, 4):
        step(model, opt, k)
    assert engine._pending  # the refresh is still held by the gate
    assert all(torch.equal(b, layer.curvature.q_in) for b, layer in zip(bases, opt.preconditioner.layers))
    gate.set()
    engine.wait()
    assert not timed_out
    step(model, opt, 4)
    assert not all(torch.equal(b, layer.curvature.q_in) for b, layer in zip(bases, opt.preconditioner.layers))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.remove_hooks()


def test_load_state_dict_drops_refreshes_in_flight():
    model = model_of([9, 13, 7])
    opt = EKFAC(model, lr=0.01, eigen_every=1, synchronous=False)
    step(model, opt, 0)
    state = {k: v for k, v in opt.state_dict().items()}
    saved_q = opt.preconditioner.layers[0].curvature.q_in.clone()
    step(model, opt, 1)  # submits refreshes
    opt.load_state_dict(state)
    assert not opt.preconditioner.eigen._pending
    step(model, opt, 2)  # nothing from the dropped refresh is installed over the loaded state
    torch.testing.assert_close(opt.preconditioner.layers[0].curvature.q_in.abs(), saved_q.abs(), rtol=0, atol=0)
    opt.remove_hooks()


# -- scalings on a basis change ---------------------------------------------------------------------
@pytest.mark.parametrize("scaling", ["per_example", "batch"])
def test_scaling_restarts_from_kfac_products_on_basis_change(monkeypatch, scaling):
    model = model_of([9, 13, 7])
    opt = EKFAC(model, lr=0.01, eigen_every=3, factor_every=3, stagger=False, scaling=scaling, factor_decay=0.9)
    curv = opt.preconditioner.layers[0].curvature
    for k in range(3):
        step(model, opt, k)
    assert curv.scaling_updates == (1 if scaling == "per_example" else 3)
    # Step 3 refreshes the basis; for per_example it also estimates S in the new basis from this
    # batch (its first update: the EMA restarted), for batch S restarts from N·P².
    seen = {}
    real = curv.install_basis

    def spy(new_in, new_out):
        installed = real(new_in, new_out)
        seen["products"] = curv.eigenvalue_products().clone()
        seen["scaling"] = curv.scaling.clone()
        seen["updates"] = curv.scaling_updates
        return installed

    monkeypatch.setattr(curv, "install_basis", spy)
    step(model, opt, 3)
    assert torch.equal(seen["scaling"], seen["products"]) and seen["updates"] == 0
    assert curv.scaling_updates == 1  # then replaced by the first estimate in the new basis
    assert not torch.equal(curv.scaling, seen["products"])


# -- warm starts ----------------------------------------------------------------------------------
def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return x @ x.T / (3 * n) + torch.diag(torch.linspace(0, 2, n, dtype=torch.float64))


def test_subspace_iteration_fixed_point_and_convergence():
    from ekfac_triton.eigen import subspace_iteration

    c = _spd(12, 0)
    exact = torch.linalg.eigh(c)
    same, note = subspace_iteration(c, exact.eigenvectors)
    assert note is None
    # an exact basis is a fixed point (columns reordered, signs free)
    torch.testing.assert_close(torch.sort(same.values).values, exact.eigenvalues, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(same.vectors @ torch.diag(same.values) @ same.vectors.T, c, rtol=1e-10, atol=1e-12)
    # from a perturbed basis, the off-diagonal mass of QᵀCQ shrinks step after step
    q = torch.linalg.qr(exact.eigenvectors + 0.05 * torch.randn(12, 12, generator=torch.Generator().manual_seed(1),
                                                                    dtype=torch.float64)).Q

    def off(q: torch.Tensor) -> float:
        m = q.T @ c @ q
        return (m - torch.diag(m.diagonal())).norm().item()

    errors = [off(q)]
    for _ in range(30):
        q = subspace_iteration(c, q)[0].vectors
        errors.append(off(q))
    assert errors[-1] < 1e-2 * errors[0]  # the rate is set by the eigenvalue ratios
    assert errors[1] < errors[0]


def test_warm_starts_alternate_with_full_eighs(monkeypatch):
    model = model_of([9, 13, 7])
    opt = EKFAC(model, lr=0.01, eigen_every=1, warm_starts=2)
    calls = {"eigh": 0, "qr": 0}
    real_eigh, real_qr = torch.linalg.eigh, torch.linalg.qr

    def eigh(*a, **k):
        calls["eigh"] += 1
        return real_eigh(*a, **k)

    def qr(*a, **k):
        calls["qr"] += 1
        return real_qr(*a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    monkeypatch.setattr(torch.linalg, "qr", qr)
    seen = []
    for k in range(7):
        before = dict(calls)
        step(model, opt, k)
        seen.append("full" if calls["eigh"] > before["eigh"] else "warm" if calls["qr"] > before["qr"] else "-")
    assert seen == ["full", "warm", "warm", "full", "warm", "warm", "full"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_warm_starts_raise():
    with pytest.raises(ValueError, match="warm_starts"):
        EKFAC(model_of([4, 3]), warm_starts=-1)


def test_default_synchronous_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert EigenEngine([1.0], cpu, period=10).synchronous
    # constructing the engine touches no CUDA API until a refresh is submitted
    assert not EigenEngine([1.0], cuda, period=10).synchronous
    assert EigenEngine([1.0], cuda, period=1).synchronous  # the exactness contract's setting
    assert not EigenEngine([1.0], cuda, period=1, synchronous=False).synchronous
