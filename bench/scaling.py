"""Scaling sweep: how our step's cost grows with the batch N and the width d, against SGD and a
peer, on a block of two ``nn.Linear(d, d)`` layers (tanh between, MSE to random targets, inputs
``(N, d)``): ``python -m bench.scaling``.

For each (N, d) the optimizers take turns on their own copies of the block (the round robin of
:func:`bench.peers.step_times`); the table gives each one's mean step over SGD's, the flop model's
ratio for EKFAC (:func:`bench.cost_model.floors` of the two layers over their forward + backward
floor) and the two ways of forming the projected gradient ``P = Q_outᵀ ∇W̄ Q_in`` per layer:

* directly: ``2·d_out·d̄_in·(d̄_in + d_out)`` flops (today's form);
* from the per-example projections the scalings already computed, ``P = (ĜQ_out)ᵀ(ĀQ_in)``:
  ``2·N·d_out·d̄_in`` flops, on statistics steps.

The per-example form is cheaper while ``N < d̄_in + d_out`` (about 2d here): the crossover N* is
in the table and the plot. Results: ``bench/results/scaling/cpu/`` (``scaling.md``,
``scaling.json``, ``scaling.png``).

    python -m bench.scaling --threads 1                       # N in 32,128,512,2048; d in 256,1024
    python -m bench.scaling --batches 32,128 --widths 64 --quick
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cost_model import LayerDims, floors
from .environment import command_line, environment
from .memory import tensor_bytes
from .peers import step_configs, step_times
from .runner import require_extras, torch_threads
from .step_time import Workload

__all__ = ["block_workload", "crossover", "main", "projection_flops"]

#: SGD (the reference), ours, the cheapest peer of bench.peers' step-time table (Muon) and the cheapest
#: curvature-based one (SINGD)
DEFAULT_OPTIMIZERS = ("sgd", "ekfac", "muon", "singd")


def block_workload(n: int, d: int, n_batches: int = 2) -> Workload:
    """Two ``nn.Linear(d, d)`` with tanh between, seeded, and ``n_batches`` batches of (N, d)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
    batches = [(torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)) for _ in range(n_batches)]
    desc = f"Linear({d},{d}) -> tanh -> Linear({d},{d}), batch ({n}, {d}), MSE; {tensor_bytes(model.parameters()) / 2**20:.2f} MB"
    return Workload(f"block-N{n}-d{d}", model, batches, nn.functional.mse_loss, desc)


def projection_flops(n: int, d_out: int, d_in_bar: int) -> tuple[float, float]:
    """(direct, from per-example projections) flops of one layer's projected gradient."""
    return 2.0 * d_out * d_in_bar * (d_in_bar + d_out), 2.0 * n * d_out * d_in_bar


def crossover(d_out: int, d_in_bar: int) -> int:
    """The batch at which both forms of the projected gradient cost the same: ``d̄_in + d_out``."""
    return d_in_bar + d_out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="32,128,512,2048", help="comma list of N")
    p.add_argument("--widths", default="256,1024", help="comma list of d")
    p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                   help="comma list from bench.peers.OPTIMIZERS (sgd first: the reference)")
    p.add_argument("--warmup", type=int, default=5, help="steps per optimizer before the timed turn")
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="few steps: a smoke run, not a result")
    p.add_argument("--out", type=Path, default=None, help="default bench/results/scaling/cpu[-quick]")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    try:
        a.batches = [int(x) for x in a.batches.split(",") if x]
        a.widths = [int(x) for x in a.widths.split(",") if x]
    except ValueError as e:
        p.error(f"--batches / --widths take comma-separated integers: {e}")
    a.optimizers = [o for o in a.optimizers.split(",") if o]
    if "sgd" not in a.optimizers:
        p.error("--optimizers must include sgd (the reference of every ratio)")
    if a.quick:
        a.warmup, a.block, a.rounds = 2, 2, 1
    return a


