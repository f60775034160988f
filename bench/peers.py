"""Our optimizers and installable peers side by side, in one process and one table:
``python -m bench.peers`` (``pip install -e ".[peers]"``).

Two measurements:

1. **Step time** (``--step-models``, the synthetic workloads of :mod:`bench.step_time` at
   ``--size``): every optimizer trains its own copy of the model from the same initial weights;
   after a warm-up, the optimizers take turns (round robin), ``--block`` steps each per turn, for
   ``--rounds`` turns, so that what the shared machine does meanwhile is spread over all of them.
   Each step (zero_grad + forward + backward + step) is timed; the table gives mean, median and
   worst step, each over SGD's mean / median / median step in the same run, and the peak memory
   of a separate untimed pass under the torch memory profiler (:func:`bench.step_time.cpu_peak_bytes`;
   CPU tensor allocations, not BLAS/LAPACK buffers).
2. **Time to target loss** (``--tasks``, :mod:`bench.experiments`): each optimizer trains the
   task for ``--budget-seconds`` of timed steps with the training loop of :mod:`bench.runner`;
   the summary (:mod:`bench.report`) gives the time each took to reach AdamW's final train loss,
   and ``loss.png`` the loss against wall-clock.

Peers (:data:`bench.optimizers.PEERS`): heavyball's SOAP (eager: heavyball's torch.compile is
turned off), ``torch.optim.Muon`` (2-D weights; AdamW on the rest), SINGD (``nn.Linear`` and
``nn.Conv2d`` layers; AdamW on the rest). Their hyperparameters here are untuned starting points
(:data:`PEER_HPARAMS`), with the preconditioner refreshed every 10 steps as our rows.

    python -m bench.peers --threads 1                                   # everything (minutes)
    python -m bench.peers --tasks none --step-models autoencoder        # step time only
    python -m bench.peers --quick                                       # smoke run (not a result)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .environment import command_line, environment
from .experiments import HPARAMS, build_task
from .memory import state_bytes
from .optimizers import LABELS, release
from .report import write_report
from .runner import Settings, require_extras, run_optimizers, torch_threads
from .step_time import MODELS, SIZES, Config, Workload, configurations, cpu_peak_bytes, make_workload

__all__ = ["OPTIMIZERS", "PEER_HPARAMS", "main", "step_configs", "step_times"]

#: the optimizers compared, in table order
OPTIMIZERS = ("sgd", "adamw", "ekfac", "kfac", "soap", "muon", "singd")
TASKS = ("autoencoder", "transformer")
MIB = 2**20

#: The peers' settings, per task: untuned starting points (each library's documented defaults where
#: they have one, refresh every 10 steps; weight decay 0 as in our rows).
PEER_HPARAMS: dict[str, dict[str, dict[str, Any]]] = {
    task: {
        "soap": dict(lr=3e-3, precondition_frequency=10, weight_decay=0.0),
        "muon": dict(lr=0.02, weight_decay=0.0, adjust_lr_fn="original", adamw=dict(lr=1e-3, weight_decay=0.0)),
        "singd": dict(lr=1e-2, damping=1e-3, T=10, momentum=0.9, adamw_lr=1e-3),
    } for task in (*TASKS, *MODELS)
}


def step_configs() -> list[Config]:
    """The step-time rows: bench.step_time's SGD, AdamW and default-schedule EKFAC / K-FAC
    (refresh every 10, staggered), and the peers with :data:`PEER_HPARAMS`."""
    known = {c.name: c for c in configurations(10**9)}
    ours = {"sgd": "sgd", "adamw": "adamw", "ekfac": "ekfac-e10-stagger", "kfac": "kfac-e10-stagger"}
    return [known[ours[k]] if k in ours else Config(k, k, dict(PEER_HPARAMS["autoencoder"][k]), 10)
            for k in OPTIMIZERS]


def _summary(times: list[float]) -> dict[str, float]:
    return dict(mean_ms=statistics.fmean(times), median_ms=statistics.median(times), worst_ms=max(times))


def step_times(work: Workload, cfgs: Sequence[Config], warmup: int, block: int, rounds: int,
               memory: bool, progress: bool) -> list[dict[str, Any]]:
    """The round-robin step-time run of ``cfgs`` on ``work`` (module docstring; CPU): one row per
    configuration, with its step times (ms) and their ratios to the ``sgd`` row's."""
    from tqdm.auto import tqdm

    model_name = work.name
    init = {k: v.clone() for k, v in work.model.state_dict().items()}
    models = [copy.deepcopy(work.model) for _ in cfgs]
    opts = [c.make_optimizer(m) for c, m in zip(cfgs, models)]
    nb = len(work.batches)
    times: list[list[float]] = [[] for _ in cfgs]
    steps = [0] * len(cfgs)

    def one_step(k: int) -> float:
        x, y = work.batches[steps[k] % nb]
        t0 = time.perf_counter()
        opts[k].zero_grad(set_to_none=True)
        work.loss_fn(models[k](x), y).backward()
        opts[k].step()
        steps[k] += 1
        return (time.perf_counter() - t0) * 1e3

    try:
        bar = tqdm(total=len(cfgs) * (warmup + block * rounds), desc=f"{model_name} round robin", unit="step",
                   disable=not progress, leave=False)
        for k in range(len(cfgs)):
            for _ in range(warmup):
                one_step(k)
                bar.update(1)
        for _ in range(rounds):
            for k in range(len(cfgs)):
                for _ in range(block):
                    times[k].append(one_step(k))
                    bar.update(1)
        bar.close()
        rows = []
        for k, cfg in enumerate(cfgs):
            with torch.no_grad():
                x, y = work.batches[0]
                final_loss = float(work.loss_fn(models[k](x), y))
            rows.append(dict(model=model_name, optimizer=cfg.kind, label=LABELS[cfg.kind], call=cfg.describe(),
                             timed_steps=len(times[k]), **_summary(times[k]), final_loss=final_loss,
                             state_mb=sum(state_bytes(o, models[k]) for o in getattr(opts[k], "optimizers", [opts[k]]))
                             / MIB, times_ms=times[k]))
    finally:
        for o in opts:
            release(o)
    del opts, models
    gc.collect()
    if memory:
        for cfg, row in zip(cfgs, rows):
            peak = cpu_peak_bytes(work, cfg, warmup, block, init)
            row["peak_mb"] = (peak + sum(p.numel() * p.element_size() for p in work.model.parameters())) / MIB
    sgd = next((r for r in rows if r["optimizer"] == "sgd"), None)
    for r in rows:
        r["mean_over_sgd"] = r["mean_ms"] / sgd["mean_ms"] if sgd else None
        r["median_over_sgd"] = r["median_ms"] / sgd["median_ms"] if sgd else None
        r["worst_over_sgd_median"] = r["worst_ms"] / sgd["median_ms"] if sgd else None
        r["description"] = work.description
    return rows


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def step_table(rows: list[dict[str, Any]], env: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = [f"Step time, round robin ({settings['rounds']} turns of {settings['block']} steps each after "
             f"{settings['warmup']} warm-up steps), {env['device_name']} ({env['threads']} torch threads, "
             f"{env['cpus']} CPUs, load {env['load_average']}), torch {env['torch']}, {env['date']}.",
             f"Command: `{env['command']}`", "Data: synthetic (timing only). Peak MB: parameters + the peak of the "
             "memory allocated after the optimizer's creation (torch memory profiler, untimed pass).", ""]
    for m in dict.fromkeys(r["model"] for r in rows):
        lines.append(f"- `{m}`: {next(r['description'] for r in rows if r['model'] == m)}")
    lines += ["", "| model | optimizer | call | mean ms | median ms | worst ms | mean/SGD | median/SGD | "
              "worst/SGD median | state MB | peak MB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['label']} | `{r['call']}` | {r['mean_ms']:.2f} | {r['median_ms']:.2f} | "
                     f"{r['worst_ms']:.2f} | {_f(r['mean_over_sgd'], '.2f')} | {_f(r['median_over_sgd'], '.2f')} | "
                     f"{_f(r['worst_over_sgd_median'], '.2f')} | {r['state_mb']:.2f} | "
                     f"{_f(r.get('peak_mb'), '.1f')} |")
    return "\n".join(lines) + "\n"


def task_points(task: str, optimizers: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Each optimizer's one hyperparameter point on ``task``: ours from bench.experiments.HPARAMS,
    the peers' from :data:`PEER_HPARAMS`."""
    return {k: [dict(PEER_HPARAMS[task][k]) if k in PEER_HPARAMS[task] else dict(HPARAMS[task][k])]
            for k in optimizers}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list from %(default)s")
    p.add_argument("--step-models", default=",".join(MODELS),
                   help="bench.step_time workloads for the step-time table ('none': skip)")
    p.add_argument("--size", default="small", choices=SIZES)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--block", type=int, default=10, help="steps per optimizer per turn (the refresh period)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"time-to-target tasks from {TASKS} ('none': skip)")
    p.add_argument("--budget-seconds", type=float, default=20.0, help="timed training per optimizer and task")
    p.add_argument("--eval-points", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps: a smoke run, not a result")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/peers/cpu[-quick]")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    a.optimizers = [o for o in a.optimizers.split(",") if o]
    for o in a.optimizers:
        if o not in OPTIMIZERS:
            p.error(f"unknown optimizer {o!r} in --optimizers: choose from {OPTIMIZERS}")
    a.step_models = [] if a.step_models == "none" else [m for m in a.step_models.split(",") if m]
    for m in a.step_models:
        if m not in MODELS:
            p.error(f"unknown model {m!r} in --step-models: choose from {MODELS}")
    a.tasks = [] if a.tasks == "none" else [t for t in a.tasks.split(",") if t]
    for t in a.tasks:
        if t not in TASKS:
            p.error(f"unknown task {t!r} in --tasks: choose from {TASKS}")
    if a.quick:
        a.size, a.warmup, a.block, a.rounds, a.budget_seconds, a.eval_points = "tiny", 2, 2, 2, 2.0, 3
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    require_extras("bench.peers")
    out = args.out or Path(__file__).resolve().parent / "results" / "peers" / ("cpu-quick" if args.quick else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    command = command_line("bench.peers", argv)
    result: dict[str, Any] = {}
    with torch_threads(args.threads):
        env = environment("cpu", command)
        cfgs = [c for c in step_configs() if c.kind in args.optimizers]
        if args.step_models:
            rows = []
            for m in args.step_models:
                work = make_workload(m, False, torch.device("cpu"), size=args.size)
                rows += step_times(work, cfgs, args.warmup, args.block, args.rounds, args.memory, args.progress)
            settings = dict(size=args.size, warmup=args.warmup, block=args.block, rounds=args.rounds)
            table = step_table(rows, env, settings)
            if args.quick:
                table = "**SMOKE RUN (`--quick`): not a performance result.**\n\n" + table
            print(table)
            (out / "step_time.md").write_text(table)
            (out / "step_time.json").write_text(json.dumps(dict(environment=env, settings=settings, rows=rows),
                                                           indent=1, default=str))
            result["step_time"] = rows
        for task_name in args.tasks:
            settings = Settings(optimizers=args.optimizers, device="cpu", budget_seconds=args.budget_seconds,
                                threads=args.threads, eval_points=args.eval_points, quick=args.quick)
            task = build_task(task_name, "cpu", args.quick)
            runs = run_optimizers(task, task_points(task_name, args.optimizers), settings, progress=args.progress)
            summary = write_report(out / task_name, task_name, task, runs, env, settings.record(), settings.limit,
                                   f"{task_name} (peers)")
            print(summary)
            result[task_name] = runs
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
