"""Soak / fault-injection benchmark: train EKFAC and K-FAC for thousands of small steps while
injecting faults at random steps, and check that each fault is survived and that the final state
is the one it should be, bit for bit.

    python -m bench.soak                       # defaults: 2,000 steps per run, about 2 minutes on a CPU core
    python -m bench.soak --quick               # tiny settings (a smoke run, seconds)
    python -m bench.soak --kinds storm,eigh --steps 500 --seed 3 --out /tmp/soak

Model: an MLP 32-64-64-10 (tanh), cross-entropy on synthetic 10-class data (Gaussian inputs
labelled by a fixed random teacher network, batch 64, one fixed batch per position of the data
stream, all from ``--seed``). Optimizers: ``EKFAC`` and ``KFAC`` (lr 0.05, damping 0.1,
momentum 0.9, KL clip 1e-3, eigen_every 10, staggered refreshes, synchronous on CPU; the clean
runs go from an eval loss of 2.29 to about 0.6 in 1,500 steps).

Each kind runs once per optimizer for ``--steps`` positions of the data stream, with
``round(fault_rate · steps)`` faults (kill -9: a quarter as many, each costs a process start),
at random non-overlapping positions after a warm-up of two refresh periods, except that the
first storm and the first interrupt of a run hit the very first step. Float64 everywhere except
the float32 overflow run, so that the comparisons with the reference runs are bit for bit.

Fault kinds (each run injects one kind, except ``mixed``):

* ``storm``: NaN/Inf storms, bursts of 1-5 consecutive poisoned steps: a NaN/Inf input entry, a
  NaN hidden activation (forward hook), or a NaN/Inf entry written into a ``.grad`` after
  backward. Each poisoned step must be skipped (RuntimeWarning "step skipped",
  ``skipped_steps`` + 1, every state tensor bit-identical). Reference: a clean run that never
  sees the poisoned batches.
* ``overflow``: float32 run; one input entry (or row) set to ±1e20…1e30: finite, but ā āᵀ
  overflows the float32 factor. Must be skipped the same way; reference as for storms (float32).
* ``eigh``: ``torch.linalg.eigh`` raises ``LinAlgError`` or returns NaN eigenvalues, once
  (the float64 retry of ``ekfac_triton/eigen.py`` must recover) or twice in a row (both attempts
  fail: the layer must keep its previous basis bit for bit). No reference: the trajectory changes
  by design.
* ``interrupt``: ``KeyboardInterrupt`` from inside ``opt.step()``: one call of
  ``ekfac_triton.ops.factor_update`` / ``per_example_scaling`` / ``precondition`` /
  ``moment_update`` (raised before the real call, or after it has updated the state in place) or
  of ``torch.linalg.eigh`` on a refresh step. The state must be as before the step, bit for bit;
  the step is redone. Reference: the uninterrupted run.
* ``kill9``: while ``save_checkpoint`` writes over the last good checkpoint, in a child process
  (``multiprocessing`` spawn) whose writes are slowed down, the child is killed with SIGKILL at a
  random moment; the training process then "crashes" too: a fresh model and optimizer are
  restored from the checkpoint file with ``load_checkpoint`` (it must load: the old or the new
  checkpoint, never a truncated one) and training resumes from its position. Reference: the
  uninterrupted run.
* ``mixed``: storms, float64 overflows (±1e160…1e300), interrupts and kill -9 in one run
  (reference: the clean run without the poisoned batches).
* ``rank-lost``: separate 2-process gloo runs on 127.0.0.1 (``process_group`` = the world,
  gradients averaged by ``average_gradients``); rank 1 calls ``os._exit`` between two steps, in
  the step's agreement all_reduce, in its factor update or in an eigendecomposition it owns.
  Rank 0 must end with a clear error within the process group's timeout (5 s) — never hang — and
  its state must be that before the lost step (the step is a transaction). Skipped if gloo is
  unavailable.

Outputs (``--out``, default ``bench/results/soak/cpu/``): ``table.md`` (the table printed at the
end) and ``log.json`` (settings, environment, every fault with its checks, every run). The exit
status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ekfac_triton import EKFAC, KFAC, load_checkpoint, ops, save_checkpoint

from .environment import command_line, environment

KINDS = ("storm", "overflow", "eigh", "interrupt", "kill9", "mixed", "rank-lost")
OPTIMIZERS = ("ekfac", "kfac")
LABELS = {"storm": "NaN/Inf storms", "overflow": "overflowing finite activations (float32)",
          "eigh": "eigendecomposition failures", "interrupt": "KeyboardInterrupt inside step()",
          "kill9": "kill -9 while checkpointing", "mixed": "mixed (storm, overflow, interrupt, kill -9)",
          "rank-lost": "rank lost (gloo, 2 processes)"}
OPT_NAMES = {"ekfac": "EKFAC", "kfac": "K-FAC"}
HPARAMS = dict(lr=0.05, damping=0.1, momentum=0.9, eigen_every=10, kl_clip=1e-3)
WIDTHS = (32, 64, 64, 10)
BATCH = 64
PG_TIMEOUT_S = 5.0
REAL_EIGH = torch.linalg.eigh


@dataclass
class Settings:
    steps: int = 2000
    seed: int = 0
    fault_rate: float = 0.01
    threads: int = 1
    quick: bool = False
    kinds: tuple[str, ...] = KINDS
    optimizers: tuple[str, ...] = OPTIMIZERS
    eigen_every: int = 10
    checkpoint_every: int = 50
    rank_lost_steps: int = 30

    @property
    def warmup(self) -> int:
        """No fault before this position (every layer has its first basis and a first refresh)."""
        return 2 * self.eigen_every + 2

    def faults(self) -> int:
        """Faults per run of an in-process kind."""
        return max(1, round(self.fault_rate * self.steps))

    def kills(self) -> int:
        """kill -9 faults per run (each starts a process: fewer)."""
        return max(1, min(self.faults(), round(self.faults() / 4)))


# -- model, data, optimizers -----------------------------------------------------------------------
def make_model(dtype: torch.dtype, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    d = WIDTHS
    return nn.Sequential(nn.Linear(d[0], d[1]), nn.Tanh(), nn.Linear(d[1], d[2]), nn.Tanh(),
                         nn.Linear(d[2], d[3])).to(dtype)


def make_optimizer(name: str, model: nn.Module, eigen_every: int, **extra: Any) -> EKFAC:
    kwargs = dict(HPARAMS, eigen_every=eigen_every, **extra)
    return EKFAC(model, **kwargs) if name == "ekfac" else KFAC(model, **kwargs)


class Data:
    """The data stream: batch ``b`` is always the same (x, y) (float64, cast on use)."""

    def __init__(self, seed: int, positions: int):
        g = torch.Generator().manual_seed(10_000 + seed)
        teacher = [torch.randn(WIDTHS[0], 48, generator=g, dtype=torch.float64) / math.sqrt(WIDTHS[0]),
                   torch.randn(48, WIDTHS[-1], generator=g, dtype=torch.float64) * 2 / math.sqrt(48)]
        self.x = torch.randn(positions, BATCH, WIDTHS[0], generator=g, dtype=torch.float64)
        logits = torch.tanh(self.x @ teacher[0]) @ teacher[1]
        self.y = (logits + 0.3 * torch.randn(logits.shape, generator=g, dtype=torch.float64)).argmax(-1)
        ge = torch.Generator().manual_seed(20_000 + seed)
        self.eval_x = torch.randn(1024, WIDTHS[0], generator=ge, dtype=torch.float64)
        self.eval_y = (torch.tanh(self.eval_x @ teacher[0]) @ teacher[1]).argmax(-1)

    def batch(self, b: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.x[b].to(dtype), self.y[b]


# -- state: snapshots, equality, finiteness --------------------------------------------------------
def flatten(obj: Any, path: str = "") -> dict[str, Tensor]:
    """Every tensor and number (not bool) of a nested state (dicts, lists, tuples), cloned, as
    ``path -> tensor``."""
    out: dict[str, Tensor] = {}

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}/{i}")
        elif isinstance(obj, Tensor):
            out[path] = obj.detach().clone()
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            out[path] = torch.tensor(obj)

    walk(obj, path)
    return out


def state_of(model: nn.Module, opt: EKFAC) -> dict[str, Tensor]:
    """Every tensor and count of the model and optimizer (cloned), except ``skipped_steps`` (which
    counts the faults, so a faulty run and its reference differ there by design)."""
    state = opt.state_dict()
    state["preconditioner"] = {k: v for k, v in state["preconditioner"].items() if k != "skipped_steps"}
    return {**flatten(model.state_dict(), "model"), **flatten(state, "optimizer")}


def compare(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Any]:
    """Bit-for-bit equality of two :func:`state_of` snapshots; the first difference if any."""
    if a.keys() != b.keys():
        return {"equal": False, "difference": f"keys differ: {sorted(a.keys() ^ b.keys())[:4]}"}
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            diff = None
            if x.shape == y.shape and x.is_floating_point() and y.is_floating_point():
                diff = float((x.double() - y.double()).abs().nan_to_num(float("inf")).max())
            return {"equal": False, "difference": k, "max_abs_difference": diff}
    return {"equal": True}


def finite(state: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def loss_on(model: nn.Module, data: Data) -> float:
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(data.eval_x.to(dtype)), data.eval_y))


# -- one training run -------------------------------------------------------------------------------
class Trainer:
    def __init__(self, opt_name: str, dtype: torch.dtype, settings: Settings, init_seed: int):
        self.opt_name, self.dtype, self.settings = opt_name, dtype, settings
        self.model = make_model(dtype, init_seed)
        self.opt = make_optimizer(opt_name, self.model, settings.eigen_every)

    @property
    def pre(self):
        return self.opt.preconditioner

    def counts(self) -> tuple[int, int]:
        return self.pre.steps, self.pre.skipped_steps

    def refresh_due(self) -> bool:
        """Whether the next step eigendecomposes a factor (a first basis, or a scheduled refresh)."""
        eigen = self.pre.eigen
        return any(not layer.curvature.has_basis or eigen.due(i, self.pre.steps)
                   for i, layer in enumerate(self.pre.layers))

    def step(self, x: Tensor, y: Tensor, after_backward: Callable[[], None] | None = None,
             hook: Callable | None = None) -> dict[str, Any]:
        """zero_grad, forward, backward, ``opt.step()``: whether it committed, its warnings and the
        exception it raised (a BaseException is caught and returned, not raised)."""
        before = self.counts()
        error = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = None if hook is None else self.model[1].register_forward_hook(hook)
            try:
                self.opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(self.model(x), y).backward()
            finally:
                if handle is not None:
                    handle.remove()
            if after_backward is not None:
                after_backward()
            try:
                self.opt.step()
            except BaseException as err:  # noqa: BLE001 - KeyboardInterrupt is the point
                error = err
        steps, skipped = self.counts()
        return {"committed": steps == before[0] + 1, "skipped": skipped == before[1] + 1,
                "warnings": [str(w.message) for w in caught], "error": error}


@dataclass
class Poison:
    """A corrupted batch (a property of the data: poisoned every time the batch is used)."""

    kind: str          # storm | overflow
    variant: str
    burst: int         # index of the fault record
    i: int
    j: int
    value: float


@dataclass
class Event:
    """A one-off event (fires once, even if its position is replayed after a resume)."""

    kind: str          # eigh | interrupt | kill9
    variant: str
    record: int


def _poisoned_step(trainer: Trainer, x: Tensor, y: Tensor, p: Poison) -> dict[str, Any]:
    x = x.clone()
    hook = after = None
    if p.variant.startswith("input") or p.kind == "overflow":
        if p.variant.endswith("row"):
            x[p.i] = p.value
        else:
            x[p.i, p.j % x.shape[1]] = p.value
    elif p.variant == "hidden-nan":
        def hook(module, inputs, output):  # noqa: ARG001 - the forward-hook signature
            output = output.clone()
            output[p.i, p.j % output.shape[1]] = float("nan")
            return output
    else:  # grad-nan / grad-inf: after backward, one entry of one parameter's gradient
        params = list(trainer.model.parameters())

        def after():
            grad = params[p.j % len(params)].grad.view(-1)
            grad[p.i % grad.numel()] = p.value
    grads_finite: list[bool] = []

    def after_backward():
        if after is not None:
            after()
        grads_finite.append(all(bool(torch.isfinite(q.grad).all()) for q in trainer.model.parameters()))

    result = trainer.step(x, y, after_backward=after_backward, hook=hook)
    result["grads_finite"] = grads_finite[0] if grads_finite else None
    return result


class EighFault:
    """``torch.linalg.eigh`` failing for ``len(modes)`` calls after ``skip`` good ones
    (``raise``: LinAlgError, ``nan``: NaN eigenvalues); remembers which factor the first failed
    call was given."""

    def __init__(self, modes: list[str], trainer: Trainer, skip: int = 0):
        self.modes, self.trainer, self.skip = list(modes), trainer, skip
        self.fired = 0
        self.target: tuple[int, str] | None = None

    def __call__(self, matrix: Tensor, *args: Any, **kwargs: Any):
        if self.skip > 0:  # skip=1: the refresh's first eigh (the input factor) succeeds
            self.skip -= 1
            return REAL_EIGH(matrix, *args, **kwargs)
        if self.fired >= len(self.modes):
            return REAL_EIGH(matrix, *args, **kwargs)
        mode = self.modes[self.fired]
        self.fired += 1
        if self.target is None:
            for index, layer in enumerate(self.trainer.pre.layers):
                for side in ("in", "out"):
                    factor = getattr(layer.curvature, f"{side}_factor")
                    if factor.data_ptr() == matrix.data_ptr() or (factor.shape == matrix.shape
                                                                  and torch.equal(factor.to(matrix.dtype), matrix)):
                        self.target = (index, side)
        if mode == "raise":
            raise torch.linalg.LinAlgError("bench.soak: injected eigh failure")
        values, vectors = REAL_EIGH(matrix, *args, **kwargs)
        return values * float("nan"), vectors


#: interrupt targets and their twins in the projected gradient's row form: one fault covers both
ROW_FORMS = {"precondition": ("precondition_projected",), "per_example_scaling": ("per_example_scaling_rows",)}


class Interrupt:
    """One call of ``real`` raising KeyboardInterrupt (``before`` it runs, or ``after`` it ran)."""

    def __init__(self, real: Callable, when: str):
        self.real, self.when, self.fired = real, when, False

    def __call__(self, *args: Any, **kwargs: Any):
        if self.fired:
            return self.real(*args, **kwargs)
        self.fired = True
        if self.when == "after":
            self.real(*args, **kwargs)
        raise KeyboardInterrupt("bench.soak: injected interrupt")


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def grow(self, n: int) -> None:
        if self.bar is not None and n > 0:
            self.bar.total += n
            self.bar.refresh()

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(opt_name: str, dtype: torch.dtype, settings: Settings, data: Data, positions: list[int],
          poisoned: dict[int, Poison] | None = None, events: dict[int, Event] | None = None,
          records: list[dict[str, Any]] | None = None, checkpoints: Path | None = None,
          progress: Progress | None = None, rng: random.Random | None = None) -> dict[str, Any]:
    """Train over the data positions ``positions`` (in order), poisoning and firing what is
    scheduled there; returns the final state and the run's summary (``records`` are updated)."""
    poisoned, events, records = poisoned or {}, dict(events or {}), records if records is not None else []
    rng = rng or random.Random(0)
    trainer = Trainer(opt_name, dtype, settings, init_seed=settings.seed)
    awaiting: list[dict[str, Any]] = []  # faults whose survival waits for the next committed step
    anomalies: list[str] = []
    eigh_pending: tuple[EighFault, dict[str, Any]] | None = None
    path = None if checkpoints is None else checkpoints / "run.pt"
    last_good = 0
    start = time.perf_counter()
    k = 0
    executed = 0
    while k < len(positions):
        b = positions[k]
        # -- checkpoints (before the step at position b) ---------------------------------------------
        if path is not None and b % settings.checkpoint_every == 0:
            event = events.get(b)
            if event is not None and event.kind == "kill9":
                del events[b]
                record = records[event.record]
                trainer, resumed = _kill_while_saving(trainer, path, b, last_good, record, settings, rng)
                if resumed is not None and record["checks"].get("loaded"):
                    record["lost"] += b - resumed
                    if progress is not None:
                        progress.grow(b - resumed)
                    awaiting.append(record)
                    k = positions.index(resumed)
                    last_good = resumed
                    continue
                anomalies.append(f"position {b}: no checkpoint could be loaded after kill -9")
                break
            save_checkpoint(path, model=trainer.model, optimizer=trainer.opt, extra={"position": b})
            last_good = b
        x, y = data.batch(b, dtype)
        executed += 1
        if progress is not None:
            progress.update()
        # -- poisoned batches -----------------------------------------------------------------------
        if b in poisoned:
            p = poisoned[b]
            record = records[p.burst]
            before, counts = state_of(trainer.model, trainer.opt), trainer.counts()
            refresh = trainer.refresh_due()
            result = _poisoned_step(trainer, x, y, p)
            diff = compare(before, state_of(trainer.model, trainer.opt))
            same = diff["equal"]
            checks = record["checks"]
            ok = (result["error"] is None and result["skipped"] and not result["committed"]
                  and any("step skipped" in w for w in result["warnings"]) and same
                  and trainer.counts()[0] == counts[0])
            checks.setdefault("steps", []).append({"position": b, "skipped": result["skipped"],
                                                   "state_bit_identical": same, "refresh_step": refresh,
                                                   "state_difference": diff.get("difference"),
                                                   "grads_finite": result["grads_finite"],
                                                   "error": None if result["error"] is None else repr(result["error"])})
            checks["all_skipped_bit_identical"] = checks.get("all_skipped_bit_identical", True) and ok
            record["lost"] += 1
            if record not in awaiting:
                awaiting.append(record)
            if result["error"] is not None and not isinstance(result["error"], Exception):
                raise result["error"]
            k += 1
            continue
        # -- events --------------------------------------------------------------------------------
        event = events.pop(b, None)
        if event is not None and event.kind == "eigh" and eigh_pending is None:
            modes = {"raise-once": ["raise"], "nan-once": ["nan"], "fail-twice": ["raise", "nan"]}[event.variant]
            eigh_pending = (EighFault(modes, trainer, skip=records[event.record]["skip"]), records[event.record])
        if event is not None and event.kind == "interrupt":
            target, when = event.variant.split(":")
            if target == "eigh" and not trainer.refresh_due() and k + 1 < len(positions):
                events[positions[k + 1]] = event  # wait for a refresh step
            else:
                record = records[event.record]
                record["position"], record["refresh_step"] = b, trainer.refresh_due()
                before, counts = state_of(trainer.model, trainer.opt), trainer.counts()
                if target == "eigh":
                    fault = Interrupt(REAL_EIGH, when)
                    with patched(torch.linalg, "eigh", fault):
                        result = trainer.step(x, y)
                    fired = fault.fired
                else:
                    # the same kernel family in the projected gradient's row form (ARCHITECTURE.md)
                    names = (target, *ROW_FORMS.get(target, ()))
                    faults = [Interrupt(getattr(ops, name), when) for name in names]
                    with ExitStack() as stack:
                        for name, fault in zip(names, faults):
                            stack.enter_context(patched(ops, name, fault))
                        result = trainer.step(x, y)
                    fired = any(fault.fired for fault in faults)
                diff = compare(before, state_of(trainer.model, trainer.opt))
                record["checks"] = {"fired": fired,
                                    "raised_keyboard_interrupt": isinstance(result["error"], KeyboardInterrupt),
                                    "state_bit_identical": diff["equal"], "counts_unchanged": trainer.counts() == counts}
                if not diff["equal"]:
                    record["checks"]["state_difference"] = diff
                if result["error"] is not None and not isinstance(result["error"], (Exception, KeyboardInterrupt)):
                    raise result["error"]
                record["lost"] += 1  # redone below, on the same batch
                awaiting.append(record)
                x, y = data.batch(b, dtype)
        # -- the (normal) step ---------------------------------------------------------------------------
        if eigh_pending is not None:
            fault, record = eigh_pending
            bases = [(layer.curvature.q_in, layer.curvature.q_out) for layer in trainer.pre.layers]
            bases = [tuple(None if q is None else q.clone() for q in pair) for pair in bases]
            warned = [layer.warned for layer in trainer.pre.layers]
            refresh = trainer.refresh_due()
            with patched(torch.linalg, "eigh", fault):
                result = trainer.step(x, y)
            if fault.fired:
                eigh_pending = None
                _check_eigh(trainer, fault, record, result, bases, warned, b, refresh)
                awaiting.append(record)
        else:
            result = trainer.step(x, y)
        error = result["error"]
        if error is not None and not isinstance(error, Exception):
            raise error  # a real Ctrl-C (injected interrupts never reach a normal step)
        unexpected = [w for w in result["warnings"] if "eigendecomposition" not in w]
        if not result["committed"] or unexpected or error is not None:
            anomalies.append(f"position {b}: committed={result['committed']} warnings={unexpected}"
                             + ("" if error is None else f" error={error!r}"))
        if result["committed"] and awaiting:
            state_finite = finite(state_of(trainer.model, trainer.opt))
            for record in awaiting:
                record["checks"]["training_continued"] = True
                record["checks"]["state_finite_after"] = state_finite
            awaiting = []
        k += 1
    for record in awaiting:  # the run ended before another step committed
        record["checks"]["training_continued"] = False
    final = state_of(trainer.model, trainer.opt)
    summary = {"optimizer": opt_name, "dtype": str(dtype).replace("torch.", ""), "positions": len(positions),
               "steps_executed": executed, "committed_steps": trainer.pre.steps,
               "skipped_steps": trainer.pre.skipped_steps, "final_eval_loss": loss_on(trainer.model, data),
               "state_finite": finite(final), "anomalies": anomalies,
               "wall_s": round(time.perf_counter() - start, 2)}
    return {"state": final, "summary": summary}


