"""End-to-end training benchmark: ``python -m bench.train EXPERIMENT``.

Runs one experiment of :mod:`bench.experiments` (``autoencoder``, ``vgg11``, ``mlp-stack``,
``transformer``) with each optimizer (``sgd``, ``adamw``, ``kfac``, ``ekfac``, ``tekfac``) from
the same initial weights on the same batches, each for the same wall-clock budget and/or step cap
(the training loop of :mod:`bench.runner`, shared with ``bench.demo``), and writes into ``--out``
(default ``bench/results/<experiment>/<device>/``):

* ``log.csv``: one row per step (wall-clock, step time, batch loss; train loss and test metric at
  evaluation points), every run;
* ``log.json``: settings, environment (command, device, torch/triton versions, date, commit),
  the experiment's description and every run in full;
* ``loss.png``: train loss vs wall-clock and vs step, all optimizers;
* ``summary.md``: the table (final loss, time to reach AdamW's final loss, mean/median/worst step
  time relative to SGD) and the run's provenance (definitions in :mod:`bench.report`).

Default: each optimizer's documented default point (:data:`bench.experiments.HPARAMS`);
``--grid``: its learning-rate grid (:data:`bench.experiments.LR_GRID`), the best final train loss
reported. ``--quick``: tiny models and data, a few steps, the same code path (a CPU smoke run).

Examples::

    python -m bench.train autoencoder --budget-seconds 60 --optimizers sgd,adamw,kfac,ekfac
    python -m bench.train vgg11 --device cuda --budget-seconds 300
    python -m bench.train transformer --quick
    python -m bench.train --list
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .environment import command_line, device_slug, environment
from .experiments import EXPERIMENTS, HPARAMS, LR_GRID, OPTIMIZERS, build_task, hparam_points
from .optimizers import LABELS
from .report import Run, write_report
from .runner import Settings, require_extras, run_optimizers, torch_threads

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(kw_only=True)
class Config(Settings):
    """The command-line options of one benchmark invocation (:class:`bench.runner.Settings` and
    the experiment, the grid switch and the output folder)."""

    experiment: str
    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZERS))
    grid: bool = False
    out: Path | None = None


def default_out(config: Config) -> Path:
    suffix = ("-quick" if config.quick else "") + ("-grid" if config.grid else "")
    return RESULTS / config.experiment / f"{device_slug(torch.device(config.device))}{suffix}"


def run_benchmark(config: Config, command: str = "", *, progress: bool = True) -> tuple[list[Run], Path]:
    """Run every optimizer (every grid point with ``grid``), select the best point per optimizer,
    and write the logs, the plot and the summary; return the runs and the output folder."""
    require_extras("bench.train")
    device = torch.device(config.device)
    out = config.out or default_out(config)
    with torch_threads(config.threads):
        try:
            task = build_task(config.experiment, device, config.quick)
        except ModuleNotFoundError as e:
            raise SystemExit(f"error: the {config.experiment!r} experiment's data are missing: {e}") from e
        points = {name: hparam_points(config.experiment, name, config.grid) for name in config.optimizers}
        runs = run_optimizers(task, points, config, progress=progress)
        env = environment(device, command or command_line("bench.train", [config.experiment]))
    write_report(out, config.experiment, task, runs, env, config.record(), config.limit, config.experiment)
    return runs, out


def list_experiments() -> str:
    """The experiments with each optimizer's default point and lr grid (``--list``)."""
    lines = []
    for exp in EXPERIMENTS:
        lines.append(exp)
        for opt in OPTIMIZERS:
            hp = " ".join(f"{k}={v:g}" if isinstance(v, (int, float)) and v is not None else f"{k}={v}"
                          for k, v in HPARAMS[exp][opt].items())
            lines.append(f"  {LABELS[opt]:>6}: {hp}   grid lr={LR_GRID[exp][opt]}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="?", choices=EXPERIMENTS)
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list of %(default)s")
    p.add_argument("--device", default=Config.device, help="cuda when available, else cpu (default: %(default)s)")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="training wall-clock per run (default 60; 0: none, then --steps is needed)")
    p.add_argument("--steps", type=int, default=None, help="cap on the steps per run")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default 0)")
    p.add_argument("--grid", action="store_true", help="run each optimizer's lr grid, report the best")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke: tiny model and data, <= 6 steps and <= 10 s per run, same code path")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default bench/results/<experiment>/<device>[-quick][-grid])")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--eval-points", type=int, default=60, help="evaluations per run (default 60)")
    p.add_argument("--list", action="store_true", help="print experiments, default hyperparameters, grids")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="save a crash-safe checkpoint of each run at every evaluation into this folder")
    a = p.parse_args(argv)
    if a.list:
        print(list_experiments())
        raise SystemExit(0)
    if a.experiment is None:
        p.error("give an EXPERIMENT (or --list)")
    optimizers = [o.strip() for o in a.optimizers.split(",") if o.strip()]
    unknown = [o for o in optimizers if o not in OPTIMIZERS]
    if unknown or not optimizers:
        p.error(f"--optimizers: unknown {unknown}; choose from {','.join(OPTIMIZERS)}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available in this torch build ({torch.__version__})")
    budget = 60.0 if a.budget_seconds is None else (a.budget_seconds if a.budget_seconds > 0 else None)
    steps = a.steps
    eval_points = a.eval_points
    if a.quick:
        budget = None if budget is None else min(budget, 10.0)
        steps = min(steps or 6, 6)
        eval_points = max(1, steps // 2)
    if eval_points < 1:
        p.error(f"--eval-points {eval_points}: must be >= 1")
    if budget is None and steps is None:
        p.error("give a --budget-seconds > 0 or --steps")
    return Config(experiment=a.experiment, optimizers=optimizers, device=a.device, budget_seconds=budget,
                  steps=steps, seed=a.seed, quick=a.quick, grid=a.grid, out=a.out, threads=a.threads,
                  eval_points=eval_points, checkpoint_dir=a.checkpoint_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints the summary; returns 0 when every selected run finished cleanly."""
    args = list(sys.argv[1:] if argv is None else argv)
    config = parse_args(args)
    command = command_line("bench.train", args)
    print(f"{config.experiment}: device={config.device} threads={config.threads or torch.get_num_threads()} "
          f"limit={config.limit} optimizers={','.join(config.optimizers)}{' grid' if config.grid else ''}", flush=True)
    wall = time.perf_counter()
    runs, out = run_benchmark(config, command)
    print()
    print((out / "summary.md").read_text())
    print(f"wrote {out}/log.csv, log.json, loss.png, summary.md (total {time.perf_counter() - wall:.0f} s)")
    return 0 if all(r.status == "ok" for r in runs if r.selected) else 1


if __name__ == "__main__":
    sys.exit(main())
