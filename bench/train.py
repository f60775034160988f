"""End-to-end training benchmark: ``python -m bench.train EXPERIMENT``.

Runs one experiment of :mod:`bench.experiments` (``autoencoder``, ``vgg11``, ``mlp-stack``,
``transformer``) with each optimizer (``sgd``, ``adamw``, ``kfac``, ``ekfac``, ``tekfac``) from
the same initial weights on the same batches, each for the same wall-clock budget and/or step cap,
and writes into ``--out`` (default ``bench/results/<experiment>/<device>/``):

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
import importlib.util
import math
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ekfac_triton import EKFAC

from .experiments import CURVATURES, EXPERIMENTS, HPARAMS, LR_GRID, OPTIMIZERS, Task, build_task, hparam_points
from .report import (LABELS, Run, device_slug, environment, markdown_summary, plot, selection_key,
                     summary_rows, write_csv, write_json)

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Config:
    """The command-line options of one benchmark invocation."""

    experiment: str
    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZERS))
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    budget_seconds: float | None = 60.0
    steps: int | None = None
    seed: int = 0
    quick: bool = False
    grid: bool = False
    out: Path | None = None
    threads: int = 0
    eval_points: int = 60          # evaluations per run: every budget/eval_points seconds of
                                   # training time (or every steps/eval_points steps without a budget)

    @property
    def limit(self) -> str:
        parts = []
        if self.budget_seconds is not None:
            parts.append(f"{self.budget_seconds:g} s")
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        return " or ".join(parts) + (" (--quick sizes)" if self.quick else "")


def make_optimizer(name: str, model: torch.nn.Module, hparams: dict[str, Any]) -> torch.optim.Optimizer:
    """``sgd`` and ``adamw`` from torch; ``kfac``, ``ekfac``, ``tekfac`` from this library."""
    if name in CURVATURES:
        return EKFAC(model, curvature=name, **hparams)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **hparams)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **hparams)
    raise ValueError(f"Invalid optimizer={name!r}: must be one of {OPTIMIZERS}")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on the training (current) stream, so host timers measure it.

    Only the current stream, not the whole device: the optimizer's asynchronous eigendecompositions
    run on a side stream, off the critical path, and a device-wide ``torch.cuda.synchronize`` would
    charge them to the step that happens to be running (a real training loop never waits for them).
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def train_run(task: Task, name: str, hparams: dict[str, Any], config: Config, *, progress: bool = True) -> Run:
    """Train a fresh, seeded model with one optimizer until the budget or the step cap.

    Each step (batch already prepared) is timed from a synchronised start to a synchronised end
    (:func:`synchronize`: the training stream);
    evaluations (train loss on the fixed subset, the test metric) run between steps, off the clock,
    at step 0, every ``budget/eval_points`` seconds of training time (without a budget: every
    ``steps/eval_points`` steps), and at the end.
    """
    from tqdm.auto import tqdm

    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = task.model().to(device)
    run = Run(name, dict(hparams))
    optimizer = make_optimizer(name, model, hparams)
    budget = config.budget_seconds
    eval_seconds = budget / config.eval_points if budget else math.inf
    eval_steps = max(1, (config.steps or 0) // config.eval_points) if budget is None else None

    def evaluate() -> None:
        run.evals.append(dict(step=run.steps, wall_s=run.train_seconds, train_loss=task.train_loss(model),
                              test_metric=task.test_metric(model)))

    def done() -> bool:
        return ((config.steps is not None and run.steps >= config.steps)
                or (budget is not None and run.train_seconds >= budget))

    evaluate()
    last_eval = 0.0
    total, unit = (budget, "s") if budget is not None else (config.steps, "step")
    bar = tqdm(total=total, unit=unit, desc=f"{task.name} {run.label}", disable=not progress, leave=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} {unit} [{elapsed}<{remaining}{postfix}]")
    stream = task.batches(config.seed)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while not done():
            batch = next(stream)
            synchronize(device)
            start = time.perf_counter()
            loss = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            synchronize(device)
            elapsed = time.perf_counter() - start
            run.steps += 1
            run.train_seconds += elapsed
            run.step_ms.append(1000 * elapsed)
            run.batch_loss.append(float(loss))
            bar.update(1 if budget is None else min(elapsed, max(budget - bar.n, 0)))
            bar.set_postfix(step=run.steps, loss=f"{run.batch_loss[-1]:.4g}", refresh=False)
            if not math.isfinite(run.batch_loss[-1]):
                run.status = "diverged (non-finite loss)"
                break
            if (eval_steps and run.steps % eval_steps == 0) or run.train_seconds - last_eval >= eval_seconds:
                evaluate()
                last_eval = run.train_seconds
    bar.close()
    if run.evals[-1]["step"] != run.steps:
        evaluate()
    run.warnings = sorted({str(w.message) for w in caught})
    pre = getattr(optimizer, "preconditioner", None)
    run.skipped_steps = int(getattr(pre, "skipped_steps", 0))
    if run.skipped_steps:
        run.status += f"; {run.skipped_steps} steps skipped (non-finite)"
    if isinstance(optimizer, EKFAC):
        optimizer.remove_hooks()
    return run


def default_out(config: Config) -> Path:
    suffix = ("-quick" if config.quick else "") + ("-grid" if config.grid else "")
    return RESULTS / config.experiment / f"{device_slug(torch.device(config.device))}{suffix}"


def run_benchmark(config: Config, command: str = "", *, progress: bool = True) -> tuple[list[Run], Path]:
    """Run every optimizer (every grid point with ``grid``), select the best point per optimizer,
    and write the logs, the plot and the summary; return the runs and the output folder."""
    _require("tqdm", "tqdm")
    _require("matplotlib", "matplotlib")
    threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    out = config.out or default_out(config)
    try:
        try:
            task = build_task(config.experiment, device, config.quick)
        except ModuleNotFoundError as e:
            raise SystemExit(f"error: the {config.experiment!r} experiment's data are missing: {e}") from e
        runs: list[Run] = []
        for name in config.optimizers:
            points = [train_run(task, name, hp, config, progress=progress)
                      for hp in hparam_points(config.experiment, name, config.grid)]
            best = min(points, key=selection_key)
            for r in points:
                r.selected = r is best
            runs += points
        env = environment(device, command or shlex.join(["python", "-m", "bench.train", config.experiment]))
    finally:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    rows, target = summary_rows(runs)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    payload = dict(experiment=config.experiment, config=cfg, environment=env, description=task.description,
                   loss=task.loss_name, test_metric=task.test_metric_name,
                   test_metric_higher_is_better=task.higher_is_better, adamw_final_train_loss=target,
                   summary=rows)
    write_csv(out / "log.csv", config.experiment, runs)
    write_json(out / "log.json", payload, runs)
    title = f"{config.experiment}: {env['device_name']}, {config.limit} per run"
    plot(out / "loss.png", runs, title, task.loss_name, target)
    (out / "summary.md").write_text(markdown_summary(config.experiment, runs, env, task.description,
                                                     task.loss_name, task.test_metric_name, config.limit))
    return runs, out


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"error: bench.train needs {module}: pip install {package} "
                         '(or pip install -e ".[bench]" for all benchmark dependencies)')


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
                  eval_points=eval_points)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints the summary; returns 0 when every selected run finished cleanly."""
    args = list(sys.argv[1:] if argv is None else argv)
    config = parse_args(args)
    command = shlex.join(["python", "-m", "bench.train", *args])
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