def _plot(path: Path, rows: list[dict[str, Any]], widths: Sequence[int], optimizers: Sequence[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(widths), figsize=(5.5 * len(widths), 4.2), squeeze=False)
    for ax, d in zip(axes[0], widths):
        cells = [r for r in rows if r["d"] == d]
        ns = sorted({r["N"] for r in cells})
        for opt in optimizers:
            if opt == "sgd":
                continue
            ys = [next((r["mean_over_sgd"][opt] for r in cells if r["N"] == n), None) for n in ns]
            ax.plot(ns, ys, marker="o", label=opt)
        ax.plot(ns, [next(r["model_ekfac_over_sgd"] for r in cells if r["N"] == n) for n in ns], "k--",
                label="EKFAC flop model")
        ax.axvline(crossover(d, d + 1), color="grey", linestyle=":", label=f"N* = {crossover(d, d + 1)}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch N")
        ax.set_ylabel("mean step / SGD's")
        ax.set_title(f"d = {d}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    require_extras("bench.scaling")
    out = args.out or Path(__file__).resolve().parent / "results" / "scaling" / ("cpu-quick" if args.quick else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    cfgs = [c for c in step_configs() if c.kind in args.optimizers]
    rows: list[dict[str, Any]] = []
    with torch_threads(args.threads):
        env = environment("cpu", command_line("bench.scaling", argv))
        for d in args.widths:
            for n in args.batches:
                work = block_workload(n, d)
                timed = step_times(work, cfgs, args.warmup, args.block, args.rounds, False, args.progress)
                layers = [LayerDims(f"{i}", d, d, True, n, 1) for i in range(2)]
                fl = floors(layers, eigen_every=10)
                fb = fl["forward+backward"]["flops"]
                ekfac_flops = sum(v["flops"] for v in fl.values())
                direct, per_example = projection_flops(n, d, d + 1)
                rows.append(dict(N=n, d=d, mean_ms={r["optimizer"]: r["mean_ms"] for r in timed},
                                 mean_over_sgd={r["optimizer"]: r["mean_over_sgd"] for r in timed},
                                 model_ekfac_over_sgd=ekfac_flops / fb,
                                 projection_direct_gflop=direct / 1e9, projection_per_example_gflop=per_example / 1e9,
                                 crossover_N=crossover(d, d + 1),
                                 cheaper_form="per-example" if per_example < direct else "direct"))
    lines = [f"Scaling sweep, {env['device_name']} ({env['threads']} torch threads, {env['cpus']} CPUs, load "
             f"{env['load_average']}), torch {env['torch']}, {env['date']}.", f"Command: `{env['command']}`",
             f"Per cell: {args.warmup} warm-up steps, then {args.rounds} turn(s) of {args.block} timed steps per "
             "optimizer (round robin); mean step over SGD's mean in the same cell. EKFAC / K-FAC refresh every 10 "
             "steps (staggered); peers as in bench.peers. 'EKFAC flop model': the cost model's floors of the "
             "two layers (forward + backward, factors, scalings, projections, eigh / 10) over the forward + "
             "backward floor. Projected gradient per layer: direct 2·d_out·d̄_in·(d̄_in+d_out) vs from the "
             "per-example projections 2·N·d_out·d̄_in flops.", ""]
    opts = [c.kind for c in cfgs]
    lines.append("| d | N | SGD ms | " + " | ".join(f"{o}/SGD" for o in opts if o != "sgd")
                 + " | EKFAC flop model / SGD | P direct GFLOP | P per-example GFLOP | cheaper | N* |")
    lines.append("|" + "---:|" * (3 + len(opts) - 1 + 3) + "---|---:|")
    for r in rows:
        lines.append(f"| {r['d']} | {r['N']} | {r['mean_ms']['sgd']:.2f} | "
                     + " | ".join(f"{r['mean_over_sgd'][o]:.2f}" for o in opts if o != "sgd")
                     + f" | {r['model_ekfac_over_sgd']:.2f} | {r['projection_direct_gflop']:.4f} | "
                     f"{r['projection_per_example_gflop']:.4f} | {r['cheaper_form']} | {r['crossover_N']} |")
    table = "\n".join(lines) + "\n"
    if args.quick:
        table = "**SMOKE RUN (`--quick`): not a performance result.**\n\n" + table
    print(table)
    (out / "scaling.md").write_text(table)
    (out / "scaling.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1, default=str))
    _plot(out / "scaling.png", rows, args.widths, opts)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
