"""A small GPT-2 trained from scratch with EKFAC, AdamW and Muon: ``python -m bench.gpt2``.

The example to copy for a ``transformers`` model: ``GPT2LMHeadModel`` built from a
``GPT2Config`` (no pretrained weights, nothing downloaded; default 2 layers, d 128, 4 heads,
context 128, vocabulary 256 = bytes, dropout off; batch 16 windows) is trained as a byte-level
language model on the running Python's standard-library source (:func:`bench.experiments.stdlib_corpus`; the first 95%
for training, the last 5% held out) with three optimizers on the same batches from the same
initial weights, each for the same wall-clock budget (``--seconds``):

* ``ekfac``: ``EKFAC(model, ...)`` — the whole model given to the optimizer, which preconditions
  the layers it has an adapter for and gives every other parameter its plain momentum update
  (the fraction it preconditions is printed at the start and recorded in the log);
* ``adamw``: ``torch.optim.AdamW(model.parameters(), ...)``;
* ``muon``: ``torch.optim.Muon`` (torch >= 2.9) on the hidden weight matrices, ``AdamW`` on the
  embeddings, norms, biases and the head (:class:`bench.optimizers.MuonWithAdamW`).

Loss: cross-entropy per byte (nats), the mean over the batch's tokens; train loss on 64 fixed
train windows; held-out bits per byte on 64 fixed held-out windows during training and on up to
256 non-overlapping held-out windows at the end. The harness is ``bench.train``'s
(:mod:`bench.runner`, :mod:`bench.report`): the clock counts forward, backward and step only, and
evaluations run between steps without gradients. Written to ``--out`` (default
``bench/results/gpt2/<device>/``): ``table.md`` (the summary, also printed), ``loss.png`` (train
loss vs wall-clock and vs step), ``log.json`` (settings, environment with date and machine, the
preconditioned fraction, every evaluation) and ``log.csv`` (every step).

Hyperparameters: :data:`HPARAMS`, passed explicitly (not the constructors' defaults), chosen by a
short learning-rate sweep (``--grid``: :data:`LR_GRID`, the best final train loss selected).

Examples (from the repository root; ``pip install -e ".[bench,models]"``)::

    python -m bench.gpt2                        # 60 s per optimizer
    python -m bench.gpt2 --seconds 30 --optimizers ekfac,adamw
    python -m bench.gpt2 --grid --seconds 15    # the learning-rate sweep
    python -m bench.gpt2 --quick                # a few-second smoke run (tiny model)
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ekfac_triton import EKFAC

from .environment import command_line, device_slug, environment
from .experiments import Batch, Task, _chunked_mean, _evaluate, stdlib_corpus
from .optimizers import LABELS
from .report import Run, write_report
from .runner import Settings, require_extras, run_optimizers, torch_threads

RESULTS = Path(__file__).resolve().parent / "results" / "gpt2"
OPTIMIZERS = ("ekfac", "adamw", "muon")

# The learning rates come from `python -m bench.gpt2 --grid --seconds 20 --threads 1`
# (bench/results/gpt2/cpu-grid/: one thread of the shared, busy 2-core CPU, 60-80 steps per
# point, final train loss): EKFAC 0.03 (3.28; 0.1: 3.45; 0.3 diverged), AdamW 1e-3 (2.90; 3e-3:
# 3.17; 1e-2: 2.98), Muon 1e-2 (2.37; 3e-3: 2.41; 3e-2: 2.45). Short and noisy: redo it on the
# machine and budget that matter. EKFAC's lr is mostly that of its plain momentum update while it
# preconditions few of GPT-2's parameters (printed at the start). The rest is common practice for
# small GPTs: AdamW betas (0.9, 0.95); Muon's momentum 0.95 with Nesterov; EKFAC's transformer
# settings of bench.experiments (damping 1e-3, eigenbases every 10 steps, KL clip 1e-3). No weight
# decay anywhere (a one-minute run).
HPARAMS: dict[str, dict[str, Any]] = {
    "ekfac": dict(lr=0.1, damping=1e-2, momentum=0.9, weight_decay=0.0, factor_decay=0.95, factor_every=1,
                  eigen_every=10, kl_clip=1e-3),
    "adamw": dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0),
    # one lr for both halves: match_rms_adamw gives Muon's updates AdamW's RMS
    "muon": dict(lr=1e-2, momentum=0.95, nesterov=True, weight_decay=0.0, adjust_lr_fn="match_rms_adamw",
                 adamw=dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)),
}
#: ``--grid``: the learning rates tried (Muon's AdamW half follows its lr).
LR_GRID: dict[str, list[float]] = {"ekfac": [0.03, 0.1, 0.3], "adamw": [1e-3, 3e-3, 1e-2], "muon": [3e-3, 1e-2, 3e-2]}


def hparam_points(name: str, grid: bool) -> list[dict[str, Any]]:
    """The hyperparameter points optimizer ``name`` runs: :data:`HPARAMS`, or its lr grid."""
    default = HPARAMS[name]
    if not grid:
        return [dict(default)]
    points = []
    for lr in LR_GRID[name]:
        point = {**default, "lr": lr}
        if "adamw" in default:
            point["adamw"] = {**default["adamw"], "lr": lr}
        points.append(point)
    return points


@dataclass(kw_only=True)
class ExampleConfig(Settings):
    """The options of one run (:class:`bench.runner.Settings` plus the model's and the data's sizes)."""

    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZERS))
    budget_seconds: float | None = 60.0
    eval_points: int = 20
    layers: int = 2
    d: int = 128
    heads: int = 4
    context: int = 128
    batch_size: int = 16
    tie_embeddings: bool = True             # GPT-2's default: the head is the token embedding
    corpus_bytes: int = 8_000_000
    eval_windows: int = 64                  # fixed train and held-out windows tracked during training
    final_windows: int = 256                # held-out windows of the final bits per byte
    grid: bool = False
    out: Path | None = None


def quick_config(config: ExampleConfig) -> ExampleConfig:
    """A smoke-test variant: a tiny GPT-2 (1 layer, d 32, context 32), a few steps, small data."""
    config.quick = True
    config.layers, config.d, config.heads, config.context, config.batch_size = 1, 32, 2, 32, 8
    config.corpus_bytes, config.eval_windows, config.final_windows = 400_000, 8, 16
    config.steps = min(config.steps or 8, 8)
    if config.budget_seconds is not None:
        config.budget_seconds = min(config.budget_seconds, 10.0)
    config.eval_every_steps = 4
    return config


def gpt2_model(config: ExampleConfig) -> nn.Module:
    """A fresh ``GPT2LMHeadModel`` from a ``GPT2Config`` of ``config``'s sizes (the caller seeds
    torch): vocabulary 256 (bytes), dropout off, no special tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2Config(vocab_size=256, n_positions=config.context, n_embd=config.d, n_layer=config.layers,
                      n_head=config.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=None, eos_token_id=None, tie_word_embeddings=config.tie_embeddings)
    return GPT2LMHeadModel(gpt2)