def _check_eigh(trainer: Trainer, fault: EighFault, record: dict[str, Any], result: dict[str, Any],
                bases: list[tuple], warned: list[bool], position: int, refresh: bool) -> None:
    record["position"], record["refresh_step"] = position, refresh
    checks: dict[str, Any] = {"fired": fault.fired, "step_committed": result["committed"]}
    if fault.target is None:
        checks["target_identified"] = False
    else:
        index, side = fault.target
        layer = trainer.pre.layers[index]
        checks["layer"], checks["factor"] = layer.name, side
        new = (layer.curvature.q_in, layer.curvature.q_out)
        kept = all(torch.equal(a, b) for a, b in zip(bases[index], new) if a is not None)
        expected_warning = not warned[index]
        got_warning = any("eigendecomposition" in w and layer.name in w for w in result["warnings"])
        checks["warning_as_expected"] = got_warning == expected_warning
        if record["variant"] == "fail-twice":
            checks["previous_basis_kept_bit_identical"] = kept
        else:
            q = new[0] if side == "in" else new[1]
            eye = torch.eye(q.shape[0], dtype=q.dtype)
            checks["new_basis_installed"] = not kept
            checks["new_basis_orthonormal"] = bool(torch.isfinite(q).all()) and float((q.T @ q - eye).abs().max()) < 1e-8
            checks["recovered_note"] = any("recovered by a float64 retry" in w for w in result["warnings"]) \
                if expected_warning else None
    record["checks"] = checks


