"""The GPT-2 example, ``python -m bench.gpt2``: a tiny smoke run of EKFAC, AdamW and Muon, the
Muon/AdamW parameter split and the EKFAC coverage report (skipped without transformers)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
if not hasattr(torch.optim, "Muon"):
    pytest.skip("torch.optim.Muon needs torch >= 2.9", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:          # bench/ lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

from transformers.pytorch_utils import Conv1D  # noqa: E402

from bench import gpt2  # noqa: E402
from bench.optimizers import LABELS, MuonWithAdamW, make_optimizer, muon_matrices  # noqa: E402


def tiny(**kw) -> gpt2.ExampleConfig:
    return gpt2.quick_config(gpt2.ExampleConfig(device="cpu", **kw))


def test_quick_run_writes_outputs_and_trains(tmp_path, capsys):
    out = tmp_path / "gpt2"
    # a step cap only (--seconds 0), so a busy machine cannot starve a run; one thread
    status = gpt2.main(["--quick", "--device", "cpu", "--seconds", "0", "--steps", "8", "--threads", "1",
                        "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "EKFAC preconditions" in printed
    for name in ("table.md", "log.csv", "log.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss.png").stat().st_size > 10_000

    log = json.loads((out / "log.json").read_text())
    runs = {r["optimizer"]: r for r in log["runs"]}
    assert list(runs) == list(gpt2.OPTIMIZERS)
    for name, r in runs.items():
        assert r["status"] == "ok" and r["steps"] == 8, (name, r["status"], r["steps"])
        assert all(math.isfinite(e["train_loss"]) and math.isfinite(e["test_metric"]) for e in r["evals"]), name
        assert math.isfinite(r["final_test_metric"]) and r["step_stats_ms"]["mean"] > 0, name
    adamw = runs["adamw"]["evals"]
    assert adamw[-1]["train_loss"] < adamw[0]["train_loss"] - 0.05   # 8 steps at lr 3e-3 learn something
    assert log["environment"]["transformers"] and log["environment"]["date"]
    table = (out / "table.md").read_text()
    for label in (LABELS[kind] for kind in ("ekfac", "adamw", "muon")):
        assert f"| {label} |" in table
    assert "held-out bits/byte" in table


def test_coverage_partitions_the_parameters():
    torch.manual_seed(0)
    for tie in (True, False):
        config = tiny(tie_embeddings=tie)
        model = gpt2.gpt2_model(config)
        coverage = gpt2.preconditioned_fraction(model, gpt2.HPARAMS["ekfac"])
        total = sum(p.numel() for p in model.parameters())     # a tied weight counts once
        plain = sum(e["parameters"] for e in coverage["plain_update"].values())
        # every parameter is in a preconditioned module or in one left to the plain update
        assert coverage["parameters"] == total
        assert coverage["preconditioned_parameters"] + plain == total, (tie, coverage)
        assert 0 < coverage["fraction"] <= 1
        assert "transformer.wpe" in coverage["preconditioned_modules"]
        # the head is preconditioned, tied (it owns the shared weight) or not; the Conv1D layers too
        assert "lm_head" in coverage["preconditioned_modules"]
        assert "transformer.h.0.attn.c_attn" in coverage["preconditioned_modules"]
        assert coverage["fraction"] > 0.95
        assert not any(h._forward_hooks or h._backward_hooks for h in model.modules())   # hooks removed


@pytest.mark.parametrize("tie", [True, False])
def test_muon_gets_the_hidden_matrices_only(tie):
    model = gpt2.gpt2_model(tiny(tie_embeddings=tie))
    matrices, rest = muon_matrices(model)
    conv_weights = [m.weight for m in model.modules() if isinstance(m, Conv1D)]
    assert {id(p) for p in matrices} == {id(p) for p in conv_weights}
    assert all(p.ndim == 2 for p in matrices)
    params = {id(p) for p in model.parameters()}
    assert {id(p) for p in rest} | {id(p) for p in matrices} == params and len(rest) + len(matrices) == len(params)
    for p in (model.transformer.wte.weight, model.transformer.wpe.weight, model.lm_head.weight):
        assert any(p is q for q in rest)


def test_muon_with_adamw_steps_both_and_resumes():
    torch.manual_seed(0)
    config = tiny()
    model = gpt2.gpt2_model(config)
    opt = make_optimizer("muon", model, gpt2.HPARAMS["muon"])
    assert isinstance(opt, MuonWithAdamW)
    batch = next(gpt2.gpt2_task(config).batches(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        gpt2.next_byte_loss(model, batch).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "transformer.h.0.attn.c_attn.weight" in changed and "transformer.wte.weight" in changed
    assert "transformer.ln_f.weight" in changed
    fresh = make_optimizer("muon", model, gpt2.HPARAMS["muon"])
    fresh.load_state_dict(opt.state_dict())
    for a, b in zip((opt.muon, opt.adamw), (fresh.muon, fresh.adamw)):
        for p in a.state:
            for key, value in a.state[p].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b.state[p][key])), key
    with pytest.raises(ValueError, match="state_dict"):
        fresh.load_state_dict({"muon": opt.muon.state_dict()})


def test_muon_without_an_output_head_api_takes_every_matrix_but_embeddings():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 8), torch.nn.LayerNorm(8),
                                torch.nn.Linear(8, 3))
    matrices, rest = muon_matrices(model)
    assert [id(p) for p in matrices] == [id(model[1].weight), id(model[3].weight)]
    assert {id(p) for p in rest} == {id(model[0].weight), id(model[1].bias), id(model[2].weight), id(model[2].bias),
                                     id(model[3].bias)}


def test_grid_points_move_both_muon_learning_rates():
    points = gpt2.hparam_points("muon", grid=True)
    assert [p["lr"] for p in points] == gpt2.LR_GRID["muon"]
    assert all(p["adamw"]["lr"] == p["lr"] for p in points)
    assert gpt2.hparam_points("ekfac", grid=False) == [gpt2.HPARAMS["ekfac"]]


@pytest.mark.parametrize("argv, option", [(["--heads", "3", "--d", "32"], "--heads"),
                                           (["--optimizers", "sgd"], "--optimizers"),
                                           (["--seconds", "0"], "--seconds")])
def test_bad_arguments_name_the_option(argv, option, capsys):
    with pytest.raises(SystemExit):
        gpt2.parse_args(argv)
    assert option in capsys.readouterr().err
