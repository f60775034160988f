"""What a training benchmark writes (``bench.train`` and ``bench.demo``): the per-run record, CSV
and JSON logs, the loss plot and the markdown summary (final loss, time to reach AdamW's final
loss, step times relative to SGD), all four through :func:`write_report`.

Definitions used by the summary:

* **train loss**: the experiment's loss on a fixed subset of training data, evaluated without
  gradients at evaluation points (excluded from the clock); "final" is the last evaluation.
* **wall-clock**: the sum of the timed steps (forward, backward and optimizer step; on CUDA the
  training stream is synchronised before and after each step — not the whole device, so the
  optimizer's side-stream eigendecompositions overlap as in real training; see
  :func:`bench.runner.synchronize`). Batch preparation and evaluation are not counted.
* **time to reach AdamW's final loss**: the wall-clock at the first evaluation whose train loss is
  at or below the final train loss of the (selected) AdamW run; "not reached" otherwise.
* **step time / SGD**: over steps 2..n (step 1 carries one-time costs: allocator warm-up, the
  first eigendecompositions), the mean step time divided by SGD's mean, the median by SGD's
  median, and the worst single step by SGD's median (a typical SGD step).
* **final test metric**: the last evaluation's, or the task's ``final_test_metric`` (a larger
  set, once at the end) when it has one.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .optimizers import LABELS

if TYPE_CHECKING:
    from .experiments import Task


@dataclass
class Run:
    """One optimizer at one hyperparameter point: its trajectory and outcome."""

    optimizer: str
    hparams: dict[str, Any]
    steps: int = 0
    train_seconds: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    batch_loss: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)   # step, wall_s, train_loss, test_metric
    status: str = "ok"
    skipped_steps: int = 0
    warnings: list[str] = field(default_factory=list)
    selected: bool = True                  # the reported point of its optimizer (best of a grid)
    final_test: float | None = None        # the task's final_test_metric, when it has one

    @property
    def label(self) -> str:
        return f"{LABELS[self.optimizer]} lr={self.hparams['lr']:g}"

    @property
    def final_train_loss(self) -> float:
        return self.evals[-1]["train_loss"] if self.evals else math.nan

    @property
    def final_test_metric(self) -> float:
        if self.final_test is not None:
            return self.final_test
        return self.evals[-1]["test_metric"] if self.evals else math.nan

    def step_stats(self) -> dict[str, float]:
        """Mean, median and worst step time (ms) over steps 2..n (all steps if there is one)."""
        times = self.step_ms[1:] or self.step_ms
        if not times:
            return dict(mean=math.nan, median=math.nan, worst=math.nan)
        return dict(mean=statistics.fmean(times), median=statistics.median(times), worst=max(times))

    def time_to_reach(self, target: float) -> float | None:
        """Wall-clock (s) at the first evaluation with train loss <= ``target``; None if never."""
        for e in self.evals:
            if e["train_loss"] <= target:
                return e["wall_s"]
        return None


def selection_key(run: Run) -> float:
    """Grid selection: the lowest final train loss; diverged runs last."""
    loss = run.final_train_loss
    return loss if math.isfinite(loss) and run.status == "ok" else math.inf


# -- logs -----------------------------------------------------------------------------------------
CSV_FIELDS = ("experiment", "optimizer", "lr", "selected", "step", "wall_s", "step_ms", "batch_loss",
              "train_loss", "test_metric")


def write_csv(path: Path, experiment: str, runs: Sequence[Run]) -> None:
    """One row per step per run; train_loss and test_metric are filled at evaluation points
    (step 0 is the evaluation before training)."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for run in runs:
            evals = {int(e["step"]): e for e in run.evals}
            wall = 0.0
            for step in range(run.steps + 1):
                row: dict[str, Any] = dict(experiment=experiment, optimizer=run.optimizer, lr=run.hparams["lr"],
                                           selected=int(run.selected), step=step)
                if step > 0:
                    wall += run.step_ms[step - 1] / 1000
                    row.update(step_ms=f"{run.step_ms[step - 1]:.4f}", batch_loss=f"{run.batch_loss[step - 1]:.6g}")
                row["wall_s"] = f"{wall:.4f}"
                if step in evals:
                    row.update(train_loss=f"{evals[step]['train_loss']:.6g}",
                               test_metric=f"{evals[step]['test_metric']:.6g}")
                w.writerow(row)


