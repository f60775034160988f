"""The peers benchmark (bench/peers.py), its optimizers (bench/optimizers.py) and the scaling
sweep (bench/scaling.py) at tiny sizes; the sweep's flop counts by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import peers, scaling
from bench.optimizers import Combined, make_optimizer, release


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("kind, module, hparams", [
    ("soap", "heavyball", dict(lr=1e-3, precondition_frequency=2)),
    ("muon", None, dict(lr=0.02)),
    ("singd", "singd", dict(lr=1e-2, T=2)),
])
def test_peer_trains_every_parameter_and_releases(kind: str, module: str | None, hparams: dict) -> None:
    if module is not None:
        pytest.importorskip(module, reason=f"{module} is in the peers extra: pip install -e '.[peers]'")
    if kind == "muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    model = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(kind, model, hparams)
    x, y = torch.randn(10, 6), torch.randn(10, 3)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(moved), moved  # the LayerNorm's parameters too (AdamW for Muon's and SINGD's rest)
    covered = sum(len(g["params"]) for g in opt.param_groups)
    assert covered == len(list(model.parameters()))
    release(opt)
    assert all(not m._forward_hooks for m in model.modules())


def test_combined_refuses_a_closure() -> None:
    model = _tiny()
    opt = Combined([torch.optim.SGD(model.parameters(), lr=0.1)])
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)


def test_unknown_optimizer_names_the_argument() -> None:
    with pytest.raises(SystemExit):
        peers.parse_args(["--optimizers", "sgd,nope"])


def test_round_robin_step_times() -> None:
    cfgs = [c for c in peers.step_configs() if c.kind in ("sgd", "ekfac", "muon")]
    rows = peers.step_times(scaling.block_workload(16, 8), cfgs, warmup=2, block=2, rounds=2, memory=False,
                            progress=False)
    assert [r["optimizer"] for r in rows] == ["sgd", "ekfac", "muon"]
    for r in rows:
        assert r["timed_steps"] == 4 and r["mean_ms"] > 0 and math.isfinite(r["final_loss"])
    assert rows[0]["mean_over_sgd"] == 1.0
    assert rows[1]["mean_over_sgd"] == pytest.approx(rows[1]["mean_ms"] / rows[0]["mean_ms"])
    # Muon + AdamW hold a momentum buffer per weight matrix and two moments per bias: > 0 bytes
    weights = sum(p.numel() * 4 for p in scaling.block_workload(16, 8).model.parameters() if p.ndim == 2)
    assert rows[2]["state_mb"] * 2**20 >= weights


def test_projection_flops_and_crossover_by_hand() -> None:
    direct, per_example = scaling.projection_flops(n=7, d_out=3, d_in_bar=5)
    assert direct == 2 * 3 * 5 * (5 + 3) and per_example == 2 * 7 * 3 * 5
    n_star = scaling.crossover(3, 5)
    assert n_star == 8
    assert scaling.projection_flops(n_star, 3, 5)[0] == scaling.projection_flops(n_star, 3, 5)[1]


@pytest.mark.slow
def test_peers_and_scaling_quick_smoke(tmp_path: Path) -> None:
    pytest.importorskip("heavyball")
    pytest.importorskip("singd")
    pytest.importorskip("matplotlib")
    rows = peers.main(["--quick", "--tasks", "none", "--step-models", "autoencoder", "--no-progress",
                       "--out", str(tmp_path / "peers")])["step_time"]
    assert {r["optimizer"] for r in rows} == set(peers.OPTIMIZERS)
    assert all(r.get("peak_mb", 0) > 0 for r in rows)
    assert "SMOKE RUN" in (tmp_path / "peers" / "step_time.md").read_text()
    cells = scaling.main(["--quick", "--batches", "8,32", "--widths", "8", "--optimizers", "sgd,ekfac",
                          "--no-progress", "--out", str(tmp_path / "scaling")])
    assert [(c["N"], c["d"]) for c in cells] == [(8, 8), (32, 8)]
    assert (tmp_path / "scaling" / "scaling.png").stat().st_size > 0


def test_singd_state_counts_its_preconditioner_matrices() -> None:
    pytest.importorskip("singd", reason="singd is in the peers extra: pip install -e '.[peers]'")
    from bench.memory import state_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = make_optimizer("singd", model, dict(lr=1e-2, T=1))
    opt.zero_grad(set_to_none=True)
    model(torch.randn(4, 6)).square().mean().backward()
    opt.step()
    held = sum(state_bytes(o, model) for o in opt.optimizers)
    # per layer a dense K (d̄_in²) and C (d_out²), plus a momentum buffer per parameter
    kc = 4 * (7 * 7 + 5 * 5 + 6 * 6 + 3 * 3)
    momentum = 4 * sum(p.numel() for p in model.parameters())
    assert held >= kc + momentum
    release(opt)
