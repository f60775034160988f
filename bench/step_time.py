"""Per-step wall time and peak memory of full training steps (zero_grad + forward + backward +
optimizer step) of SGD, AdamW, EKFAC, K-FAC and MAC on three models (an MLP autoencoder, VGG11 and
a stack of wide MLP blocks: the layer shapes on which second-order optimizers are usually
compared), in one process on one device.

    python -m bench.step_time                      # all models, cuda if available, 20 + 60 steps
    python -m bench.step_time --quick              # CPU smoke run (tiny sizes; not a result)
    python -m bench.step_time --models vgg11 --steps 120 --out /tmp/st
    python -m bench.step_time --size small --device cpu --threads 1   # CPU-sized models

Data are synthetic (random tensors, fixed seed): this measures time, not optimisation.

Timing: each step is bracketed by :func:`bench.runner.synchronize` (``torch.cuda.synchronize()``
on CUDA with ``--sync device``, the default: each step is charged the refreshes it starts;
``--sync stream`` waits only for the current stream, as the training runner does, so that
eigendecompositions that EKFAC runs on its side stream overlap with later steps as they would in
a training loop that does not synchronise; plain ``time.perf_counter`` on CPU).

Period alignment (default except with ``--quick``; ``--no-align``/``--align`` set it): a configuration with
``eigen_every = P`` refreshes each layer once per P steps, from step P on. With 60 timed steps
after 20 warm-up steps an ``eigen_every=100`` run would never refresh in the timed window and
an all-at-once run would be charged one full refresh per 60 steps instead of per 100. So for
such configurations the warm-up is raised to at least P and the number of timed steps rounded up
to a multiple of P: every layer then refreshes exactly (timed steps / P) times in the window,
and the mean is the long-run mean. The table states the steps actually run.

Memory (:mod:`bench.memory`), per row:
* **state MB**: the bytes of every tensor the optimizer and its preconditioner hold after the
  timed steps (momentum buffers, factors, bases, scalings, MAC means), each storage once, the
  model's parameters, gradients and buffers excluded.
* **peak MB**: the model's parameters and buffers plus the peak, over the timed window, of the
  memory allocated since just before the optimizer was created (gradients set to None): so
  parameters + gradients + activations + optimizer state + the step's temporaries, at their
  largest; the data batches are not counted. On CUDA it is read from the caching allocator's
  counters during the timed steps themselves; on CPU it comes from a second, untimed pass of the
  same steps (fresh optimizer, same initial weights) under the torch memory profiler, which sees
  every tensor allocation but not memory that BLAS/LAPACK allocate for themselves.
  ``--no-memory`` skips the CPU pass (the CUDA figures cost nothing and are always taken).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is in the bench extra
    def tqdm(iterable=None, **kwargs):  # type: ignore[no-redef]
        return iterable

from ekfac_triton import EKFAC

from .environment import command_line, device_slug, environment
from .experiments import VGG11_CHANNELS, autoencoder, mlp_stack, vgg11
from .memory import PeakMemory, state_bytes, tensor_bytes
from .optimizers import describe, make_optimizer, release
from .runner import SYNC_SCOPES, synchronize

MODELS = ("autoencoder", "vgg11", "mlp-stack")
# tiny: --quick; small: CPU-sized measurements; full: autoencoder 784-1000-500-250-30 at batch 512,
# VGG11 at batch 128, MLP blocks 1024 -> 4096 -> 1024 on 4096 tokens (the published comparisons' sizes)
SIZES = ("tiny", "small", "full")
MIB = 2**20
# The targets of the staggered refresh schedule (the "goals" column): the worst step at most 1.5x
# the median step, and the mean step at eigen_every=10 at most 2x our own mean without refreshes.
GOAL_WORST_OVER_MEDIAN = 1.5
GOAL_E10_OVER_NO_REFRESH = 2.0
NO_REFRESH = "ekfac-no-refresh"


# -- models and synthetic data ----------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    description: str


def make_workload(name: str, quick: bool, device: torch.device, n_batches: int = 4,
                  size: str | None = None) -> Workload:
    """The model (seeded) and a few fixed synthetic batches already on ``device``.

    Args:
        name: one of :data:`MODELS`.
        quick: the tiny smoke-run sizes (when ``size`` is None).
        device: where the model and batches live.
        n_batches: how many distinct batches the steps cycle through.
        size: ``"tiny"``, ``"small"`` (narrower/smaller models that a CPU thread trains in well under
            a second per step) or ``"full"`` (see :data:`SIZES`); None: tiny if ``quick`` else full.
    """
    size = size or ("tiny" if quick else "full")
    if size not in SIZES:
        raise ValueError(f"Invalid size={size!r}: choose from {SIZES}")
    tiny, small = size == "tiny", size == "small"
    torch.manual_seed(0)
    gen = torch.Generator(device="cpu").manual_seed(1)
    if name == "autoencoder":
        widths = [196, 100, 50, 25, 10] if tiny else [784, 250, 125, 60, 30] if small else [784, 1000, 500, 250, 30]
        batch = 32 if tiny else 128 if small else 512
        model = autoencoder(nn.Tanh, widths)
        xs = [torch.rand(batch, widths[0], generator=gen) for _ in range(n_batches)]
        batches = [(x, x) for x in xs]
        loss_fn = nn.functional.binary_cross_entropy_with_logits
        desc = (f"MLP autoencoder {'-'.join(map(str, widths + widths[-2::-1]))} (tanh), batch {batch}, "
                "BCE-with-logits reconstruction of uniform random inputs in [0, 1]")
    elif name == "vgg11":
        div = 16 if tiny else 4 if small else 1
        batch = 8 if tiny else 32 if small else 128
        model = vgg11(div, inplace_relu=True)
        xs = [torch.randn(batch, 3, 32, 32, generator=gen) for _ in range(n_batches)]
        ys = [torch.randint(0, 10, (batch,), generator=gen) for _ in range(n_batches)]
        batches = list(zip(xs, ys))
        loss_fn = nn.functional.cross_entropy
        widths = [v if v == "M" else int(v) // div for v in VGG11_CHANNELS]
        desc = (f"VGG11 {widths} + BatchNorm + ReLU, Linear({widths[-2]}, 10), 32x32x3 input, batch {batch}, "
                "cross-entropy on N(0, 1) images with uniform random labels")
    elif name == "mlp-stack":
        d, hidden, shape = ((64, 256, (2, 32, 64)) if tiny else (256, 1024, (2, 128, 256)) if small
                            else (1024, 4096, (4, 1024, 1024)))
        model = mlp_stack(d, hidden, gelu_between_blocks=False)
        xs = [torch.randn(*shape, generator=gen) for _ in range(n_batches)]
        ts = [torch.randn(*shape, generator=gen) for _ in range(n_batches)]
        batches = list(zip(xs, ts))
        loss_fn = nn.functional.mse_loss
        desc = (f"4 x (Linear {d}->{hidden}, GELU, Linear {hidden}->{d}) (no residual), input (B, T, d) = "
                f"{tuple(shape)} ({shape[0] * shape[1]} tokens), MSE to N(0, 1) targets")
    else:
        raise ValueError(f"unknown model {name!r}: choose from {MODELS}")
    model = model.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    desc += f"; {tensor_bytes(model.parameters()) / MIB:.2f} MB of parameters"
    return Workload(name, model, batches, loss_fn, desc)


# -- configurations ---------------------------------------------------------------------------------
@dataclass
class Config:
    name: str
    kind: str  # a kind of bench.optimizers.make_optimizer
    hparams: dict[str, Any] = field(default_factory=dict)
    period: int | None = None  # eigen_every where refreshes happen in the run (for alignment)

    def describe(self) -> str:
        return describe(self.kind, self.hparams)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return make_optimizer(self.kind, model, self.hparams)


def configurations(total_steps_bound: int) -> list[Config]:
    """SGD, AdamW and the EKFAC/K-FAC variants; ``total_steps_bound`` exceeds every run's step count
    (the no-refresh configuration's eigen_every)."""
    # damping 0.1 keeps every model finite over a few hundred steps on random data (a diverged run would
    # time the skipped-step path instead); the step's cost does not depend on lr or damping.
    base = dict(lr=0.01, damping=0.1, momentum=0.9, factor_every=1)
    cfgs = [Config("sgd", "sgd", dict(lr=0.01, momentum=0.9)), Config("adamw", "adamw", dict(lr=1e-3))]
    for every in (10, 100):
        for stagger in (True, False):
            tag = "stagger" if stagger else "all-at-once"
            cfgs.append(Config(f"ekfac-e{every}-{tag}", "ekfac", dict(base, eigen_every=every, stagger=stagger), every))
    cfgs.append(Config(NO_REFRESH, "ekfac", dict(base, eigen_every=total_steps_bound, stagger=True)))
    cfgs.append(Config("kfac-e10-stagger", "kfac", dict(base, eigen_every=10, stagger=True), 10))
    # MAC with the official periods (statistics every 5 steps, refresh every 50) and ρ = 1, no weight
    # decay (as every other row)
    cfgs.append(Config("mac-s5-e50", "mac", dict(lr=0.01, damping=1.0, momentum=0.9, weight_decay=0.0,
                                                 factor_every=5, eigen_every=50), 50))
    return cfgs


def plan_steps(cfg: Config, warmup: int, steps: int, align: bool) -> tuple[int, int]:
    """(warm-up steps, timed steps) actually run for ``cfg`` (see the module docstring)."""
    if not align or cfg.period is None:
        return warmup, steps
    p = cfg.period
    return max(warmup, p), p * math.ceil(steps / p)


# -- timing -----------------------------------------------------------------------------------------
def _pct(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of sorted data."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = (len(sorted_xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> dict[str, float]:
    s = sorted(times_ms)
    return dict(mean_ms=statistics.fmean(s), median_ms=statistics.median(s), p20_ms=_pct(s, 20),
                p80_ms=_pct(s, 80), worst_ms=s[-1])


def _reset(model: nn.Module, state: dict[str, Tensor], device: torch.device) -> None:
    """Initial weights back, no gradients, garbage collected: the state a configuration starts from."""
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _step_fn(work: Workload, opt: torch.optim.Optimizer) -> Callable[[int], None]:
    model, nb = work.model, len(work.batches)

    def one_step(i: int) -> None:
        x, y = work.batches[i % nb]
        opt.zero_grad(set_to_none=True)
        loss = work.loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return one_step


def cpu_peak_bytes(work: Workload, cfg: Config, warmup: int, steps: int, state: dict[str, Tensor]) -> int:
    """The CPU memory pass: from ``state``, a fresh optimizer runs ``warmup + steps`` untimed steps
    under the memory profiler; the peak over the last ``steps`` above the memory before the
    optimizer existed (see :class:`bench.memory.PeakMemory`)."""
    device = torch.device("cpu")
    _reset(work.model, state, device)
    peak = PeakMemory(device)
    opt = cfg.make_optimizer(work.model)
    try:
        one_step = _step_fn(work, opt)
        for i in range(warmup + steps):
            if i == warmup:
                peak.start_window()
            one_step(i)
        return peak.stop()
    finally:
        release(opt)
        del opt
        _reset(work.model, state, device)


def run_config(work: Workload, cfg: Config, warmup: int, steps: int, device: torch.device,
               sync: Callable[[], None], progress: bool, memory: bool = True) -> dict[str, Any]:
    """Time ``warmup + steps`` steps of ``cfg`` on ``work`` (the last ``steps`` count) and measure
    its memory (module docstring); the model is left at its initial weights."""
    model = work.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model_bytes = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    _reset(model, state, device)
    peak = PeakMemory(device) if device.type == "cuda" else None  # free on CUDA: taken while timing
    opt = cfg.make_optimizer(model)
    one_step = _step_fn(work, opt)

    eigen = opt.preconditioner.eigen if isinstance(opt, EKFAC) else None
    total = warmup + steps
    bar = tqdm(range(total), desc=f"{work.name}:{cfg.name}", leave=False, disable=not progress, unit="step")
    times: list[float] = []
    refreshes_before = 0
    try:
        for i in bar:
            if i == warmup:
                if eigen is not None:
                    refreshes_before = eigen.decompositions
                if peak is not None:
                    peak.start_window()
            sync()
            t0 = time.perf_counter()
            one_step(i)
            sync()
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(dt)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        peak_bytes = peak.stop() if peak is not None else None
        held_bytes = state_bytes(opt, model)
        refreshes = (eigen.decompositions - refreshes_before) if eigen is not None else None
        skipped = opt.preconditioner.skipped_steps if isinstance(opt, EKFAC) else None
        # Check the run did train something finite (a NaN model would time a different code path).
        with torch.no_grad():
            x, y = work.batches[0]
            final_loss = float(work.loss_fn(model(x), y))
    finally:
        release(opt)
        del opt, one_step
        _reset(model, state, device)  # next configuration starts from the same weights
    if peak_bytes is None and memory:
        peak_bytes = cpu_peak_bytes(work, cfg, warmup, steps, state)
    return dict(model=work.name, config=cfg.name, optimizer=cfg.describe(), warmup=warmup, steps=steps,
                refreshes_in_window=refreshes, skipped_steps=skipped, final_loss=final_loss,
                finite=math.isfinite(final_loss) and not skipped, times_ms=times, **summarize(times),
                model_bytes=model_bytes, state_bytes=held_bytes,
                peak_bytes=None if peak_bytes is None else model_bytes + peak_bytes,
                state_mb=held_bytes / MIB, peak_mb=None if peak_bytes is None else (model_bytes + peak_bytes) / MIB)


# -- output -------------------------------------------------------------------------------------------
def add_ratios(rows: list[dict[str, Any]]) -> None:
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["config"]] = r
    for r in rows:
        peers = by_model[r["model"]]
        sgd, ref = peers.get("sgd"), peers.get(NO_REFRESH)
        r["mean_over_sgd"] = r["mean_ms"] / sgd["mean_ms"] if sgd else None
        r["peak_over_sgd"] = (r["peak_bytes"] / sgd["peak_bytes"]
                              if sgd and r.get("peak_bytes") is not None and sgd.get("peak_bytes") else None)
        r["worst_over_median"] = r["worst_ms"] / r["median_ms"]
        r["mean_over_no_refresh"] = r["mean_ms"] / ref["mean_ms"] if ref and r["config"].startswith(("ekfac", "kfac")) else None
        goals = []
        if r["config"].startswith(("ekfac", "kfac")):
            ok = r["worst_over_median"] <= GOAL_WORST_OVER_MEDIAN
            goals.append(f"worst≤{GOAL_WORST_OVER_MEDIAN}×med {'MET' if ok else 'MISSED'}")
            if "-e10-" in r["config"] and r["mean_over_no_refresh"] is not None:
                ok = r["mean_over_no_refresh"] <= GOAL_E10_OVER_NO_REFRESH
                goals.append(f"e10≤{GOAL_E10_OVER_NO_REFRESH:g}×no-refresh {'MET' if ok else 'MISSED'}")
        r["goals"] = "; ".join(goals)


MAC_PAPER_TIME_SAVING = 0.55  # "up to 55% less end-to-end time than K-FAC" (Seung, Lee & Ko 2025)


def mac_claims(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines comparing MAC's rows with the MAC paper's claims, per model (empty without
    the mac, kfac and sgd rows)."""
    lines: list[str] = []
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["config"]] = r
    for model, peers in by_model.items():
        mac, kfac, sgd = peers.get("mac-s5-e50"), peers.get("kfac-e10-stagger"), peers.get("sgd")
        if not (mac and kfac and sgd):
            continue
        if not lines:
            lines += ["", "MAC against its paper's claims (up to 55% less end-to-end time than K-FAC; memory close "
                      "to SGD), step time here being the whole step, same steps for both:", "",
                      "| model | MAC/K-FAC mean step | MAC saves vs K-FAC | MAC/SGD mean step | MAC/SGD peak | "
                      "MAC/K-FAC peak | MAC state − SGD state |", "|---|---:|---:|---:|---:|---:|---:|"]
        t = mac["mean_ms"] / kfac["mean_ms"]
        peak_sgd = mac["peak_over_sgd"]
        peak_kfac = mac["peak_bytes"] / kfac["peak_bytes"] if mac["peak_bytes"] and kfac["peak_bytes"] else None
        extra = (mac["state_bytes"] - sgd["state_bytes"]) / 1024
        lines.append(f"| {model} | {t:.2f} | {100 * (1 - t):.0f}% | {mac['mean_over_sgd']:.2f} | "
                     f"{_f(peak_sgd, '.3f')} | {_f(peak_kfac, '.3f')} | {extra:.1f} KB |")
    return lines


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], descs: dict[str, str], quick: bool,
             align: bool) -> str:
    lines = []
    if quick:
        lines.append("**SMOKE RUN (`--quick`): tiny scaled-down models, few steps. Not a performance result.**\n")
    lines.append(f"Step time, {env['device_name']} ({env['device']}, {env['threads']} torch threads), "
                 f"torch {env['torch']}, triton {env['triton']}, "
                 f"{env['date']}; timing: {env['sync']}.")
    lines.append(f"Command: `{env['command']}`")
    lines.append("Data: synthetic random tensors (fixed seed); timing only.")
    if align:
        lines.append("Warm-up/timed steps per row as run: rows with eigen_every=P use warm-up ≥ P and a multiple of "
                     "P timed steps (every layer refreshes the same number of times in the window).")
    else:
        lines.append("Period alignment off: every row runs exactly the warm-up/timed steps shown; rows whose "
                     "eigen_every exceeds the steps run have no refresh in the window (see 'refreshes').")
    bad = [f"{r['model']}/{r['config']}" for r in rows if not r["finite"]]
    if bad:
        lines.append(f"WARNING: non-finite loss or skipped steps (timed a different code path): {', '.join(bad)}")
    lines.append("")
    for m, d in descs.items():
        lines.append(f"- `{m}`: {d}")
    lines.append("")
    head = ["model", "config", "warm+timed", "refreshes", "mean ms", "median ms", "p20 ms", "p80 ms", "worst ms",
            "mean/SGD", "worst/median", "mean/no-refresh", "state MB", "peak MB", "peak/SGD", "goals"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * 13 + ["---"]) + "|")
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"], r["config"], f"{r['warmup']}+{r['steps']}",
            "–" if r["refreshes_in_window"] is None else str(r["refreshes_in_window"]),
            _f(r["mean_ms"], ".2f"), _f(r["median_ms"], ".2f"), _f(r["p20_ms"], ".2f"), _f(r["p80_ms"], ".2f"),
            _f(r["worst_ms"], ".2f"), _f(r["mean_over_sgd"], ".2f"), _f(r["worst_over_median"], ".2f"),
            _f(r["mean_over_no_refresh"], ".2f"), _f(r["state_mb"], ".2f"), _f(r["peak_mb"], ".1f"),
            _f(r["peak_over_sgd"], ".2f"), r["goals"] or ""]) + " |")
    lines.append("")
    lines.append(f"Goals: worst step ≤ {GOAL_WORST_OVER_MEDIAN}× median (meant for the default "
                 f"staggered schedule; all-at-once rows are the peers' schedule, shown for contrast); mean step at "
                 f"eigen_every=10 ≤ {GOAL_E10_OVER_NO_REFRESH:g}× our own mean with refresh disabled "
                 f"(`{NO_REFRESH}`: first basis only). 'refreshes' counts layer eigendecompositions started in the "
                 "timed window.")
    lines.append("Memory: 'state MB' = every tensor the optimizer and its preconditioner hold after the timed steps "
                 "(momentum buffers, factors, bases, scalings, MAC means; each storage once; the model's parameters, "
                 "gradients and buffers excluded). 'peak MB' = the model's parameters and buffers + the peak, over the "
                 "timed window, of the memory allocated since just before the optimizer was created (gradients, "
                 "activations, optimizer state, the step's temporaries; the data batches not counted): "
                 + ("CUDA caching-allocator counters during the timed steps." if env["device"].startswith("cuda") else
                    "an untimed second pass of the same steps under the torch memory profiler (tensor allocations; "
                    "BLAS/LAPACK-internal buffers not seen)."))
    lines += mac_claims(rows)
    if quick:
        lines.append("\n**SMOKE RUN: do not quote these numbers.**")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["model", "config", "optimizer", "warmup", "steps", "refreshes_in_window", "skipped_steps", "mean_ms", "median_ms",
              "p20_ms", "p80_ms", "worst_ms", "mean_over_sgd", "worst_over_median", "mean_over_no_refresh", "goals",
              "final_loss", "finite", "model_bytes", "state_bytes", "peak_bytes", "peak_over_sgd"]


def write_outputs(out: Path, stem: str, rows: list[dict[str, Any]], env: dict[str, Any], descs: dict[str, str],
                  table: str, meta: dict[str, Any]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
    paths["md"].write_text(table)
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    paths["json"].write_text(json.dumps(dict(environment=env, settings=meta, models=descs, results=rows), indent=1))
    return paths


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.step_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {MODELS} (default: all)")
    p.add_argument("--configs", default=None, help="comma list of configuration names (default: all; sgd and "
                   f"{NO_REFRESH} are always added, they are the ratios' denominators)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per configuration (default 20; quick 10)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 60; quick 10)")
    p.add_argument("--align", dest="align", action="store_true", default=None,
                   help="raise warm-up/timed steps of eigen_every=P rows to cover whole periods (default, except "
                   "with --quick; see the module docstring)")
    p.add_argument("--no-align", dest="align", action="store_false",
                   help="run exactly --warmup/--steps for every configuration")
    p.add_argument("--sync", choices=SYNC_SCOPES, default="device",
                   help="CUDA: torch.cuda.synchronize() (device, default) or current stream only around each step")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models, few steps (labelled as such)")
    p.add_argument("--size", choices=SIZES, default=None, help="model sizes (default: tiny with --quick, else "
                   "full: autoencoder 784-1000-500-250-30 batch 512, VGG11 batch 128, MLP 1024->4096 on 4096 "
                   "tokens; small = CPU-sized: VGG11 at 1/4 width, batch 32; MLP 256->1024, 256 tokens)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="CPU: skip the untimed memory-profiler pass (peak MB left empty); CUDA always measures")
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/step_time/<device>/)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice, "
                   "1 for --quick on CPU: avoids OpenMP oversubscription on a busy machine)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 10 if args.quick else 20  # quick: the eigen_every=10 rows refresh once per layer in the window
    if args.steps is None:
        args.steps = 10 if args.quick else 60
    if args.align is None:
        args.align = not args.quick
    if args.size is None:
        args.size = "tiny" if args.quick else "full"
    if args.warmup < 0 or args.steps < 1:
        p.error("--warmup must be >= 0 and --steps >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is None and args.quick and device.type == "cpu":
        args.threads = 1  # smoke run: OpenMP spin-waiting on a busy small machine slows tiny eigh ~100x
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}: choose from {MODELS}")

    max_period = 100
    bound = max(args.warmup, max_period) + max_period * math.ceil(args.steps / max_period) + 1
    cfgs = configurations(bound)
    if args.configs:
        wanted = {c.strip() for c in args.configs.split(",") if c.strip()} | {"sgd", NO_REFRESH}
        unknown = wanted - {c.name for c in cfgs}
        if unknown:
            raise SystemExit(f"unknown configurations {sorted(unknown)}: choose from {[c.name for c in cfgs]}")
        cfgs = [c for c in cfgs if c.name in wanted]

    sync = partial(synchronize, device, args.sync)
    env = environment(device, command_line("bench.step_time", argv),
                      sync=("perf_counter only (CPU)" if device.type != "cuda" else
                            "torch.cuda.synchronize() before/after each step" if args.sync == "device" else
                            "current-stream synchronize() before/after each step"))
    stem = "step_time_smoke" if args.quick else "step_time" if args.size == "full" else f"step_time_{args.size}"
    out = args.out or Path(__file__).resolve().parent / "results" / "step_time" / device_slug(device)
    if args.quick:
        print("SMOKE RUN (--quick): tiny models and few steps; the numbers are not a performance result.")
    print(f"device: {env['device_name']} ({device}); torch {env['torch']}; triton {env['triton']}; "
          "data: synthetic random tensors")

    rows, descs = [], {}
    jobs = [(m, c) for m in models for c in cfgs]
    outer = tqdm(total=len(jobs), desc="configurations", disable=not args.progress, unit="cfg")
    for m in models:
        work = make_workload(m, args.quick, device, size=args.size)
        descs[m] = work.description
        for c in cfgs:
            warmup, steps = plan_steps(c, args.warmup, args.steps, args.align)
            rows.append(run_config(work, c, warmup, steps, device, sync, args.progress, args.memory))
            outer.update(1)
        del work
        gc.collect()
    outer.close()

    add_ratios(rows)
    table = markdown(rows, env, descs, args.quick, args.align)
    meta = dict(models=models, configs=[c.name for c in cfgs], warmup=args.warmup, steps=args.steps,
                align=args.align, sync=args.sync, quick=args.quick, size=args.size, memory=args.memory,
                synthetic_data=True,
                goals=dict(worst_over_median_max=GOAL_WORST_OVER_MEDIAN,
                           e10_mean_over_no_refresh_max=GOAL_E10_OVER_NO_REFRESH))
    paths = write_outputs(out, stem, rows, env, descs, table, meta)
    print()
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return rows


if __name__ == "__main__":
    main()