def write_json(path: Path, payload: dict[str, Any], runs: Sequence[Run]) -> None:
    """Settings, environment, experiment description and every run: hyperparameters, status,
    evaluations and step-time statistics (the per-step series are in the CSV, to keep this small)."""
    entries = []
    for run in runs:
        entry = asdict(run)
        del entry["step_ms"], entry["batch_loss"]
        entry.update(label=run.label, final_train_loss=run.final_train_loss,
                     final_test_metric=run.final_test_metric, step_stats_ms=run.step_stats())
        entries.append(entry)
    path.write_text(json.dumps({**payload, "runs": entries}, indent=1, default=str, allow_nan=True))


# -- plot -----------------------------------------------------------------------------------------
def plot(path: Path, runs: Sequence[Run], title: str, loss_name: str, target: float | None,
         test_name: str | None = None) -> None:
    """Train loss vs wall-clock (left) and vs step (right) for every optimizer's selected run
    (thick, markers) and, after a grid, its other points (thin, faint). A dotted line marks
    AdamW's final loss when there is one. With ``test_name`` (a test metric in the loss's units)
    the selected runs' test metric is drawn dashed beside their train loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    colors = dict(zip(LABELS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    keys = ("train_loss", "test_metric") if test_name else ("train_loss",)
    positive = all(e[k] > 0 for r in runs for e in r.evals for k in keys if math.isfinite(e[k]))
    for run in sorted(runs, key=lambda r: r.selected):
        xs_time = [e["wall_s"] for e in run.evals]
        xs_step = [e["step"] for e in run.evals]
        ys = [e["train_loss"] if math.isfinite(e["train_loss"]) else math.nan for e in run.evals]
        style = dict(color=colors[run.optimizer], marker="." if run.selected else None,
                     linewidth=1.8 if run.selected else 0.8, alpha=1.0 if run.selected else 0.35,
                     label=run.label if run.selected else None)
        axes[0].plot(xs_time, ys, **style)
        axes[1].plot(xs_step, ys, **style)
        if test_name and run.selected:
            test = [e["test_metric"] if math.isfinite(e["test_metric"]) else math.nan for e in run.evals]
            dashed = dict(color=colors[run.optimizer], linestyle="--", linewidth=1.2, alpha=0.6)
            axes[0].plot(xs_time, test, label=f"{LABELS[run.optimizer]} {test_name.split(' (')[0]}", **dashed)
            axes[1].plot(xs_step, test, **dashed)
    for ax, xlabel in zip(axes, ("training wall-clock (s, timed steps only)", "step")):
        if target is not None and math.isfinite(target):
            ax.axhline(target, color="grey", linestyle=":", linewidth=1, label="AdamW final" if ax is axes[0] else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{loss_name}\ntrain (solid), {test_name.split(' (')[0]} (dashed)" if test_name
                      else f"train {loss_name}")
        if positive:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].set_xlim(left=0)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- summary --------------------------------------------------------------------------------------
def _threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


HPARAM_KEYS = ("lr", "damping", "momentum", "betas", "factor_every", "eigen_every", "kl_clip", "weight_decay",
               "fisher", "mc_samples")


def format_hparams(hparams: dict[str, Any]) -> str:
    """The hyperparameters that differ between methods, compactly (``betas=0.9,0.999``, ``fisher=mc``)."""
    def shown(v: Any) -> str:
        if isinstance(v, (tuple, list)):
            return ",".join(map(shown, v))
        return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    return " ".join(f"{k}={shown(hparams[k])}" for k in HPARAM_KEYS if hparams.get(k) is not None)


def summary_rows(runs: Sequence[Run]) -> tuple[list[dict[str, Any]], float | None]:
    """Per selected run: the numbers of the summary table; also AdamW's final loss (the target)."""
    selected = [r for r in runs if r.selected]
    adamw = next((r for r in selected if r.optimizer == "adamw"), None)
    target = adamw.final_train_loss if adamw is not None and math.isfinite(adamw.final_train_loss) else None
    adamw_time = adamw.time_to_reach(target) if adamw is not None and target is not None else None
    sgd = next((r for r in selected if r.optimizer == "sgd"), None)
    sgd_stats = sgd.step_stats() if sgd is not None else None
    rows = []
    for r in selected:
        stats = r.step_stats()
        reach = r.time_to_reach(target) if target is not None else None
        # worst is divided by SGD's median step (a typical one), not by SGD's own noisy worst
        base = dict(mean="mean", median="median", worst="median")
        rel = {k: stats[k] / sgd_stats[base[k]] if sgd_stats and sgd_stats[base[k]] > 0 else None for k in stats}
        rows.append(dict(optimizer=r.optimizer, label=LABELS[r.optimizer], hparams=r.hparams, steps=r.steps,
                         train_seconds=r.train_seconds, final_train_loss=r.final_train_loss,
                         final_test_metric=r.final_test_metric, time_to_adamw_final=reach,
                         time_vs_adamw=(reach / adamw_time if reach is not None and adamw_time else None),
                         step_ms=stats, step_vs_sgd=rel, status=r.status))
    return rows, target


