"""The one training loop of the benchmarks: ``bench.train`` (every experiment) and ``bench.demo``
(the MNIST autoencoder) both run :func:`run_optimizers` on a :class:`bench.experiments.Task`
and write what it returns with :func:`bench.report.write_report`.

Every optimizer starts from the same seeded initial weights, sees the same batches in the same
order and trains until the same wall-clock budget and/or step cap (:class:`Settings`). The clock
counts forward, backward and optimizer step only (:func:`synchronize` brackets each step);
evaluations run between steps, off the clock, without gradients (the optimizer's hooks record
nothing then).
"""

from __future__ import annotations

import importlib.util
import math
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ekfac_triton import EKFAC, save_checkpoint

from .experiments import Task
from .optimizers import make_optimizer
from .report import Run, selection_key

__all__ = ["Settings", "require_extras", "run_optimizers", "synchronize", "torch_threads", "train_run"]

SYNC_SCOPES = ("stream", "device")


def synchronize(device: torch.device, scope: str = "stream") -> None:
    """Wait for the CUDA work queued so far, so that a host timer read next measures it; nothing
    to wait for on CPU. Every timed step of the benchmarks is bracketed by two calls.

    ``scope="stream"`` (the training runner's, :func:`train_run`): only the current stream, the
    one the training step runs on. The optimizer's asynchronous eigendecompositions run on a side
    stream, off the critical path; a training loop never waits for them, and a device-wide
    synchronisation would charge each to whichever step happens to be running, making the
    wall-clock to a given loss pessimistic. Work on the side stream still competes for the GPU, so
    what it slows the training stream by is measured.

    ``scope="device"``: ``torch.cuda.synchronize``, every stream. ``bench.step_time`` (its default,
    ``--sync device``) and ``bench.compile_step`` measure what one step costs in isolation, the
    refreshes it starts included; ``bench.step_time --sync stream`` shows the difference.
    """
    if scope not in SYNC_SCOPES:
        raise ValueError(f"Invalid scope={scope!r}: must be one of {SYNC_SCOPES}")
    if device.type != "cuda":
        return
    if scope == "stream":
        torch.cuda.current_stream(device).synchronize()
    else:
        torch.cuda.synchronize(device)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(kw_only=True)
