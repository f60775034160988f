"""MAC with attention preconditioning on a small GPT-style byte-level LM.

Compares, on the same model, data order and number of steps: MAC with its attention
preconditioning (each block's fused q/k/v ``nn.Linear`` named in ``attention_layers``, causal:
value rows use R_v), plain MAC (the same layers, R on every row), AdamW and SGD with momentum.
The corpus is the running Python's standard-library source (``bench.experiments.stdlib_corpus``);
the model is ``bench.experiments.ByteLM`` with a fused ``qkv`` projection per block (columns
[q | k | v], heads contiguous), the layout timm's ViT and GPT-2 use. Hyperparameters are untuned
starting points: MAC's GPT recipe (ρ = 1, statistics and refresh every 5 steps, β = 0.95,
decoupled weight decay) at lr 0.1, AdamW at 3e-3, SGD at 0.1; all with the same weight decay 0.01
(decoupled for MAC and AdamW).

    python -m bench.mac_attention --threads 1 --out bench/results/mac_attention/cpu
    python -m bench.mac_attention --quick --out /tmp/mac-attention   # the smoke test

Writes ``log.json`` (per-optimizer loss curves, step times, settings, environment) and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .environment import command_line, environment
from .experiments import ByteLM, stdlib_corpus
from .optimizers import make_optimizer

OPTIMIZERS = ("mac-attention", "mac", "adamw", "sgd")


class FusedAttention(nn.Module):
    """Causal self-attention with one fused q/k/v ``nn.Linear`` and an output ``nn.Linear``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class ByteGPT(ByteLM):
    """A small GPT over bytes: :class:`bench.experiments.ByteLM` with :class:`FusedAttention` blocks."""

    def __init__(self, d: int, layers: int, heads: int, context: int) -> None:
        super().__init__(d, layers, heads, context, attention=FusedAttention)


def settings(name: str, model: ByteGPT, heads: int) -> tuple[str, dict[str, Any]]:
    """The kind and hyperparameters of benchmark optimizer ``name`` (one of :data:`OPTIMIZERS`) for
    :func:`bench.optimizers.make_optimizer`; ``mac-attention`` names every block's ``attn.qkv``."""
    mac = dict(lr=0.1, damping=1.0, momentum=0.9, weight_decay=0.01, factor_decay=0.95, factor_every=5,
               eigen_every=5, decoupled_weight_decay=True)
    if name == "mac-attention":
        qkv = {f"blocks.{i}.attn.qkv": {"num_heads": heads, "causal": True} for i in range(len(model.blocks))}
        return "mac", dict(mac, attention_layers=qkv)
    if name == "mac":
        return "mac", mac
    if name == "adamw":
        return "adamw", dict(lr=3e-3, weight_decay=0.01)
    if name == "sgd":
        return "sgd", dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    raise ValueError(f"Invalid optimizer={name!r}: must be one of {OPTIMIZERS}")


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.quick:
        d, layers, heads, context, batch, steps, max_bytes, every = 32, 1, 2, 16, 4, 6, 200_000, 3
    else:
        d, layers, heads, context, batch, steps, max_bytes, every = (args.d, args.layers, args.heads, args.context,
                                                                     args.batch, args.steps, 8_000_000, 25)
    text, n_files = stdlib_corpus(max_bytes)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    split = int(0.95 * data.numel())
    train, test = data[:split], data[split:]
    offsets = torch.arange(context + 1)

    def windows(source: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        w = source[starts[:, None] + offsets].long()
        return w[:, :-1], w[:, 1:]

    g = torch.Generator().manual_seed(4321)
    n_eval = 8 if args.quick else 64
    eval_test = windows(test, torch.randint(0, test.numel() - context - 1, (n_eval,), generator=g))
    train_starts = torch.randint(0, train.numel() - context - 1, (steps, batch), generator=g)

    def loss_of(model: nn.Module, xy: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(xy[0]).flatten(0, 1), xy[1].flatten())

    results = {}
    for name in args.optimizers:
        torch.manual_seed(0)
        model = ByteGPT(d, layers, heads, context)
        kind, hparams = settings(name, model, heads)
        opt = make_optimizer(kind, model, hparams)
        curve, times = [], []
        for step in range(steps):
            xy = windows(train, train_starts[step])
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model, xy)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
            if step % every == 0 or step == steps - 1:
                curve.append((step, float(loss.detach())))
        model.eval()
        with torch.no_grad():
            test_bpb = float(loss_of(model, eval_test)) / math.log(2)
        tail = [loss for _, loss in curve[-4:]]
        results[name] = dict(curve=curve, final_train_loss=statistics.mean(tail), test_bits_per_byte=test_bpb,
                             step_ms_median=1e3 * statistics.median(times), total_s=sum(times))
        print(f"{name:>14}: train loss {results[name]['final_train_loss']:.3f} nats/byte, test {test_bpb:.3f} "
              f"bits/byte, median step {results[name]['step_ms_median']:.1f} ms, total {sum(times):.1f} s",
              flush=True)
    env = environment("cpu", command_line("bench.mac_attention", args.argv))
    return dict(command=env["command"],
                settings=dict(d=d, layers=layers, heads=heads, context=context, batch=batch, steps=steps,
                              threads=args.threads, corpus_bytes=len(text), corpus_files=n_files),
                environment=env, results=results)


def table(log: dict) -> str:
    s = log["settings"]
    lines = [f"MAC attention benchmark: byte-level GPT, {s['layers']} blocks, d={s['d']}, {s['heads']} heads, "
             f"context {s['context']}, batch {s['batch']}, {s['steps']} steps, {s['threads']} thread(s), "
             f"torch {log['environment']['torch']}",
             "", f"Command: `{log['command']}`", "",
             "| optimizer | train loss (nats/byte, mean of last 4 logged) | test bits/byte | median step (ms) "
             "| total (s) |", "|---|---|---|---|---|"]
    for name, r in log["results"].items():
        lines.append(f"| {name} | {r['final_train_loss']:.3f} | {r['test_bits_per_byte']:.3f} | "
                     f"{r['step_ms_median']:.1f} | {r['total_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for log.json and table.md")
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    log = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "log.json").write_text(json.dumps(log, indent=1))
    (args.out / "table.md").write_text(table(log))
    print(table(log))


if __name__ == "__main__":
    main()
