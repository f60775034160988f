"""Overhead of the distributed code path at world size 1 vs the plain path.

One process, a gloo group of size 1: the same model and batches are trained with
``process_group=None`` (no collective at all) and ``process_group=WORLD`` (the agreement
all_reduce every step, the factor and scaling all_reduces and the basis broadcasts on
statistics/refresh steps, all of size one). Steps are timed interleaved (plain, distributed,
plain, ...) and reported as median (p20, p80) in milliseconds.

    python -m bench.ddp_overhead [--steps 60 --batch 256 --widths 784,512,256,10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

from ekfac_triton import EKFAC


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=10)
    return statistics.median(xs), q[1], q[7]  # median, p20, p80


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--widths", default="784,512,256,10")
    parser.add_argument("--eigen-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        runs = {}
        for name, group in (("plain", None), ("distributed", dist.group.WORLD)):
            torch.manual_seed(0)
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
            model = nn.Sequential(*layers)
            opt = EKFAC(model, lr=0.01, damping=1e-2, eigen_every=args.eigen_every, process_group=group)
            runs[name] = (model, opt, [])
        gen = torch.Generator().manual_seed(1)
        for step in range(args.steps + 5):
            x = torch.randn(args.batch, widths[0], generator=gen)
            y = torch.randn(args.batch, widths[-1], generator=gen)
            for model, opt, times in runs.values():
                start = time.perf_counter()
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                if step >= 5:  # warm-up
                    times.append((time.perf_counter() - start) * 1e3)
        dist.destroy_process_group()

    print(f"torch {torch.__version__}, CPU ({torch.get_num_threads()} threads), widths {widths}, "
          f"batch {args.batch}, eigen_every {args.eigen_every}, {args.steps} steps each")
    base = quantiles(runs["plain"][2])[0]
    for name, (_, opt, times) in runs.items():
        med, p20, p80 = quantiles(times)
        print(f"{name:12s} step {med:8.2f} ms (p20 {p20:.2f}, p80 {p80:.2f}, min {min(times):.2f})  "
              f"x{med / base:.3f} of plain  decompositions {opt.preconditioner.eigen.decompositions}")


if __name__ == "__main__":
    main()
