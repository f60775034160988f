"""Which rule for tied weights (an embedding shared with the output head) trains better: a small
transformers GPT-2 (2 layers, d 128, byte vocabulary 256) on the Python standard library's source
(:func:`bench.experiments.stdlib_corpus`), fixed seeds, the same lr/damping/steps for every rule.

Rules (ARCHITECTURE.md, "Tied weights"), all with :class:`ekfac_triton.Preconditioner` and momentum
SGD on top (the update of :class:`ekfac_triton.EKFAC`):

* ``head``: the tied tensor is preconditioned by the output head's factors, applied to the summed
  gradient (the default of discovery);
* ``embedding``: the same by the embedding's factors (the head excluded with ``modules=``);
* ``plain``: neither (both excluded): the tied tensor gets momentum SGD on its gradient.

    python -m bench.tied_weights              # writes bench/results/tied_weights/cpu/
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.environment import environment
from bench.experiments import stdlib_corpus

RULES = ("head", "embedding", "plain")


def gpt2(seed: int, context: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=256, n_positions=context,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight, "GPT-2's head must be tied to its embedding"
    return model


def run(rule: str, curvature: str, steps: int, seed: int, lr: float, damping: float, kl_clip: float | None,
        context: int, batch: int, data: torch.Tensor, held_out: tuple[torch.Tensor, torch.Tensor]) -> dict:
    from ekfac_triton import Preconditioner
    model = gpt2(seed, context)
    excluded = {"head": set(), "embedding": {"lm_head"}, "plain": {"lm_head", "transformer.wte"}}[rule]
    modules = [m for name, m in model.named_modules() if name not in excluded]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LayerNorms' plain-update warning
        pre = Preconditioner(model, curvature=curvature, damping=damping, lr=lr, modules=modules,
                             **({} if kl_clip is None else {"kl_clip": kl_clip}))
    tied = model.transformer.wte.weight
    owner = [layer.name for layer in pre.layers if layer.adapter.weight is tied]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + seed)
    offsets = torch.arange(context + 1)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        w = data[torch.randint(0, data.numel() - context - 1, (batch,), generator=gen)[:, None] + offsets].long()
        loss = F.cross_entropy(model(w[:, :-1]).logits.flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        pre.step()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        x, y = held_out
        test = float(F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()))
    pre.remove_hooks()
    tail = losses[-50:]
    return dict(rule=rule, curvature=curvature, seed=seed, steps=steps, lr=lr, damping=damping, kl_clip=kl_clip,
                context=context, batch=batch, owner=owner, coverage=pre.coverage().fraction,
                losses=losses, final_train=sum(tail) / len(tail), test_nats=test, seconds=seconds,
                finite=all(math.isfinite(v) for v in losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--curvatures", nargs="+", default=["ekfac", "kfac"])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--kl-clip", type=float, default=1e-3)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/tied_weights/cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text, _ = stdlib_corpus(2_000_000)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    split = int(0.95 * data.numel())
    train, test = data[:split], data[split:]
    g = torch.Generator().manual_seed(4321)
    starts = torch.randint(0, test.numel() - args.context - 1, (64,), generator=g)
    w = test[starts[:, None] + torch.arange(args.context + 1)].long()
    held_out = (w[:, :-1], w[:, 1:])
    results = []
    for curvature in args.curvatures:
        for seed in args.seeds:
            for rule in RULES:
                r = run(rule, curvature, args.steps, seed, args.lr, args.damping, args.kl_clip, args.context,
                        args.batch, train, held_out)
                results.append(r)
                print(f"{curvature:6s} seed {seed} {rule:9s} owner={r['owner']} coverage={r['coverage']:.4f} "
                      f"train(last 50)={r['final_train']:.4f} test={r['test_nats']:.4f} nats/byte "
                      f"({r['seconds']:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "results.json").exists():  # runs of other seeds or curvatures are kept (each run is seeded)
        done = {(r["curvature"], r["seed"], r["rule"]) for r in results}
        earlier = json.loads((out / "results.json").read_text())["results"]
        results = [r for r in earlier if (r["curvature"], r["seed"], r["rule"]) not in done] + results
    seeds = sorted({r["seed"] for r in results})
    curvatures = [c for c in args.curvatures + sorted({r["curvature"] for r in results}) if any(
        r["curvature"] == c for r in results)]
    curvatures = list(dict.fromkeys(curvatures))
    (out / "results.json").write_text(json.dumps(dict(args=vars(args), environment=environment("cpu", "python -m bench.tied_weights"),
                                                      results=results), indent=1))
    lines = ["| curvature | rule | " + " | ".join(f"seed {s} train / test" for s in seeds) + " | mean train | mean test |",
             "|---|---|" + "---|" * (len(seeds) + 2)]
    for curvature in curvatures:
        for rule in RULES:
            rs = sorted((r for r in results if r["curvature"] == curvature and r["rule"] == rule),
                        key=lambda r: r["seed"])
            if not rs:
                continue
            cells = " | ".join(f"{r['final_train']:.4f} / {r['test_nats']:.4f}" for r in rs)
            mean_train = sum(r["final_train"] for r in rs) / len(rs)
            mean_test = sum(r["test_nats"] for r in rs) / len(rs)
            lines.append(f"| {curvature} | {rule} | {cells} | {mean_train:.4f} | {mean_test:.4f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
