"""Smoke test of bench.mac_attention (CPU, tiny sizes): every optimizer runs and is reported, and
the attention-marked MAC really preconditions the blocks' fused q/k/v layers as attention."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:          # bench/ lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_mac_attention_quick_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench.mac_attention", "--quick", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = json.loads((tmp_path / "log.json").read_text())
    assert list(log["results"]) == ["mac-attention", "mac", "adamw", "sgd"]
    for r in log["results"].values():
        assert math.isfinite(r["final_train_loss"]) and math.isfinite(r["test_bits_per_byte"])
        assert r["step_ms_median"] > 0
    assert "| mac-attention |" in (tmp_path / "table.md").read_text()


def test_mac_attention_bench_marks_every_qkv_layer() -> None:
    from bench.mac_attention import ByteGPT, settings
    from bench.optimizers import make_optimizer

    model = ByteGPT(d=16, layers=2, heads=2, context=8)
    kind, hparams = settings("mac-attention", model, heads=2)
    opt = make_optimizer(kind, model, hparams)
    marked = [layer.name for layer in opt.preconditioner.layers if layer.curvature.value_rows is not None]
    assert marked == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    plain_model = ByteGPT(d=16, layers=2, heads=2, context=8)
    kind, hparams = settings("mac", plain_model, heads=2)
    plain = make_optimizer(kind, plain_model, hparams)
    assert all(layer.curvature.value_rows is None for layer in plain.preconditioner.layers)
