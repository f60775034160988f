"""Training-step time and launches per step, eager vs ``torch.compile`` (vs ``reduce-overhead``
CUDA graphs on CUDA), for SGD and EKFAC on the autoencoder and the MLP stack of ``bench.step_time``.

    python -m bench.compile_step                    # cuda if available, full sizes
    python -m bench.compile_step --quick --threads 1   # CPU smoke run (tiny sizes; not a result)
    python -m bench.compile_step --models mlp-stack --steps 60 --out bench/results/compile/h100

Modes: ``eager``; ``compiled``: the *model* (``torch.compile(model)``: forward and backward,
with EKFAC's capture traced into the graph, no graph break), the step eager; ``compiled+step``:
also the step (EKFAC: ``compile_step=True``, :mod:`ekfac_triton.step.execution`; SGD:
``torch.compile(opt.step)``); ``reduce-overhead`` (CUDA only): both with
``mode="reduce-overhead"`` (CUDA graphs; EKFAC's capture op is tagged ``cudagraph_unsafe``, so
inductor graphs around it; EKFAC's ordinary steps are graphed, refresh steps run eagerly).

Columns: step = zero_grad + forward + backward + optimizer step, wall time per step (median with
p20/p80 over the timed steps, each step bracketed by ``torch.cuda.synchronize()`` on CUDA:
:func:`bench.runner.synchronize` with ``scope="device"``, so each step is charged all it launched);
``launches/step`` = device kernels per step from ``torch.profiler`` (CUDA), or on CPU the number
of outermost ATen operator calls in the profile (there are no kernel launches on CPU, so
the CPU column counts dispatched ops, a proxy for the same overhead). ``opt.step`` = the
optimizer step alone (median); ``x SGD`` = the step median over SGD's in the same mode and run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from torch.profiler import ProfilerActivity, profile

from ekfac_triton import EKFAC

from .environment import command_line, environment
from .optimizers import make_optimizer
from .runner import synchronize
from .step_time import make_workload, summarize

MODELS = ("autoencoder", "mlp-stack")
OPTIMIZERS = ("sgd", "ekfac")


def modes(device: torch.device) -> list[str]:
    return ["eager", "compiled", "compiled+step"] + (["reduce-overhead"] if device.type == "cuda" else [])


def hparams(name: str, eigen_every: int, mode: str) -> dict[str, Any]:
    """The settings of ``name`` (for :func:`bench.optimizers.make_optimizer`) in ``mode``: EKFAC
    compiles its own step (``compile_step``) in the modes that compile the step."""
    if name == "sgd":
        return dict(lr=1e-3, momentum=0.9)
    compile_step = {"compiled+step": True, "reduce-overhead": {"mode": "reduce-overhead"}}.get(mode, False)
    return dict(lr=1e-3, damping=1e-3, eigen_every=eigen_every, compile_step=compile_step)


def optimizer_step(opt: torch.optim.Optimizer, mode: str):
    """The step as the mode runs it (EKFAC compiles its own step through ``compile_step``)."""
    if isinstance(opt, EKFAC) or mode in ("eager", "compiled"):
        return opt.step
    return torch.compile(opt.step, mode="reduce-overhead" if mode == "reduce-overhead" else "default")


def count_launches(prof: profile, device: torch.device) -> int:
    if device.type == "cuda":
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    # CPU: outermost ATen calls (no ATen op above them), i.e. what Python/autograd dispatched
    def outermost(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and outermost(e))


def run(model_name: str, opt_name: str, mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    work = make_workload(model_name, args.quick, device)
    model = work.model
    opt = make_optimizer(opt_name, model, hparams(opt_name, args.eigen_every, mode))
    step = optimizer_step(opt, mode)
    run_model = model if mode == "eager" else torch.compile(model, mode="reduce-overhead" if mode == "reduce-overhead"
                                                            else "default")

    def sync() -> None:
        synchronize(device, "device")

    nb = len(work.batches)
    step_ms: list[float] = []
    opt_ms: list[float] = []

    def one_step(i: int, timed: bool) -> None:
        x, y = work.batches[i % nb]
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = work.loss_fn(run_model(x), y)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        step()
        sync()
        t2 = time.perf_counter()
        if timed:
            step_ms.append((t2 - t0) * 1e3)
            opt_ms.append((t2 - t1) * 1e3)

    compile_t0 = time.perf_counter()
    for i in range(args.warmup):
        one_step(i, timed=False)
    warmup_s = time.perf_counter() - compile_t0
    for i in range(args.steps):
        one_step(args.warmup + i, timed=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(args.profile_steps):
            one_step(args.warmup + args.steps + i, timed=False)
    launches = count_launches(prof, device) / args.profile_steps
    s = summarize(step_ms)
    return dict(model=model_name, optimizer=opt_name, mode=mode, **s, opt_step_median_ms=statistics.median(opt_ms),
                launches_per_step=launches, warmup_s=warmup_s, steps=args.steps,
                recompiles=torch._dynamo.utils.counters["stats"].get("unique_graphs", 0))


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], quick: bool) -> str:
    unit = "kernels/step" if env["device"].startswith("cuda") else "ATen ops/step (CPU)"
    lines = [f"# Eager vs compiled training step ({env['device_name']}, torch {env['torch']})", ""]
    if quick:
        lines += ["**--quick: tiny sizes on this machine, a smoke run, not a result.**", ""]
    lines += [f"| model | optimizer | mode | step median ms (p20, p80) | x SGD | opt.step median ms | {unit} | "
              "graphs compiled | warm-up s |", "|---|---|---|---|---|---|---|---|---|"]
    sgd = {(r["model"], r["mode"]): r["median_ms"] for r in rows if r["optimizer"] == "sgd"}
    for r in rows:
        base = sgd.get((r["model"], r["mode"]))
        ratio = f"{r['median_ms'] / base:.2f}" if base else "-"
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['mode']} | {r['median_ms']:.2f} ({r['p20_ms']:.2f}, "
                     f"{r['p80_ms']:.2f}) | {ratio} | {r['opt_step_median_ms']:.2f} | {r['launches_per_step']:.0f} | "
                     f"{r['recompiles']} | {r['warmup_s']:.1f} |")
    lines += ["", f"Command: `{env['command']}`; threads {env['threads']}; git {env['git_commit']}."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps (CPU smoke run)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (compilation happens here)")
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--eigen-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (1 on a busy small CPU: OpenMP spin-waits slow a small eigh ~100x)")
    p.add_argument("--out", type=Path, default=None, help="folder for table.md and rows.json")
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 20)
    args.steps = args.steps if args.steps is not None else (5 if args.quick else 60)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = [run(m, o, mode, args, device) for m in args.models for o in args.optimizers for mode in modes(device)]
    env = environment(device, command_line("bench.compile_step", sys.argv[1:] if argv is None else argv),
                      sync="torch.cuda.synchronize() before/after each step" if device.type == "cuda"
                      else "perf_counter only (CPU)")
    table = markdown(rows, env, args.quick)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(table + "\n")
        (args.out / "rows.json").write_text(json.dumps(dict(env=env, rows=rows), indent=2))
    return rows


if __name__ == "__main__":
    main()