def markdown_summary(experiment: str, runs: Sequence[Run], env: dict[str, Any], description: dict[str, Any],
                     loss_name: str, test_metric_name: str, limit: str) -> str:
    """The summary page: what ran where, the table, and (after a grid) every grid point."""
    rows, target = summary_rows(runs)
    cpu_note = " — **CPU figures**" if env["device"].startswith("cpu") else ""
    lines = [f"# `{experiment}` on {env['device_name']}{cpu_note}", "",
             f"- command: `{env['command']}`",
             f"- device: {env['device_name']} (`{env['device']}`, {_threads(env['threads'])}); torch {env['torch']}, "
             f"triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}; {env['date']}; "
             f"commit {env['git_commit']}",
             f"- model: {description.get('model')}",
             f"- data: {description.get('data')}",
             f"- train loss: {loss_name} on {description.get('train_loss')}; test metric: "
             f"{test_metric_name}, {description.get('test_metric')}",
             *([f"- {description['note']}"] if description.get("note") else []),
             f"- limit per run: {limit}; wall-clock counts the timed steps only (forward, backward, optimizer "
             "step; on CUDA the training stream is synchronised around each); step times over steps 2..n; "
             "worst / SGD = worst step / SGD's median step", ""]
    sgd_ran = any(r["optimizer"] == "sgd" for r in rows)
    adamw_note = f"{target:.4g}" if target is not None else "no AdamW run"
    lines += [f"| optimizer | hyperparameters | steps | time (s) | final train loss | {test_metric_name} | "
              f"time to AdamW's final loss ({adamw_note}) | mean step (ms) | mean / SGD | median / SGD | "
              "worst / SGD | status |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        if target is None:
            reach = "—"
        elif row["time_to_adamw_final"] is None:
            reach = "not reached"
        else:
            ratio = row["time_vs_adamw"]
            reach = f"{row['time_to_adamw_final']:.3g} s" + (f" ({ratio:.2f}x AdamW)" if ratio is not None else "")
        rel = row["step_vs_sgd"]
        lines.append(f"| {row['label']} | {format_hparams(row['hparams'])} | {row['steps']} | "
                     f"{row['train_seconds']:.3g} | {_fmt(row['final_train_loss'])} | "
                     f"{_fmt(row['final_test_metric'])} | {reach} | {_fmt(row['step_ms']['mean'], '.1f')} | "
                     f"{_fmt(rel['mean'], '.2f')} | {_fmt(rel['median'], '.2f')} | {_fmt(rel['worst'], '.2f')} | "
                     f"{row['status']} |")
    if not sgd_ran:
        lines += ["", "No SGD run: step times relative to SGD need `sgd` among `--optimizers`."]
    if any(not r.selected for r in runs):
        lines += ["", "## Learning-rate grid (best final train loss selected)", "",
                  "| optimizer | lr | final train loss | status | selected |", "|---|---:|---:|---|---|"]
        for r in runs:
            lines.append(f"| {LABELS[r.optimizer]} | {r.hparams['lr']:g} | {_fmt(r.final_train_loss)} | {r.status} | "
                         f"{'yes' if r.selected else ''} |")
    return "\n".join(lines) + "\n"


# -- everything at once ---------------------------------------------------------------------------
def write_report(out: Path, name: str, task: Task, runs: Sequence[Run], env: dict[str, Any],
                 config: dict[str, Any], limit: str, title: str, *, summary_file: str = "summary.md") -> str:
    """Write ``log.csv``, ``log.json``, ``loss.png`` and the summary (``summary_file``) of one
    benchmark invocation into ``out``; return the summary's markdown."""
    out.mkdir(parents=True, exist_ok=True)
    rows, target = summary_rows(runs)
    payload = dict(experiment=name, config=config, environment=env, description=task.description,
                   loss=task.loss_name, test_metric=task.test_metric_name,
                   test_metric_higher_is_better=task.higher_is_better, adamw_final_train_loss=target, summary=rows)
    write_csv(out / "log.csv", name, runs)
    write_json(out / "log.json", payload, runs)
    threads = f" ({_threads(env['threads'])})" if env["device"].startswith("cpu") else ""
    plot(out / "loss.png", runs, f"{title}: {env['device_name']}{threads}, {limit} per run", task.loss_name, target,
         task.test_metric_name if task.test_metric_is_loss else None)
    summary = markdown_summary(name, runs, env, task.description, task.loss_name, task.test_metric_name, limit)
    (out / summary_file).write_text(summary)
    return summary
