"""Smoke test of the PINN demo (bench/pinn_poisson.py --quick): every optimizer runs, the table,
plot and log are written, errors are finite. No timing or accuracy assertions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")


@pytest.mark.parametrize("problem", ["poisson", "heat"])
def test_pinn_demo_quick(tmp_path: Path, capsys, problem):
    from bench import pinn_poisson

    status = pinn_poisson.main(["--quick", "--problem", problem, "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert "SMOKE RUN" in printed and "| optimizer | hyperparameters | steps |" in printed
    for label in ("KFAC*", "KFAC", "Adam", "SGD"):
        assert f"| {label} |" in printed
    assert (tmp_path / f"{problem}_smoke_error.png").stat().st_size > 10_000
    assert (tmp_path / f"{problem}_smoke_table.md").is_file()
    log = json.loads((tmp_path / f"{problem}_smoke_log.json").read_text())
    assert [r["name"] for r in log["runs"]] == ["kfac_star", "kfac", "adam", "sgd"]
    for run in log["runs"]:
        assert run["steps"] >= 1 and run["status"] == "ok", run["name"]
        assert all(math.isfinite(h["error"]) for h in run["history"]), run["name"]
    assert status == 0
