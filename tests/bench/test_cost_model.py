"""The cost model (bench/cost_model.py) and the step's profiler ranges (ekfac_triton.step.maths).

The floors are exact arithmetic, checked against flop counts written out by hand for small
shapes; the ranges are checked to exist, to be absent when off, and to contain every matrix
product of the optimizer step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench import cost_model
from bench.cost_model import LayerDims, floors, layer_dims, part_floors
from ekfac_triton import EKFAC
from ekfac_triton.step import maths
from tests.helpers import make_mlp


def test_floors_by_hand_linear_one_position() -> None:
    # d_out 3, d_in 4 + bias (d̄_in 5), N = 5 examples of 1 position: T = 5 rows
    f = part_floors(LayerDims("l", d_out=3, d_in=4, bias=True, examples=5, positions=1), eigen_every=10)
    assert f["forward+backward"]["flops"] == 6 * 5 * 4 * 3                     # 360
    assert f["factors"]["flops"] == 2 * 5 * (5 * 5 + 3 * 3)                     # 340
    assert f["factors"]["bytes"] == 3 * (25 + 9) * 4
    assert f["scalings"]["flops"] == 2 * 5 * (9 + 25) + 2 * 5 * 3 * 5           # projections + (gq²)ᵀ(aq²)
    assert f["direction"]["flops"] == 2 * (2 * 3 * 5 * (5 + 3))                 # projection + back-projection: 480
    assert f["direction"]["bytes"] == 3 * 15 * 4
    assert f["update"]["bytes"] == 5 * 15 * 4
    assert f["refresh"]["flops"] == pytest.approx(4 * (5 ** 3 + 3 ** 3) / 10)  # 60.8
    assert f["collect"]["bytes"] == 0
    # the projection from the rows, (ĜQ_out)ᵀ(ĀQ_in)/N: 2·N·d_out·d̄_in, its row projections made by the scalings
    layer = LayerDims("l", d_out=3, d_in=4, bias=True, examples=5, positions=1)
    rows = part_floors(layer, eigen_every=10, form="rows")
    assert rows["direction"]["flops"] == 2 * 5 * 3 * 5 + 2 * 3 * 5 * (5 + 3)   # 150 + 240
    # K-FAC (no per-example scaling) forms the row projections itself: + 2·N·(d_out² + d̄_in²)
    kfac = part_floors(layer, eigen_every=10, scalings=False, form="rows")
    assert kfac["direction"]["flops"] == 2 * 5 * 3 * 5 + 2 * 5 * (9 + 25) + 2 * 3 * 5 * (5 + 3)


def test_floors_by_hand_positions_conv_and_sum() -> None:
    # R = 2 positions: the per-example gradients cost 2·T·d_out·d̄_in; a convolution writes its patches
    conv = LayerDims("c", d_out=3, d_in=4, bias=False, examples=5, positions=2, conv=True)
    f = part_floors(conv, eigen_every=None, scalings=True)
    assert f["scalings"]["flops"] == 2 * 10 * (9 + 16) + 2 * 10 * 3 * 4
    assert f["collect"]["bytes"] == 10 * 4 * 4
    assert "refresh" not in f
    assert "scalings" not in part_floors(conv, None, scalings=False)  # K-FAC: no estimated S
    other = LayerDims("l", d_out=2, d_in=2, bias=False, examples=5, positions=1)
    total = floors([conv, other], eigen_every=None)
    assert total["direction"]["flops"] == 2 * 2 * 3 * 4 * 7 + 2 * 2 * 2 * 2 * 4


def test_layer_dims_of_linear_and_conv() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5, bias=False))
    dims = layer_dims(model, torch.randn(2, 3, 8, 8))
    assert dims[0] == LayerDims("0", 4, 27, True, 2, 64, conv=True)
    assert dims[1] == LayerDims("2", 5, 256, False, 2, 1)
    seq = layer_dims(nn.Linear(6, 7), torch.randn(3, 10, 6))
    assert (seq[0].examples, seq[0].positions) == (3, 10)


def test_ranges_off_cost_nothing() -> None:
    assert not maths.PROFILE_RANGES
    assert maths.profile_range("factors") is maths._NO_RANGE


def _profiled_steps(model: nn.Module, opt: EKFAC, steps: int) -> torch.profiler.profile:
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(2):  # the first basis outside the window
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    maths.PROFILE_RANGES = True
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                nn.functional.mse_loss(model(x), y).backward()
                with torch.profiler.record_function("test::step"):
                    opt.step()
    finally:
        maths.PROFILE_RANGES = False
    return prof


def test_ranges_exist_and_cover_the_step() -> None:
    torch.manual_seed(0)
    model = make_mlp([6, 8, 3], dtype=torch.float32)
    opt = EKFAC(model, lr=0.01, damping=0.1, eigen_every=2, stagger=False)
    try:
        prof = _profiled_steps(model, opt, steps=2)
    finally:
        opt.remove_hooks()
    events = prof.events()
    names = {e.name for e in events}
    expected = {f"ekfac::{n}" for n in maths.RANGES if n != "install"}  # install: asynchronous bases only
    assert expected <= names, expected - names
    # every matrix product and eigendecomposition of the optimizer's step lies inside an ekfac:: range

    def uncovered(ev, inside: bool) -> list[str]:
        inside = inside or ev.name.startswith("ekfac::")
        here = [] if inside or ev.name not in cost_model.GEMM_OPS else [ev.name]
        return here + [n for c in ev.cpu_children for n in uncovered(c, inside)]

    steps = [e for e in events if e.name == "test::step"]
    assert len(steps) == 2
    gemms = [n for s in steps for n in uncovered(s, False)]
    assert gemms == []
    inside = sum(1 for e in events if e.name in cost_model.GEMM_OPS and e.cpu_parent is not None)
    assert inside > 0
    # with the flag off, no range is entered
    opt2 = EKFAC(model, lr=0.01, damping=0.1, eigen_every=2)
    try:
        x, y = torch.randn(16, 6), torch.randn(16, 3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof2:
            opt2.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt2.step()
    finally:
        opt2.remove_hooks()
    assert not any(e.name.startswith("ekfac::") for e in prof2.events())


def test_rows_read_against_floors() -> None:
    # a measured part of 2x its floor time reads as 2.0 x floor
    rates = cost_model.Rates(gemm_flops_per_s=1e9, copy_bytes_per_s=1e9)
    dims = [LayerDims("l", 3, 4, True, 5, 1)]
    cfg = next(c for c in cost_model.configurations(10**9) if c.name == "ekfac-e10-stagger")
    fl = floors(dims, 10)
    direction_ms = 2 * (fl["direction"]["flops"] / 1e9 + fl["direction"]["bytes"] / 1e9) * 1e3
    measured = dict(parts={"direction": dict(ms=direction_ms, gemm_ms=0.0, calls_per_step=1.0)})
    rows = cost_model.rows_for("m", cfg, dims, measured, rates, n_params=15)
    row = next(r for r in rows if r["part"] == "direction")
    assert row["over_floor"] == pytest.approx(2.0)
    total = next(r for r in rows if r["part"] == "optimizer")
    assert total["floor_gflop"] * 1e9 == pytest.approx(sum(v["flops"] for k, v in fl.items() if k != "forward+backward"))


@pytest.mark.slow
def test_cost_model_smoke() -> None:
    result = cost_model.main(["--size", "tiny", "--models", "autoencoder", "--configs", "sgd,ekfac-e10-stagger",
                              "--steps", "10", "--warmup", "10", "--no-write"])
    parts = {r["part"] for r in result["rows"] if r["config"] == "ekfac-e10-stagger"}
    assert {"forward+backward", "factors", "scalings", "direction", "refresh", "update", "optimizer"} <= parts
    for r in result["rows"]:
        assert math.isfinite(r["ms"]) and r["ms"] >= 0
    assert result["rates"]["gemm_flops_per_s"] > 0