# -- kill -9 while checkpointing ------------------------------------------------------------------------
def _checkpoint_child(opt_name: str, dtype_name: str, settings: dict[str, Any], staging: str, target: str,
                      position: int, chunk: int, delay: float, ready) -> None:
    """Child process: rebuild the optimizer, load the state to save, then ``save_checkpoint`` over
    the last good checkpoint with writes slowed down (``chunk`` bytes every ``delay`` s), so that
    the parent's SIGKILL can land mid-write."""
    torch.set_num_threads(1)
    s = Settings(**settings)
    trainer = Trainer(opt_name, getattr(torch, dtype_name), s, init_seed=s.seed + 1)
    load_checkpoint(staging, model=trainer.model, optimizer=trainer.opt)
    real_save = torch.save

    def slow_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        for i in range(0, len(data), chunk):
            f.write(data[i:i + chunk])
            f.flush()
            time.sleep(delay)

    torch.save = slow_save
    ready.set()
    save_checkpoint(target, model=trainer.model, optimizer=trainer.opt, extra={"position": position})


def _kill_while_saving(trainer: Trainer, path: Path, position: int, last_good: int, record: dict[str, Any],
                       settings: Settings, rng: random.Random) -> tuple[Trainer, int | None]:
    """Save at ``position`` in a child killed with SIGKILL at a random moment of the write, then
    restore a fresh trainer from ``path``; returns it and the position it resumed from."""
    record["position"] = position
    staging = path.with_name("staging.pt")
    save_checkpoint(staging, model=trainer.model, optimizer=trainer.opt, extra={"position": position})
    size = staging.stat().st_size
    chunk, delay = max(4096, size // 40), 0.005
    write_s = math.ceil(size / chunk) * delay
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_checkpoint_child, daemon=True,
                        args=(trainer.opt_name, str(trainer.dtype).replace("torch.", ""), asdict(settings),
                              str(staging), str(path), position, chunk, delay, ready))
    child.start()
    checks: dict[str, Any] = {"checkpoint_bytes": size, "write_s": round(write_s, 3)}
    record["checks"] = checks
    if not ready.wait(120):
        child.kill()
        child.join()
        checks["child_started"] = False
        return trainer, None
    # mostly mid-write; one kill in five around the end of the write (the rename and the fsyncs)
    wait = rng.uniform(0.0, write_s) if rng.random() < 0.8 else rng.uniform(write_s, 1.3 * write_s)
    time.sleep(wait)
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    checks["kill_after_s"] = round(wait, 3)
    checks["child_exitcode"] = child.exitcode
    checks["killed"] = child.exitcode == -signal.SIGKILL
    leftovers = sorted(p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.") and p.suffix == ".tmp")
    checks["temp_files_left"] = len(leftovers)
    for tmp in leftovers:  # the killed writer's partial file must be refused as truncated
        try:
            load_checkpoint(tmp)
            checks["partial_file"] = "complete (killed between the write and the rename)"
        except ValueError as err:
            checks["partial_file"] = "refused: truncated" if "truncated" in str(err) else f"refused: {err}"
        tmp.unlink()  # nothing else removes a file whose writer was killed
    # the crash: the training process is gone too; a fresh one restores from the file
    fresh = Trainer(trainer.opt_name, trainer.dtype, settings, init_seed=settings.seed + 1)
    try:
        extra = load_checkpoint(path, model=fresh.model, optimizer=fresh.opt)["extra"]
    except Exception as err:  # noqa: BLE001 - reported
        checks["loaded"] = False
        checks["load_error"] = repr(err)
        return trainer, None
    resumed = int(extra["position"])
    checks["loaded"] = True
    checks["landed"] = "after the rename (new checkpoint)" if resumed == position else \
        "before the rename (previous checkpoint)"
    checks["resumed_from_known_checkpoint"] = resumed in (position, last_good)
    staging.unlink()
    return fresh, resumed


# -- schedules ----------------------------------------------------------------------------------------
class Scheduler:
    """Random, non-overlapping fault positions in [warmup, steps - tail)."""

    def __init__(self, settings: Settings, rng: random.Random):
        self.settings, self.rng = settings, rng
        self.taken: set[int] = set()
        self.poisoned: dict[int, Poison] = {}
        self.events: dict[int, Event] = {}
        self.records: list[dict[str, Any]] = []

    def first(self, length: int) -> int:
        """Position 0: a fault on the very first step (no statistics, no basis yet)."""
        self.taken.update(range(0, length))
        return 0

    def _free(self, length: int, multiple: int = 1) -> int | None:
        """A random start ``p`` with ``[p - 1, p + length]`` free of other faults (``multiple``:
        ``p`` a multiple of it); reserves ``[p, p + length)``."""
        s = self.settings
        lo, hi = s.warmup, s.steps - 2 * s.eigen_every - length
        candidates = [p for p in range(lo, hi) if p % multiple == 0
                      and not any(q in self.taken for q in range(p - 1, p + length + 1))]
        if not candidates:
            return None
        p = self.rng.choice(candidates)
        self.taken.update(range(p, p + length))
        return p

    def _record(self, kind: str, variant: str, **extra: Any) -> int:
        self.records.append({"kind": kind, "variant": variant, "lost": 0, "checks": {}, **extra})
        return len(self.records) - 1

    def storm(self, first: bool = False) -> None:
        length = self.rng.randint(1, 5)
        p = self.first(length) if first else self._free(length)
        if p is None:
            return
        variant = self.rng.choice(["input-nan", "input-inf", "hidden-nan", "grad-nan", "grad-inf"])
        index = self._record("storm", variant, position=p, length=length)
        for b in range(p, p + length):
            value = {"nan": float("nan"), "inf": self.rng.choice([1, -1]) * float("inf")}[variant.split("-")[1]]
            self.poisoned[b] = Poison("storm", variant, index, self.rng.randrange(BATCH),
                                      self.rng.randrange(1 << 20), value)

    def overflow(self, dtype: torch.dtype) -> None:
        p = self._free(1)
        if p is None:
            return
        lo, hi = (20, 30) if dtype == torch.float32 else (160, 300)
        variant = self.rng.choice(["input-entry", "input-row"])
        value = self.rng.choice([1, -1]) * 10.0 ** self.rng.uniform(lo, hi)
        index = self._record("overflow", variant, position=p, value=value)
        self.poisoned[p] = Poison("overflow", variant, index, self.rng.randrange(BATCH),
                                  self.rng.randrange(WIDTHS[0]), value)

    def eigh(self) -> None:
        p = self._free(self.settings.eigen_every + 1)  # armed until the next refresh step
        if p is not None:
            variant = self.rng.choice(["raise-once", "nan-once", "fail-twice"])
            skip = self.rng.randrange(2)  # fail the refresh's input factor (0) or its output factor (1)
            self.events[p] = Event("eigh", variant, self._record("eigh", variant, scheduled=p, skip=skip))

    def interrupt(self, opt_name: str, first: bool = False) -> None:
        # "eigh": deferred to the next refresh step
        p = self.first(1) if first else self._free(self.settings.eigen_every + 1)
        if p is None:
            return
        targets = ["factor_update", "precondition", "moment_update", "eigh"]
        targets += ["per_example_scaling"] if opt_name == "ekfac" else []
        variant = f"{self.rng.choice(targets)}:{self.rng.choice(['before', 'after'])}"
        self.events[p] = Event("interrupt", variant, self._record("interrupt", variant, scheduled=p))

    def kill9(self) -> None:
        p = self._free(1, multiple=self.settings.checkpoint_every)
        if p is not None:
            self.events[p] = Event("kill9", "sigkill-mid-save", self._record("kill9", "sigkill-mid-save"))


def schedule(kind: str, opt_name: str, dtype: torch.dtype, settings: Settings, rng: random.Random) -> Scheduler:
    s = Scheduler(settings, rng)
    n = settings.faults()
    # storms and interrupts: the first one on the very first step (when there are two or more)
    if kind == "storm":
        for i in range(n):
            s.storm(first=i == 0 and n > 1)
    elif kind == "overflow":
        for _ in range(n):
            s.overflow(dtype)
    elif kind == "eigh":
        for _ in range(n):
            s.eigh()
    elif kind == "interrupt":
        for i in range(n):
            s.interrupt(opt_name, first=i == 0 and n > 1)
    elif kind == "kill9":
        for _ in range(settings.kills()):
            s.kill9()
    elif kind == "mixed":
        for _ in range(max(1, settings.kills() // 2)):
            s.kill9()
        for _ in range(max(1, n // 3)):
            s.storm()
            s.overflow(dtype)
            s.interrupt(opt_name)
    return s


def survived(record: dict[str, Any]) -> bool:
    """Survived: training went on after the fault with a finite state (rank lost: the surviving
    rank ended with a clear error within the timeout, without hanging)."""
    checks = record["checks"]
    if record["kind"] == "rank-lost":
        return bool(not checks.get("rank0_hung") and checks.get("rank0_error") and checks.get("clear_error")
                    and checks.get("within_timeout"))
    return bool(checks.get("training_continued") and checks.get("state_finite_after"))


def contract_failures(record: dict[str, Any]) -> list[str]:
    """The checks of the library's guarantee for this fault that did not hold (empty: all held)."""
    checks = record["checks"]
    kind = record["kind"]
    if kind in ("storm", "overflow"):
        keys = ["all_skipped_bit_identical"]
    elif kind == "interrupt":
        keys = ["fired", "raised_keyboard_interrupt", "state_bit_identical", "counts_unchanged"]
    elif kind == "kill9":
        keys = ["loaded", "resumed_from_known_checkpoint"]
        partial = checks.get("partial_file", "refused: truncated")
        if not (partial == "refused: truncated" or partial.startswith("complete")):
            return [k for k in keys if not checks.get(k)] + [f"partial_file: {partial}"]
    elif kind == "eigh":
        keys = ["fired", "step_committed", "warning_as_expected"] + (
            ["previous_basis_kept_bit_identical"] if record["variant"] == "fail-twice"
            else ["new_basis_installed", "new_basis_orthonormal"])
    elif kind == "rank-lost":
        keys = ["rank1_died_as_injected", "state_as_before_step", "counts_unchanged", "state_finite"]
    else:
        keys = []
    return [k for k in keys if not checks.get(k)]


# -- rank lost under gloo ------------------------------------------------------------------------------
def _rank_worker(rank: int, init_method: str, opt_name: str, death: str, die_at: int, steps: int,
                 seed: int, result_path: str) -> None:
    """One rank of the 2-process run: rank 1 dies (``os._exit``) at ``die_at`` as ``death`` says;
    rank 0 writes what happened to ``result_path`` and exits."""
    import torch.distributed as dist

    from ekfac_triton.distributed import average_gradients

    torch.set_num_threads(1)
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # a generous timeout for the rendezvous (start-up skew), then a 5 s group for training
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=PG_TIMEOUT_S), backend="gloo")
    model = make_model(torch.float64, seed)
    opt = make_optimizer(opt_name, model, eigen_every=5, process_group=group)
    data = Data(seed, steps)
    half = BATCH // 2
    result: dict[str, Any] = {"rank": rank, "error": None}
    for step in range(steps):
        x, y = data.batch(step, torch.float64)
        x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        dying = rank == 1 and step >= die_at
        if dying and death == "between-steps":
            os._exit(17)
        if dying and death == "agreement":
            opt.preconditioner.distribution.agree = lambda *a, **k: os._exit(17)
        if dying and death == "factor-update":
            ops.factor_update = lambda *a, **k: os._exit(17)
        if dying and death == "eigh-owned":
            torch.linalg.eigh = lambda *a, **k: os._exit(17)
        before = state_of(model, opt) if rank == 0 else None
        counts = (opt.preconditioner.steps, opt.preconditioner.skipped_steps)
        start = time.perf_counter()
        phase = "forward/backward"
        try:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            phase = "average_gradients"
            average_gradients(model.parameters(), group)
            phase = "opt.step()"
            opt.step()
        except BaseException as err:  # noqa: BLE001 - the point of the test
            after = state_of(model, opt)
            result.update(error=f"{type(err).__name__}: {err}", error_type=type(err).__name__,
                          seconds_to_error=round(time.perf_counter() - start, 3), step=step,
                          state_as_before_step=compare(before, after)["equal"] if before is not None else None,
                          counts_unchanged=(opt.preconditioner.steps, opt.preconditioner.skipped_steps) == counts,
                          state_finite=finite(after), phase=phase)
            break
    result["steps_committed"] = opt.preconditioner.steps
    if rank == 0:
        torch.save(result, result_path)
    # no destroy_process_group: with the peer gone it can block; the process just ends
    sys.stdout.flush()
    os._exit(0)


def rank_lost(settings: Settings, rng: random.Random, progress: Progress) -> list[dict[str, Any]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        return [{"kind": "rank-lost", "run": "rank-lost", "variant": "skipped", "skipped": "torch.distributed with gloo is unavailable",
                 "lost": 0, "checks": {}}]
    deaths = ["factor-update"] if settings.quick else ["between-steps", "agreement", "factor-update", "eigh-owned"]
    records = []
    ctx = mp.get_context("spawn")
    for n, death in enumerate(deaths):
        opt_name = settings.optimizers[n % len(settings.optimizers)]
        # after the first refreshes (eigen_every 5), early enough for rank 1 to own a refresh after it
        die_at = rng.randint(11, max(11, settings.rank_lost_steps - 12))
        tmp = Path(tempfile.mkdtemp(prefix="soak-ranks-"))
        init_method = f"file://{tmp}/rendezvous"
        result_path = tmp / "rank0.pt"
        procs = [ctx.Process(target=_rank_worker, daemon=True,
                             args=(r, init_method, opt_name, death, die_at, settings.rank_lost_steps,
                                   settings.seed, str(result_path))) for r in range(2)]
        progress.describe(f"rank-lost {death}")
        start = time.perf_counter()
        for p in procs:
            p.start()
        procs[1].join(180)
        died = time.perf_counter()
        procs[0].join(PG_TIMEOUT_S * 3 + 10)
        hung = procs[0].is_alive()
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        result = torch.load(result_path, weights_only=False) if result_path.exists() else {}
        shutil.rmtree(tmp, ignore_errors=True)
        error = result.get("error") or ""
        clear = any(s in error.lower() for s in ("connection", "peer", "timed out", "timeout"))
        checks = {"rank1_died_as_injected": procs[1].exitcode == 17, "rank1_exitcode": procs[1].exitcode,
                  "rank0_exitcode": procs[0].exitcode, "rank0_hung": hung,
                  "rank0_error": error[:300], "rank0_error_type": result.get("error_type"), "clear_error": clear,
                  "seconds_to_error": result.get("seconds_to_error"),
                  "rank0_exit_after_rank1_s": round(time.perf_counter() - died, 2) if not hung else None,
                  "within_timeout": (result.get("seconds_to_error") or 1e9) <= PG_TIMEOUT_S + 1.0,
                  "state_as_before_step": result.get("state_as_before_step"),
                  "counts_unchanged": result.get("counts_unchanged"), "state_finite": result.get("state_finite"),
                  "step": result.get("step"), "phase": result.get("phase"), "wall_s": round(time.perf_counter() - start, 2)}
        record = {"kind": "rank-lost", "run": "rank-lost", "variant": death, "optimizer": opt_name,
                  "position": die_at, "lost": 1 if error else 0, "checks": checks}
        record["survived"], record["contract_failures"] = survived(record), contract_failures(record)
        records.append(record)
        progress.update(settings.rank_lost_steps)
    return records


# -- the benchmark ------------------------------------------------------------------------------------
def run_all(settings: Settings, progress_bar: bool = True) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    data = Data(settings.seed, settings.steps)
    rng = random.Random(settings.seed)
    all_positions = list(range(settings.steps))
    kinds = [k for k in KINDS if k in settings.kinds]
    in_process = [k for k in kinds if k != "rank-lost"]
    plans = {}
    for kind in in_process:
        for opt_name in settings.optimizers:
            dtype = torch.float32 if kind == "overflow" else torch.float64
            plans[(kind, opt_name)] = (dtype, schedule(kind, opt_name, dtype, settings, rng))
    # runs: each faulty run, and the references (a clean run per optimizer and dtype, without the
    # poisoned positions where there are some)
    keys = {(opt_name, str(dtype), tuple(b for b in all_positions if b not in plan.poisoned))
            for (kind, opt_name), (dtype, plan) in plans.items() if kind != "eigh"}
    total = settings.steps * len(plans) + sum(len(key[2]) for key in keys)
    total += (settings.rank_lost_steps * (1 if settings.quick else 4)) if "rank-lost" in kinds else 0
    progress = Progress(total, progress_bar)
    references: dict[tuple, dict[str, Tensor]] = {}
    runs, records = [], []
    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        for (kind, opt_name), (dtype, plan) in plans.items():
            progress.describe(f"{kind} {OPT_NAMES[opt_name]}")
            ckpt = None
            if kind in ("kill9", "mixed"):
                ckpt = scratch / f"{kind}-{opt_name}"
                ckpt.mkdir()
            out = train(opt_name, dtype, settings, data, all_positions, plan.poisoned, plan.events, plan.records,
                        ckpt, progress, random.Random(rng.random()))
            summary = dict(out["summary"], kind=kind)
            if kind != "eigh":
                positions = [b for b in all_positions if b not in plan.poisoned]
                key = (opt_name, str(dtype), tuple(positions))
                if key not in references:
                    progress.describe(f"reference {OPT_NAMES[opt_name]}")
                    ref = train(opt_name, dtype, settings, data, positions, progress=progress)
                    references[key] = ref["state"]
                    summary["reference_run"] = ref["summary"]
                summary["reference"] = compare(out["state"], references[key])
                summary["reference_positions"] = len(positions)
            for record in plan.records:
                record["run"], record["optimizer"] = kind, opt_name
                record["survived"] = survived(record)
                record["contract_failures"] = contract_failures(record)
            runs.append(summary)
            records += plan.records
        if "rank-lost" in kinds:
            records += rank_lost(settings, rng, progress)
    finally:
        progress.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return {"runs": runs, "faults": records, "wall_s": round(time.perf_counter() - start, 1)}


CONTRACTS = {"storm": "skipped, state bit-identical", "overflow": "skipped, state bit-identical",
             "eigh": "step committed; retry recovers / basis kept bit for bit",
             "interrupt": "KeyboardInterrupt raised, state and counts bit-identical",
             "kill9": "checkpoint loads (old or new, never truncated)",
             "mixed": "as for each kind", "rank-lost": "rank 0's state = before the lost step"}


def table(result: dict[str, Any], settings: Settings) -> tuple[str, bool]:
    """The markdown table (and whether every check passed)."""
    rows = ["| kind | injected | survived | steps lost | final state equals reference | per-fault checks |",
            "|---|---:|---:|---:|---|---|"]
    all_ok = True
    totals = [0, 0, 0, 0]
    for kind in [k for k in KINDS if k in settings.kinds]:
        records = [r for r in result["faults"] if r["run"] == kind and r["variant"] != "skipped"]
        if kind == "rank-lost" and any(r["variant"] == "skipped" for r in result["faults"] if r["run"] == kind):
            rows.append(f"| {LABELS[kind]} | 0 | 0 | 0 | skipped: gloo unavailable | |")
            continue
        injected, ok = len(records), sum(r["survived"] for r in records)
        held = sum(not r["contract_failures"] for r in records)
        lost = sum(r["lost"] for r in records)
        totals = [totals[0] + injected, totals[1] + ok, totals[2] + lost, totals[3] + held]
        all_ok &= ok == injected and held == injected
        runs = [r for r in result["runs"] if r["kind"] == kind]
        all_ok &= all(not r["anomalies"] and r["state_finite"] for r in runs)
        if kind == "eigh":
            ref = "n/a (the basis changes by design)"
        elif kind == "rank-lost":
            ref = "n/a (the run ends; rank 0's state checked instead)"
        else:
            equal = [OPT_NAMES[r["optimizer"]] for r in runs if r["reference"]["equal"]]
            differ = [OPT_NAMES[r["optimizer"]] for r in runs if not r["reference"]["equal"]]
            what = "the clean run without the skipped batches" if kind in ("storm", "overflow", "mixed") \
                else "the uninterrupted run"
            dtype = "float32" if kind == "overflow" else "float64"
            ref = (f"yes, bit for bit ({', '.join(equal)}; {dtype}; vs {what})" if not differ
                   else f"**no**: {', '.join(differ)} differ" + (f", yes: {', '.join(equal)}" if equal else ""))
            all_ok &= not differ
        checks = f"{held}/{injected}: {CONTRACTS[kind]}"
        rows.append(f"| {LABELS[kind]} | {injected} | {ok} | {lost} | {ref} | {checks} |")
    rows.append(f"| **total** | **{totals[0]}** | **{totals[1]}** | **{totals[2]}** | "
                f"{'all checks passed' if all_ok else '**some checks failed** (notes, log.json)'} | "
                f"**{totals[3]}/{totals[0]}** |")
    return "\n".join(rows), all_ok


def _counts(records: list[dict[str, Any]], key: str = "variant") -> str:
    values = sorted({str(r[key]) for r in records})
    return ", ".join(f"{v} {sum(str(r[key]) == v for r in records)}" for v in values)


def notes(result: dict[str, Any]) -> list[str]:
    """What the table does not say: variants, where the faults landed, every failed check."""
    out = []
    faults = [r for r in result["faults"] if r["variant"] != "skipped"]
    storms = [r for r in faults if r["kind"] == "storm"]
    if storms:
        steps = [s for r in storms for s in r["checks"].get("steps", [])]
        out.append(f"storms (all runs): {len(storms)} bursts of 1-5 steps, {len(steps)} poisoned steps "
                   f"({sum(s['refresh_step'] for s in steps)} on steps that eigendecompose, "
                   f"{sum(r['position'] == 0 for r in storms)} bursts from the very first step); {_counts(storms)}")
    over = [r for r in faults if r["kind"] == "overflow"]
    if over:
        steps = [s for r in over for s in r["checks"].get("steps", [])]
        out.append(f"overflows: {sum(r['run'] == 'overflow' for r in over)} in float32 (|x| = 1e20…1e30), "
                   f"{sum(r['run'] == 'mixed' for r in over)} in float64 in the mixed runs (|x| = 1e160…1e300); "
                   f"{_counts(over)}; the gradients were finite on {sum(bool(s['grads_finite']) for s in steps)} "
                   f"of the {len(steps)} poisoned steps (the overflow is in the statistics)")
    eig = [r for r in faults if r["kind"] == "eigh"]
    if eig:
        twice = [r for r in eig if r["variant"] == "fail-twice"]
        kept = sum(bool(r["checks"].get("previous_basis_kept_bit_identical")) for r in twice)
        out.append(f"eigh: {_counts(eig)}; {len(eig) - len(twice)} single failures recovered by the float64 retry, "
                   f"{len(twice)} double failures with the previous basis kept bit for bit in {kept}; "
                   f"factors hit: {_counts([r['checks'] for r in eig if 'factor' in r['checks']], 'factor')}")
    intr = [r for r in faults if r["kind"] == "interrupt"]
    if intr:
        out.append(f"interrupts (target:when): {_counts(intr)}; {sum(r.get('position') == 0 for r in intr)} on the "
                   f"very first step, {sum(bool(r.get('refresh_step')) for r in intr)} on steps that eigendecompose")
    kills = [r for r in faults if r["kind"] == "kill9"]
    if kills:
        before = sum("before" in r["checks"].get("landed", "") for r in kills)
        missed = sum(not r["checks"].get("killed") for r in kills)
        truncated = sum(r["checks"].get("partial_file") == "refused: truncated" for r in kills)
        left = sum(r["checks"].get("temp_files_left", 0) for r in kills)
        out.append(f"kill -9: {len(kills)} kills ({missed} after the child had already exited); {before} landed "
                   f"before the rename (the previous checkpoint loaded), {len(kills) - before} after it (the new "
                   f"one loaded); {truncated} partial temporary files, each refused by load_checkpoint as truncated; "
                   f"{left} temporary files were left behind by the killed writers (the bench removes them)")
    ranks = [r for r in faults if r["kind"] == "rank-lost"]
    if ranks:
        secs = [r["checks"]["seconds_to_error"] for r in ranks if r["checks"].get("seconds_to_error") is not None]
        out.append("rank lost: " + "; ".join(
            f"{r['variant']} ({OPT_NAMES[r['optimizer']]}, step {r['checks'].get('step')}, in "
            f"{r['checks'].get('phase')}): {r['checks'].get('rank0_error_type')} after "
            f"{r['checks'].get('seconds_to_error')} s" for r in ranks)
                   + (f"; max {max(secs)} s (process-group timeout {PG_TIMEOUT_S:.0f} s)" if secs else ""))
    failed = [r for r in faults if r["contract_failures"] or not r["survived"]]
    for r in failed:
        detail = {k: v for k, v in r["checks"].items() if k != "steps"}
        out.append(f"**failed check**: {r['run']} run, {OPT_NAMES.get(r.get('optimizer'), '')} {r['kind']} "
                   f"{r['variant']} at position {r.get('position')}: {r['contract_failures'] or 'not survived'} "
                   f"({json.dumps(detail, default=str)[:400]})")
    anomalies = [f"{r['kind']} {OPT_NAMES[r['optimizer']]}: {a}" for r in result["runs"] for a in r["anomalies"]]
    if anomalies:
        out.append(f"**anomalies** (steps that did not commit, unexpected warnings): {anomalies[:5]}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 2000; --quick: 80)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fault-rate", type=float, default=None,
                   help="faults per step of each run (default 0.01; kill -9: a quarter as many)")
    p.add_argument("--out", type=Path, default=None, help="folder for table.md and log.json "
                   "(default bench/results/soak/cpu, --quick: bench/results/soak/cpu-quick)")
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="ekfac,kfac or one of them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    bad = [k for k in kinds if k not in KINDS] + [o for o in args.optimizers.split(",") if o not in OPTIMIZERS]
    if bad:
        p.error(f"unknown kinds/optimizers {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    settings = Settings(steps=args.steps or (80 if quick else 2000), seed=args.seed,
                        fault_rate=args.fault_rate if args.fault_rate is not None else (0.025 if quick else 0.01),
                        threads=args.threads, quick=quick, kinds=tuple(k for k in args.kinds.split(",") if k),
                        optimizers=tuple(args.optimizers.split(",")),
                        eigen_every=5 if quick else HPARAMS["eigen_every"],
                        checkpoint_every=20 if quick else 50, rank_lost_steps=20 if quick else 30)
    if settings.steps < settings.warmup + 4 * settings.eigen_every:
        raise SystemExit(f"--steps must be at least {settings.warmup + 4 * settings.eigen_every}")
    out = args.out or Path("bench/results/soak") / ("cpu-quick" if quick else "cpu")
    torch.set_num_threads(settings.threads)
    env = environment("cpu", command_line("bench.soak", sys.argv[1:] if argv is None else argv))
    result = run_all(settings, progress_bar=not args.no_progress)
    text, ok = table(result, settings)
    extra = notes(result)
    report = (f"Soak run: {settings.steps} steps per run, seed {settings.seed}, fault rate {settings.fault_rate}, "
              f"{settings.threads} thread(s), {result['wall_s']} s.\n\n{text}\n\n"
              + "\n".join(f"- {n}" for n in extra) + "\n")
    print(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(report)
    log = {"settings": dict(asdict(settings), hparams=dict(HPARAMS, eigen_every=settings.eigen_every),
                            widths=WIDTHS, batch=BATCH, process_group_timeout_s=PG_TIMEOUT_S),
           "environment": env, "wall_s": result["wall_s"], "all_checks_passed": ok, "table": text, "notes": extra,
           "runs": result["runs"], "faults": result["faults"]}
    (out / "log.json").write_text(json.dumps(log, indent=1, default=str) + "\n")
    print(f"wrote {out / 'table.md'} and {out / 'log.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
