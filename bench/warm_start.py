"""How close warm-started bases stay to exact eigenbases, and what they cost.

Trains an MLP on real MNIST with EKFAC and, at every refresh, compares three bases per layer for
the current batch's Fisher block F (empirical, per-example gradients):

* ``exact``: eigenbasis of the current factors (a full eigh now),
* ``warm``: a chain of one-step subspace iterations (``ekfac_triton.eigen.subspace_iteration``)
  started from the first exact basis and advanced once per refresh, never re-eighed,
* ``stale``: the first exact basis, never refreshed.

The error of EKFAC in an orthonormal basis Q, with S the exact diagonal of F in it, is
``‖F − F̂‖² = ‖F‖² − ‖S‖²`` (F̂ is F's diagonal part in that basis), computed from per-example
factors without forming F: ``‖F‖² = 1/N² Σ_{n,m} (ĝ_n·ĝ_m)² (ā_n·ā_m)²``. Timings are of this
machine's CPU (the GPU figures come from the step-time benchmark on the device).

    python -m bench.warm_start [--steps 200 --refresh-every 10 --out bench/results/warm_start]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ekfac_triton import EKFAC
from ekfac_triton.data import load_mnist
from ekfac_triton.eigen import subspace_iteration


def ekfac_error(a: torch.Tensor, g: torch.Tensor, q_in: torch.Tensor, q_out: torch.Tensor) -> float:
    """Relative Frobenius error of EKFAC in basis (q_in, q_out) for one-position examples."""
    n = a.shape[0]
    fisher_sq = ((g @ g.T).square() * (a @ a.T).square()).sum() / n**2
    s = (g @ q_out).square().T @ (a @ q_in).square() / n
    return float(((fisher_sq - s.square().sum()).clamp_min(0) / fisher_sq).sqrt())


def time_of(fn, repeat: int = 5) -> float:
    """Median wall time of ``repeat`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--widths", default="784,256,128,10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/warm_start")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x_all, y_all = load_mnist("train")
    widths = [int(w) for w in args.widths.split(",")]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers).double()
    opt = EKFAC(model, lr=0.05, damping=1e-2, eigen_every=1, factor_decay=0.95, kl_clip=1e-2, stagger=False)
    curvs = [layer.curvature for layer in opt.preconditioner.layers]
    warm = stale = None
    rows = []
    for step in range(args.steps):
        idx = torch.randint(0, x_all.shape[0], (args.batch_size,))
        x, y = x_all[idx].double(), y_all[idx]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        # this batch's per-example ā and ĝ, as the optimizer captured them
        batches = [layer.adapter.batch(layer.capture.inputs, layer.capture.grad_output)
                   for layer in opt.preconditioner.layers]
        opt.step()  # refreshes the exact bases every step (eigen_every=1)
        if step == 0:
            warm = [(c.q_in.clone(), c.q_out.clone()) for c in curvs]
            stale = [(c.q_in.clone(), c.q_out.clone()) for c in curvs]
        if step % args.refresh_every or step == 0:
            continue
        warm = [(subspace_iteration(c.in_factor, w[0])[0].vectors, subspace_iteration(c.out_factor, w[1])[0].vectors)
                for c, w in zip(curvs, warm)]
        for li, (c, layer) in enumerate(zip(curvs, opt.preconditioner.layers)):
            a = batches[li].a[:, 0]
            cap_a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
            g = batches[li].g[:, 0]
            rows.append({"step": step, "layer": layer.name,
                         "exact": ekfac_error(cap_a, g, c.q_in, c.q_out),
                         "warm": ekfac_error(cap_a, g, *warm[li]),
                         "stale": ekfac_error(cap_a, g, *stale[li])})
    timings = []
    for c, layer in zip(curvs, opt.preconditioner.layers):
        for name, f in (("in", c.in_factor), ("out", c.out_factor)):
            f32 = f.float()
            q = torch.linalg.eigh(f32).eigenvectors
            timings.append({"layer": layer.name, "factor": name, "n": f.shape[0],
                            "eigh_ms": 1e3 * time_of(lambda: torch.linalg.eigh(f32)),
                            "subspace_ms": 1e3 * time_of(lambda: subspace_iteration(f32, q))})
    summary = summarise(rows, timings, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "warm_start.json").write_text(json.dumps({"args": vars(args), "rows": rows, "timings": timings}, indent=1))
    (out / "warm_start.md").write_text(summary)
    print(summary)
    return {"rows": rows, "timings": timings}


def summarise(rows: list[dict], timings: list[dict], args) -> str:
    lines = [f"EKFAC relative Frobenius error ‖F − F̂‖/‖F‖ on the current batch, MLP {args.widths}, real MNIST, "
             f"batch {args.batch_size}, a warm step every {args.refresh_every} steps, {args.steps} steps",
             "", "| layer | exact basis (eigh now) | warm (subspace iteration chain) | stale (first basis) |",
             "|---|---|---|---|"]
    for name in dict.fromkeys(r["layer"] for r in rows):
        sel = [r for r in rows if r["layer"] == name]
        mean = {k: sum(r[k] for r in sel) / len(sel) for k in ("exact", "warm", "stale")}
        lines.append(f"| {name} | {mean['exact']:.4f} | {mean['warm']:.4f} | {mean['stale']:.4f} |")
    lines += ["", f"Cost on this machine's CPU ({torch.get_num_threads()} threads), float32, median of 5:", "",
              "| layer | factor | n | eigh ms | subspace iteration ms | ratio |", "|---|---|---|---|---|---|"]
    for t in timings:
        lines.append(f"| {t['layer']} | {t['factor']} | {t['n']} | {t['eigh_ms']:.2f} | {t['subspace_ms']:.2f} | "
                     f"{t['eigh_ms'] / t['subspace_ms']:.1f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
