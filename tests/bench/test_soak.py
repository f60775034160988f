"""Smoke tests of bench.soak (CPU, tiny settings): the faults are injected, survived, and the final
states equal their references bit for bit.

The fast test runs the in-process kinds (storms, overflows, eigh failures, interrupts) in this
process; the slow one runs ``python -m bench.soak --quick`` whole (kill -9 children and the
two-process gloo run included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:          # bench/ lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

from bench import soak  # noqa: E402


def _check_log(log: dict, kinds: list[str]) -> None:
    faults = log["faults"]
    assert {r["run"] for r in faults} == set(kinds)
    for kind in kinds:
        assert any(r["run"] == kind for r in faults), kind
    assert all(r["survived"] for r in faults), [r for r in faults if not r["survived"]]
    failed = [r for r in faults if r["contract_failures"]]
    assert not failed, failed
    for run in log["runs"]:
        assert run["state_finite"] and not run["anomalies"], run
        if run["kind"] != "eigh":
            assert run["reference"]["equal"], run  # bit for bit
    # the skip kinds lost exactly their poisoned steps; interrupts one redone step each
    for r in faults:
        if r["kind"] == "interrupt":
            assert r["lost"] == 1
        if r["kind"] == "storm" and r["run"] == "storm":
            assert r["lost"] == r["length"]


def test_soak_quick_in_process(tmp_path: Path, one_torch_thread) -> None:
    kinds = ["storm", "overflow", "eigh", "interrupt"]
    code = soak.main(["--quick", "--kinds", ",".join(kinds), "--out", str(tmp_path), "--no-progress"])
    log = json.loads((tmp_path / "log.json").read_text())
    _check_log(log, kinds)
    assert code == 0 and log["all_checks_passed"]
    table = (tmp_path / "table.md").read_text()
    assert "| kind | injected | survived | steps lost | final state equals reference |" in table
    for kind in kinds:
        assert f"| {soak.LABELS[kind]} |" in table
    assert log["environment"]["torch"] and log["settings"]["quick"]
    # every kind injected something, for both optimizers
    assert {(r["run"], r["optimizer"]) for r in log["faults"]} == {(k, o) for k in kinds for o in ("ekfac", "kfac")}


@pytest.mark.slow
def test_soak_quick_all_kinds(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")  # the bench extra
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--quick", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = json.loads((tmp_path / "log.json").read_text())
    kinds = list(soak.KINDS)
    ranks = [r for r in log["faults"] if r["run"] == "rank-lost"]
    if ranks and ranks[0]["variant"] == "skipped":  # no gloo: the row says so
        kinds.remove("rank-lost")
        log["faults"] = [r for r in log["faults"] if r["run"] != "rank-lost"]
    _check_log(log, kinds)
    kills = [r for r in log["faults"] if r["kind"] == "kill9"]
    assert kills and all(r["checks"]["loaded"] for r in kills)
    for r in [r for r in log["faults"] if r["kind"] == "rank-lost"]:
        assert not r["checks"]["rank0_hung"] and r["checks"]["seconds_to_error"] <= soak.PG_TIMEOUT_S + 1
    assert "| **total** |" in proc.stdout
