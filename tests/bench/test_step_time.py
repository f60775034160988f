"""Smoke test of the step-time benchmark (bench/step_time.py): the --quick CPU path end to end.

No timing assertions: only that every configuration ran and produced finite positive times."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["sgd", "adamw", "ekfac-e10-stagger", "ekfac-e10-all-at-once", "ekfac-e100-stagger",
           "ekfac-e100-all-at-once", "ekfac-no-refresh", "kfac-e10-stagger", "mac-s5-e50"]


@pytest.mark.slow
def test_step_time_quick_smoke(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    # One thread: LAPACK/OpenMP spin-waiting makes a small eigh ~100x slower on a busy 2-core machine.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench.step_time", "--quick", "--device", "cpu", "--models", "mlp-stack",
           "--warmup", "2", "--steps", "3", "--threads", "1", "--no-progress", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SMOKE RUN" in proc.stdout
    for name in CONFIGS:
        assert f"| mlp-stack | {name} |" in proc.stdout

    md = tmp_path / "step_time_smoke.md"
    csv_path = tmp_path / "step_time_smoke.csv"
    json_path = tmp_path / "step_time_smoke.json"
    for p in (md, csv_path, json_path):
        assert p.is_file() and p.stat().st_size > 0, p
    assert "SMOKE RUN" in md.read_text()

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["config"] for r in rows) == sorted(CONFIGS)
    for r in rows:
        assert r["model"] == "mlp-stack"
        for key in ("mean_ms", "median_ms", "p20_ms", "p80_ms", "worst_ms", "mean_over_sgd", "worst_over_median",
                    "peak_bytes", "peak_over_sgd", "model_bytes"):
            value = float(r[key])
            assert math.isfinite(value) and value > 0, (r["config"], key, r[key])

    data = json.loads(json_path.read_text())
    env_info = data["environment"]
    for key in ("device_name", "torch", "triton", "date", "command"):
        assert key in env_info
    assert data["settings"]["quick"] is True and data["settings"]["synthetic_data"] is True
    results = {r["config"]: r for r in data["results"]}
    assert sorted(results) == sorted(CONFIGS)
    for name, r in results.items():
        assert r["warmup"] == 2 and r["steps"] == 3 and len(r["times_ms"]) == 3, name
        assert all(math.isfinite(t) and t > 0 for t in r["times_ms"]), name
        assert r["finite"], name
        if name.startswith(("ekfac", "kfac")):
            assert math.isfinite(r["mean_over_no_refresh"]) and r["mean_over_no_refresh"] > 0, name
        # memory: the peak holds at least the parameters, their gradients and the optimizer state
        assert r["peak_bytes"] >= 2 * r["model_bytes"] + r["state_bytes"], name
    # every configuration keeps at least SGD's momentum buffers (AdamW: two moments per parameter)
    # SGD's state is one momentum buffer per parameter (the MLP has no module buffers)
    assert results["sgd"]["state_bytes"] == results["sgd"]["model_bytes"]
    for name, r in results.items():
        assert r["state_bytes"] >= results["sgd"]["state_bytes"] > 0, name
    assert results["ekfac-e10-stagger"]["state_bytes"] > results["mac-s5-e50"]["state_bytes"]
    assert "| model | MAC/K-FAC mean step |" in md.read_text()