def next_byte_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Cross-entropy of the next byte (nats), the mean over the batch's tokens."""
    x, y = batch
    return F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())


def gpt2_task(config: ExampleConfig) -> Task:
    """The byte-level language-modelling task on the standard library's source for ``config``."""
    device = torch.device(config.device)
    text, n_files = stdlib_corpus(config.corpus_bytes)
    digest = hashlib.sha256(text).hexdigest()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    split = int(0.95 * data.numel())
    train, held_out = data[:split].to(device), data[split:].to(device)
    span = config.context + 1
    offsets = torch.arange(span, device=device)
    g = torch.Generator().manual_seed(4321)

    def windows(source: Tensor, starts: Tensor) -> Batch:
        w = source[starts.to(device)[:, None] + offsets].long()
        return w[:, :-1], w[:, 1:]

    eval_train = windows(train, torch.randint(0, train.numel() - span, (config.eval_windows,), generator=g))
    eval_held_out = windows(held_out, torch.randint(0, held_out.numel() - span, (config.eval_windows,), generator=g))
    n_final = min(config.final_windows, held_out.numel() // span)
    final = windows(held_out, torch.arange(n_final) * span)          # non-overlapping, from the split's start

    def batches(seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield windows(train, torch.randint(0, train.numel() - span, (config.batch_size,), generator=gen))

    def nats(batch: Batch) -> Callable[[nn.Module], float]:
        return lambda model: _evaluate(model, lambda: _chunked_mean(
            batch[0].shape[0], 32, lambda s: float(next_byte_loss(model, (batch[0][s], batch[1][s])))))

    def bits(batch: Batch) -> Callable[[nn.Module], float]:
        mean_nats = nats(batch)
        return lambda model: mean_nats(model) / math.log(2)

    tied = "tied to the token embedding" if config.tie_embeddings else "untied"
    return Task("gpt2", lambda: gpt2_model(config), batches, next_byte_loss, nats(eval_train), bits(eval_held_out),
                loss_name="cross-entropy (nats/byte)", test_metric_name="held-out bits/byte", higher_is_better=False,
                description=dict(
                    model=(f"transformers GPT2LMHeadModel from GPT2Config: {config.layers} layers, d={config.d}, "
                           f"{config.heads} heads, context {config.context}, vocabulary 256 (bytes), dropout 0, "
                           f"head {tied}"),
                    data=(f"the Python standard library's .py source ({sysconfig.get_paths()['stdlib']}, {n_files} "
                          f"files, {len(text):,} bytes, SHA-256 {digest[:16]}...): first 95% train, last 5% "
                          f"held out; batch {config.batch_size} x {config.context} bytes"),
                    corpus_sha256=digest, corpus_bytes=len(text),
                    train_loss=f"{config.eval_windows} fixed train windows",
                    test_metric=(f"{config.eval_windows} fixed held-out windows during training, {n_final} "
                                 "non-overlapping held-out windows at the end"),
                    batch_size=config.batch_size),
                final_test_metric=bits(final))


# -- what EKFAC preconditions ---------------------------------------------------------------------
def preconditioned_fraction(model: nn.Module, hparams: dict[str, Any]) -> dict[str, Any]:
    """What ``EKFAC(model, **hparams)`` preconditions, from its public report: the fraction of the
    model's (distinct) trainable parameters in preconditioned modules, those modules, and the
    modules left to the plain update grouped by reason (with their parameter counts), plus the
    warnings the constructor issued. The optimizer's hooks are removed again."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = EKFAC(model, **hparams)
    try:
        names = optimizer.preconditioned_modules()
        plain = optimizer.plain_update_report()
        report = optimizer.coverage()
    finally:
        optimizer.remove_hooks()
    named = dict(model.named_parameters())
    reasons: dict[str, dict[str, Any]] = {}
    for name, reason in plain.items():
        module = model.get_submodule(name)
        entry = reasons.setdefault(f"{type(module).__name__}: {reason}", dict(modules=0, parameters=0))
        entry["modules"] += 1
        entry["parameters"] += sum(named[f"{name}.{local}"].numel() for local, _ in module.named_parameters(recurse=False)
                                   if f"{name}.{local}" in report.plain)
    return dict(fraction=report.fraction, preconditioned_parameters=report.preconditioned,
                parameters=report.trainable, preconditioned_modules=names, plain_update=reasons,
                warnings=sorted({str(w.message) for w in caught}))


def describe_coverage(coverage: dict[str, Any]) -> str:
    """One paragraph: the fraction, the preconditioned modules, the plain-update groups."""
    modules = ", ".join(coverage["preconditioned_modules"]) or "none"
    lines = [f"EKFAC preconditions {coverage['preconditioned_parameters']:,} of {coverage['parameters']:,} "
             f"parameters ({100 * coverage['fraction']:.1f}%): {modules}"]
    for reason, entry in coverage["plain_update"].items():
        lines.append(f"  plain update, {entry['modules']} module(s), {entry['parameters']:,} parameters: {reason}")
    return "\n".join(lines)


# -- running --------------------------------------------------------------------------------------
def default_out(config: ExampleConfig) -> Path:
    """``bench/results/gpt2/<device>[-quick][-grid]``."""
    suffix = ("-quick" if config.quick else "") + ("-grid" if config.grid else "")
    return RESULTS / f"{device_slug(torch.device(config.device))}{suffix}"


def run(config: ExampleConfig, command: str = "", *, progress: bool = True) -> tuple[list[Run], str, dict[str, Any]]:
    """Run every optimizer of ``config`` (every grid point with ``grid``); write ``table.md``,
    ``loss.png``, ``log.json`` and ``log.csv`` into the output folder; return the runs, the
    summary table and what EKFAC preconditions (:func:`preconditioned_fraction`)."""
    require_extras("bench.gpt2")
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError as e:
        raise SystemExit('error: bench.gpt2 needs transformers: pip install -e ".[models]"') from e
    out = config.out or default_out(config)
    with torch_threads(config.threads):
        task = gpt2_task(config)
        torch.manual_seed(config.seed)
        coverage = preconditioned_fraction(task.model(), HPARAMS["ekfac"])
        if progress:
            print(describe_coverage(coverage), flush=True)
        task.description["ekfac_coverage"] = coverage
        task.description["note"] = (f"EKFAC preconditions {100 * coverage['fraction']:.1f}% of the parameters "
                                    f"({', '.join(coverage['preconditioned_modules']) or 'no module'}); the rest get "
                                    "its plain momentum update (log.json: ekfac_coverage)")
        points = {name: hparam_points(name, config.grid) for name in config.optimizers}
        runs = run_optimizers(task, points, config, progress=progress)
        env = environment(torch.device(config.device), command or command_line("bench.gpt2", []),
                          transformers=transformers.__version__)
    table = write_report(out, "gpt2", task, runs, env, config.record(), config.limit,
                         f"GPT-2 ({config.layers} layers, d {config.d}), bytes of the standard library",
                         summary_file="table.md")
    return runs, table, coverage


def parse_args(argv: Sequence[str] | None = None) -> ExampleConfig:
    """The command-line options as an :class:`ExampleConfig`."""
    default = ExampleConfig()
    p = argparse.ArgumentParser(prog="python -m bench.gpt2", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=default.budget_seconds,
                   help="training wall-clock per optimizer (default %(default)s; 0: none, then --steps is needed)")
    p.add_argument("--steps", type=int, default=None, help="cap on the steps per optimizer")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list of %(default)s")
    p.add_argument("--device", default=default.device, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--layers", type=int, default=default.layers, help="default %(default)s")
    p.add_argument("--d", type=int, default=default.d, help="model width (default %(default)s)")
    p.add_argument("--heads", type=int, default=default.heads, help="default %(default)s")
    p.add_argument("--context", type=int, default=default.context, help="default %(default)s")
    p.add_argument("--batch-size", type=int, default=default.batch_size, help="default %(default)s")
    p.add_argument("--untie-embeddings", action="store_true",
                   help="an output head of its own instead of GPT-2's tied token embedding")
    p.add_argument("--grid", action="store_true", help="run each optimizer's lr grid, report the best")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default bench/results/gpt2/<device>[-quick][-grid])")
    p.add_argument("--quick", action="store_true", help="tiny model and data, <= 8 steps and <= 10 s each")
    a = p.parse_args(argv)
    optimizers = [o.strip() for o in a.optimizers.split(",") if o.strip()]
    unknown = [o for o in optimizers if o not in OPTIMIZERS]
    if unknown or not optimizers:
        p.error(f"--optimizers: unknown {unknown}; choose from {','.join(OPTIMIZERS)}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available in this torch build ({torch.__version__})")
    for name in ("layers", "d", "heads", "context", "batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    if a.d % a.heads:
        p.error(f"--heads {a.heads}: must divide --d {a.d}")
    budget = a.seconds if a.seconds and a.seconds > 0 else None
    if budget is None and a.steps is None:
        p.error("give --seconds > 0 or --steps")
    config = ExampleConfig(optimizers=optimizers, budget_seconds=budget, steps=a.steps, device=a.device,
                           seed=a.seed, threads=a.threads, layers=a.layers, d=a.d, heads=a.heads,
                           context=a.context, batch_size=a.batch_size, tie_embeddings=not a.untie_embeddings,
                           grid=a.grid, out=a.out)
    return quick_config(config) if a.quick else config


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.gpt2``; prints the table; returns 0 when every reported
    run finished cleanly."""
    args = list(sys.argv[1:] if argv is None else argv)
    config = parse_args(args)
    print(f"gpt2: device={config.device} threads={config.threads or torch.get_num_threads()} limit={config.limit} "
          f"optimizers={','.join(LABELS[o] for o in config.optimizers)}{' grid' if config.grid else ''}", flush=True)
    wall = time.perf_counter()
    runs, table, _ = run(config, command_line("bench.gpt2", args))
    out = config.out or default_out(config)
    print()
    print(table)
    print(f"wrote {out}/table.md, loss.png, log.json, log.csv (total {time.perf_counter() - wall:.0f} s)")
    return 0 if all(r.status == "ok" for r in runs if r.selected) else 1


if __name__ == "__main__":
    sys.exit(main())
