"""PINN demo and benchmark: error vs wall-clock of KFAC*, KFAC, Adam and SGD.

``python -m bench.pinn_poisson`` runs the paper's 2-D Poisson problem (Dangel, Müller & Zeinhofer
2024, §4): −Δu = f on the unit square with u* = sin(πx)sin(πy), a tanh MLP 2→64→1 (D = 257),
N_Ω = 900 interior and N_∂ = 120 boundary points drawn once, float64; the error is the RMS of
u − u* on 9,000 held-out interior points. ``--problem heat`` runs the (4+1)-D heat equation
∂_t u = ¼Δu with u* = exp(−π²t) Π sin(πx_i) at a CPU size (tanh MLP 5→64→64→48→48→1,
D = 10,065, N_Ω = 1,000, N_∂ = 200; the paper's run is 5→256→256→128→128→1, D = 116,864).

Every optimizer starts from the same weights and sees the same points for the same wall-clock
budget; the clock counts the optimizer steps only (the evaluations are excluded). Hyperparameters:
the authors' best runs for D = 257 (their sweeps, 1000 s on an RTX 6000); the heat problem reuses
them untuned. Results in ``--out``: ``<problem>_error.png`` (RMS error and loss vs time),
``<problem>_table.md`` and ``<problem>_log.json``.

Examples::

    python -m bench.pinn_poisson                                  # 200 s per optimizer
    python -m bench.pinn_poisson --budget-seconds 60 --optimizers kfac_star,adam
    python -m bench.pinn_poisson --problem heat --budget-seconds 60
    python -m bench.pinn_poisson --quick                          # a few-second smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ekfac_triton.pinn import KFAC, ForwardLaplacian, KFACStar, Problem, heat_sin_product, poisson_sin_product

from .environment import command_line, environment

DTYPE = torch.float64
OPTIMIZERS = ("kfac_star", "kfac", "adam", "sgd")
LABELS = {"kfac_star": "KFAC*", "kfac": "KFAC", "adam": "Adam", "sgd": "SGD"}
# The authors' best runs on the D = 257 Poisson problem (exp09 sweeps, rounded).
HPARAMS: dict[str, dict[str, Any]] = {
    "kfac_star": dict(damping=1.2156e-10, factor_decay=0.9263, init_identity=True),
    "kfac": dict(damping=1.5441e-12, factor_decay=0.4496, momentum=0.5118, init_identity=True),
    "adam": dict(lr=1.6923e-3),
    "sgd": dict(lr=1.8050e-2, momentum=0.99),
}
# The paper's RMS errors after 1000 s on an RTX 6000 (its best runs; the heat rows: D = 116,864, 3000 s)
PAPER = {"poisson": {"kfac_star": 2.0e-7, "kfac": 3.4e-7, "adam": 9.4e-5, "sgd": 3.6e-5},
         "heat": {"kfac_star": 2.1e-5, "kfac": 1.3e-5, "adam": 7.5e-4}}


@dataclass(frozen=True)
class Setup:
    widths: tuple[int, ...]
    n_interior: int
    n_boundary: int
    n_eval: int


SETUPS = {"poisson": Setup((64,), 900, 120, 9000), "heat": Setup((64, 64, 48, 48), 1000, 200, 10000)}
QUICK = {"poisson": Setup((16,), 100, 20, 500), "heat": Setup((16, 12), 100, 20, 500)}


def make_problem(name: str) -> Problem:
    return poisson_sin_product(2) if name == "poisson" else heat_sin_product(4)


def make_model(in_features: int, widths: Sequence[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    sizes = [in_features, *widths, 1]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(DTYPE)


@dataclass
class Data:
    interior: Tensor
    f: Tensor
    boundary: Tensor
    g: Tensor
    eval_points: Tensor
    eval_u: Tensor


def make_data(problem: Problem, setup: Setup, seed: int) -> Data:
    gen = torch.Generator().manual_seed(seed)
    xi = problem.sample_interior(setup.n_interior, gen, DTYPE)
    xb = problem.sample_boundary(setup.n_boundary, gen, DTYPE)
    xe = problem.sample_interior(setup.n_eval, gen, DTYPE)
    return Data(xi, problem.source(xi), xb, problem.boundary_value(xb), xe, problem.solution(xe))


class FirstOrder:
    """Adam or SGD on the same PINN loss (autograd through the forward Laplacian)."""

    def __init__(self, name: str, model: nn.Sequential, problem: Problem, hparams: dict[str, Any]) -> None:
        self.model, self.equation = model, problem.equation
        self.net = ForwardLaplacian(model, problem.equation.laplacian_weights)
        cls = torch.optim.Adam if name == "adam" else torch.optim.SGD
        self.opt = cls(model.parameters(), **hparams)

    def step(self, xi: Tensor, f: Tensor, xb: Tensor, g: Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        r = self.equation.interior_residual(self.net(xi), f)
        rb = self.equation.boundary_residual(self.net(xb, derivatives=False).u, g)
        loss = r.square().mean() / 2 + rb.square().mean() / 2
        loss.backward()
        self.opt.step()
        return float(loss.detach())


@dataclass
class Run:
    name: str
    hparams: dict[str, Any]
    steps: int = 0
    train_seconds: float = 0.0
    status: str = "ok"
    history: list[dict[str, float]] = field(default_factory=list)  # time, step, loss, error

    def error_at(self, seconds: float) -> float:
        """The RMS error of the last evaluation at or before ``seconds`` of training."""
        before = [h["error"] for h in self.history if h["time"] <= seconds + 1e-9]
        return before[-1] if before else float("nan")


@torch.no_grad()
def rms_error(model: nn.Sequential, data: Data) -> float:
    return float((model(data.eval_points).squeeze(-1) - data.eval_u).square().mean().sqrt())


def train_one(name: str, problem: Problem, setup: Setup, data: Data, budget: float, max_steps: int | None,
              seed: int, progress: bool) -> Run:
    model = make_model(problem.equation.in_features, setup.widths, seed)
    hparams = HPARAMS[name]
    if name == "kfac_star":
        opt: Any = KFACStar(model, problem.equation, **hparams)
    elif name == "kfac":
        opt = KFAC(model, problem.equation, **hparams)
    else:
        opt = FirstOrder(name, model, problem, hparams)
    run = Run(name, hparams)
    args = (data.interior, data.f, data.boundary, data.g)
    loss = float("nan")
    next_eval = 0.0
    while True:
        if run.train_seconds >= next_eval or run.steps == 0:
            err = rms_error(model, data)
            run.history.append(dict(time=run.train_seconds, step=run.steps, loss=loss, error=err))
            next_eval = max(1.1 * run.train_seconds, run.train_seconds + 0.02)
            if progress and len(run.history) % 10 == 0:
                print(f"  {LABELS[name]:6s} {run.train_seconds:7.1f}s step {run.steps:6d} loss {loss:.3e} "
                      f"error {err:.3e}", flush=True)
            if not math.isfinite(err):
                run.status = "diverged"
                break
        if run.train_seconds >= budget or (max_steps is not None and run.steps >= max_steps):
            break
        start = time.perf_counter()
        out = opt.step(*args)
        run.train_seconds += time.perf_counter() - start
        loss = out if isinstance(out, float) else out.loss
        run.steps += 1
    if run.history[-1]["step"] != run.steps:
        run.history.append(dict(time=run.train_seconds, step=run.steps, loss=loss, error=rms_error(model, data)))
    return run


def format_hparams(hparams: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in hparams.items())


def markdown_table(problem: str, runs: Sequence[Run], budget: float, smoke: bool) -> str:
    marks = [budget / 4, budget / 2, budget]
    head = " | ".join(f"error @ {m:.3g} s" for m in marks)
    lines = [f"| optimizer | hyperparameters | steps | ms/step | {head} | paper (1000 s, RTX 6000) |",
             "|---|---|---|---|" + "---|" * len(marks) + "---|"]
    for r in runs:
        ms = 1e3 * r.train_seconds / max(r.steps, 1)
        errs = " | ".join(f"{r.error_at(m):.2e}" for m in marks)
        paper = PAPER.get(problem, {}).get(r.name)
        note = "" if problem == "poisson" else " (D = 116,864, 3000 s)"
        lines.append(f"| {LABELS[r.name]} | {format_hparams(r.hparams)} | {r.steps} | {ms:.1f} | {errs} | "
                     f"{'—' if paper is None else f'{paper:.1e}{note}'} |")
    title = ("SMOKE RUN (tiny sizes, never quote). " if smoke else "") + \
        f"RMS error of u − u* on held-out points at equal training wall-clock ({problem})"
    return f"{title}\n\n" + "\n".join(lines) + "\n"


def plot(runs: Sequence[Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in runs:
        t = [max(h["time"], 1e-3) for h in r.history]
        axes[0].loglog(t, [h["error"] for h in r.history], label=LABELS[r.name])
        axes[1].loglog(t[1:], [h["loss"] for h in r.history][1:], label=LABELS[r.name])
    axes[0].set_ylabel("RMS error of u − u*")
    axes[1].set_ylabel("training loss")
    for ax in axes:
        ax.set_xlabel("training wall-clock (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.pinn_poisson", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", choices=sorted(SETUPS), default="poisson")
    p.add_argument("--budget-seconds", type=float, default=200.0, help="training wall-clock per optimizer")
    p.add_argument("--steps", type=int, default=None, help="cap on the steps per optimizer")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma list of {OPTIMIZERS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared CPU multi-threaded small ops can be 20x slower)")
    p.add_argument("--out", type=Path, default=Path("bench/results/pinn"))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 s and at most 5 steps each")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        p.error(f"--optimizers: unknown {bad}; choose from {OPTIMIZERS}")
    args.names = names
    if args.quick:
        args.budget_seconds = min(args.budget_seconds, 1.0)
        args.steps = 5 if args.steps is None else args.steps
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        setup = (QUICK if args.quick else SETUPS)[args.problem]
        problem = make_problem(args.problem)
        data = make_data(problem, setup, args.seed)
        env = environment("cpu", command_line("bench.pinn_poisson", argv))
        runs = []
        for name in args.names:
            if not args.no_progress:
                print(f"{LABELS[name]}: {args.budget_seconds:g} s", flush=True)
            runs.append(train_one(name, problem, setup, data, args.budget_seconds, args.steps, args.seed,
                                  not args.no_progress))
        env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    finally:
        torch.set_num_threads(threads)
    table = markdown_table(args.problem, runs, args.budget_seconds, args.quick)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.problem + ("_smoke" if args.quick else "")
    (args.out / f"{stem}_table.md").write_text(table)
    d = sum(p.numel() for p in make_model(problem.equation.in_features, setup.widths, 0).parameters())
    plot(runs, args.out / f"{stem}_error.png",
         f"{problem.name}, D = {d}, N_Ω = {setup.n_interior}, N_∂ = {setup.n_boundary}, float64, "
         f"{env['threads']} thread(s)" + (" — SMOKE RUN" if args.quick else ""))
    log = dict(problem=args.problem, setup=asdict(setup), parameters=d, budget_seconds=args.budget_seconds,
               seed=args.seed, smoke=args.quick, environment=env, paper=PAPER.get(args.problem),
               runs=[asdict(r) for r in runs])
    (args.out / f"{stem}_log.json").write_text(json.dumps(log, indent=1))
    return 0 if all(r.status == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
