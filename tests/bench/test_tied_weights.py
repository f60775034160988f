"""Smoke test of bench.tied_weights (CPU, a few steps): each rule gives the tied tensor the owner
it names (head, embedding, none), runs finite, and is written to the summary."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("transformers")


@pytest.mark.slow
def test_tied_weights_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench.tied_weights", "--steps", "3", "--seeds", "0", "--curvatures", "ekfac",
           "--context", "16", "--batch", "4", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    owners = {r["rule"]: r["owner"] for r in results}
    assert owners == {"head": ["lm_head"], "embedding": ["transformer.wte"], "plain": []}
    assert all(r["finite"] and len(r["losses"]) == 3 and math.isfinite(r["test_nats"]) for r in results)
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| ekfac | {rule} |" in summary for rule in owners)