class Settings:
    """What the training runs of one invocation share (the command-line options of ``bench.train``
    and ``bench.demo`` extend it).

    Evaluations: at step 0, every ``budget_seconds / eval_points`` seconds of training time, every
    ``eval_every_steps`` steps (without it and without a budget: every ``steps / eval_points``
    steps), and at the end.
    """

    optimizers: list[str]
    device: str = _default_device()
    budget_seconds: float | None = 60.0
    steps: int | None = None
    seed: int = 0
    threads: int = 0                        # torch.set_num_threads during the runs; 0: torch's default
    eval_points: int = 60
    eval_every_steps: int | None = None
    quick: bool = False
    #: save a crash-safe checkpoint (ekfac_triton.save_checkpoint) of each run at every
    #: evaluation, as ``<dir>/<task>-<optimizer>.pt``; None: no checkpoints
    checkpoint_dir: Path | None = None

    @property
    def limit(self) -> str:
        parts = []
        if self.budget_seconds is not None:
            parts.append(f"{self.budget_seconds:g} s")
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        return " or ".join(parts) + (" (--quick sizes)" if self.quick else "")

    def eval_every(self) -> tuple[float, int | None]:
        """(seconds of training time, steps) between evaluations (class docstring)."""
        seconds = self.budget_seconds / self.eval_points if self.budget_seconds else math.inf
        steps = self.eval_every_steps
        if steps is None and self.budget_seconds is None:
            steps = max(1, (self.steps or 0) // self.eval_points)
        return seconds, steps

    def record(self) -> dict[str, Any]:
        """The settings for the JSON log (paths as text)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def train_run(task: Task, name: str, hparams: Mapping[str, Any], settings: Settings, *, progress: bool = True) -> Run:
    """Train a fresh, seeded ``task.model()`` with optimizer ``name`` (``make_optimizer(name, model,
    hparams)``) until the budget or the step cap.

    Each step (batch already prepared) is timed between two :func:`synchronize` calls (the
    training stream). With ``fisher`` other than ``"empirical"`` in ``hparams`` the optimizer is
    also given the task's ``loss_module()`` and ``loss_scale`` and the step trains through
    ``optimizer.backward(model(inputs), target)`` (which adds the curvature passes).
    """
    from tqdm.auto import tqdm

    device = torch.device(settings.device)
    torch.manual_seed(settings.seed)
    model = task.model().to(device)
    run = Run(name, dict(hparams))
    fisher = hparams.get("fisher", "empirical")
    curvature_backward = fisher != "empirical"
    if curvature_backward:
        if task.loss_module is None:
            raise ValueError(f"Invalid fisher={fisher!r}: the {task.name!r} task gives no loss module (only "
                             "the empirical Fisher)")
        hparams = {"loss": task.loss_module(), "loss_scale": task.loss_scale, **hparams}
    optimizer = make_optimizer(name, model, hparams)
    budget = settings.budget_seconds
    eval_seconds, eval_steps = settings.eval_every()

    checkpoint = None
    if settings.checkpoint_dir is not None:
        settings.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = settings.checkpoint_dir / f"{task.name}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', run.label)}.pt"

    def evaluate() -> None:
        run.evals.append(dict(step=run.steps, wall_s=run.train_seconds, train_loss=task.train_loss(model),
                              test_metric=task.test_metric(model)))
        if checkpoint is not None:  # off the clock, like the evaluation; atomic, so a crash keeps the last one
            save_checkpoint(checkpoint, model=model, optimizer=optimizer, extra=dict(step=run.steps))

    def done() -> bool:
        return ((settings.steps is not None and run.steps >= settings.steps)
                or (budget is not None and run.train_seconds >= budget))

    evaluate()
    last_eval = 0.0
    total, unit = (budget, "s") if budget is not None else (settings.steps, "step")
    bar = tqdm(total=total, unit=unit, desc=f"{task.name} {run.label}", disable=not progress, leave=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} {unit} [{elapsed}<{remaining}{postfix}]")
    stream = task.batches(settings.seed)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while not done():
            batch = next(stream)
            synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            if curvature_backward:   # loss_scale x loss_module = task.loss, plus the Fisher passes
                inputs, target = batch
                loss = optimizer.backward(model(inputs), target)
            else:
                loss = task.loss(model, batch)
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
    if task.final_test_metric is not None:
        run.final_test = task.final_test_metric(model)
    run.warnings = sorted({str(w.message) for w in caught})
    pre = getattr(optimizer, "preconditioner", None)
    run.skipped_steps = int(getattr(pre, "skipped_steps", 0))
    if run.skipped_steps:
        run.status += f"; {run.skipped_steps} steps skipped (non-finite)"
    if isinstance(optimizer, EKFAC):
        optimizer.remove_hooks()
    return run


def run_optimizers(task: Task, points: Mapping[str, Sequence[Mapping[str, Any]]], settings: Settings, *,
                   progress: bool = True) -> list[Run]:
    """Every optimizer of ``points`` (name -> hyperparameter points, in order) at each of its
    points; the best point of each (:func:`bench.report.selection_key`) is marked selected."""
    runs: list[Run] = []
    for name, hps in points.items():
        tried = [train_run(task, name, hp, settings, progress=progress) for hp in hps]
        best = min(tried, key=selection_key)
        for r in tried:
            r.selected = r is best
        runs += tried
    return runs


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (0: leave torch's setting), restored after."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def require_extras(prog: str) -> None:
    """Stop with the install line when the progress bar or the plot library is missing."""
    for module in ("tqdm", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f"error: {prog} needs {module}: pip install {module} "
                             '(or pip install -e ".[bench]" for all benchmark dependencies)')
