"""Smoke test of bench.compile_step (CPU, tiny sizes): it runs and reports every mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_compile_step_quick_smoke(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")  # the bench extra
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench.compile_step", "--quick", "--device", "cpu", "--models", "autoencoder",
           "--warmup", "2", "--steps", "2", "--profile-steps", "1", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["optimizer"], r["mode"]) for r in rows] == [(o, m) for o in ("sgd", "ekfac")
                                                           for m in ("eager", "compiled", "compiled+step")]
    assert all(r["median_ms"] > 0 and r["launches_per_step"] > 0 for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert "| autoencoder | ekfac | compiled |" in table and "| autoencoder | ekfac | compiled+step |" in table
