"""Small versions of the models people train, for the real-model tests (and any other test):

* tiny transformers models built from configs in the test (no weights, no network):
  :func:`tiny_gpt2`, :func:`tiny_bert`, :func:`tiny_llama` (transformers is imported only when
  one is built), and :func:`linear_twin`, a copy of a model with every transformers ``Conv1D``
  replaced by the ``nn.Linear`` holding the transposed weight;
* :class:`ResNetLike` and :class:`ViTLike`, written here because timm cannot be installed next to
  the CPU torch: a residual CNN (BatchNorm, strided and depthwise Conv2d, residual adds) and a
  vision transformer (patch-embedding Conv2d, LayerNorm, attention blocks with a fused q/k/v
  ``nn.Linear``, MLP, class token and position embedding as bare parameters).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 256


def tiny_gpt2(seed: int = 0, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, vocab_size: int = VOCAB,
              n_positions: int = 64, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` (dropout off, eager attention; ``lm_head``
    tied to ``transformer.wte``)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                        n_positions=n_positions, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return GPT2LMHeadModel(config).to(dtype)


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised ``BertForMaskedLM`` (2 layers, hidden 64; the MLM decoder tied to
    the word embedding)."""
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0, attn_implementation="eager")
    return BertForMaskedLM(config).to(dtype)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (2 layers, hidden 64, untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="eager")
    return LlamaForCausalLM(config).to(dtype)


def linear_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every transformers ``Conv1D`` (weight (d_in, d_out),
    ``y = x W + b``) replaced by an ``nn.Linear`` holding ``Wᵀ``: the same function.

    The Linear weight is the transposed view of a (d_in, d_out) copy of W, so that both layers run
    the same BLAS products (``F.linear`` is ``addmm(b, x, weight.t())``): forwards and gradients
    agree bitwise, and a comparison of the two isolates the layer adapters (a contiguous ``Wᵀ``
    rounds differently, which a near-degenerate eigenbasis amplifies past 1e-12 within steps)."""
    from transformers.pytorch_utils import Conv1D
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                d_in, d_out = child.weight.shape
                linear = nn.Linear(d_in, d_out, dtype=child.weight.dtype)
                linear.weight = nn.Parameter(child.weight.detach().clone().T)
                linear.bias = nn.Parameter(child.bias.detach().clone())
                setattr(parent, name, linear)
    return twin


def lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy of a causal LM over (B, T) tokens, a mean over every position."""
    logits = model(tokens[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def mlm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """BERT's masked-LM loss with every position a target (a mean over every position)."""
    logits = model(tokens).logits
    return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())


def token_batch(seed: int, batch: int = 4, length: int = 16, vocab: int = VOCAB) -> Tensor:
    """(batch, length) random tokens from a seeded generator."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- vision ---------------------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    """MobileNet-style block: 1x1 expand, depthwise 3x3 (strided or not), 1x1 project, each with
    BatchNorm; a residual add when the shapes allow."""

    def __init__(self, channels: int, out: int, stride: int, expand: int = 2) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.residual = stride == 1 and channels == out

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.expand(x)))
        y = F.relu(self.bn2(self.depthwise(y)))
        y = self.bn3(self.project(y))
        return x + y if self.residual else y


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm, a strided 1x1 shortcut when the
    shape changes, a residual add."""

    def __init__(self, channels: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = None
        if stride != 1 or channels != out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNetLike(nn.Module):
    """A small residual CNN on (N, 3, 16, 16) images: stem conv, two basic blocks (one strided),
    one inverted-residual block with a depthwise convolution, global pooling, a linear head."""

    def __init__(self, classes: int = 10, width: int = 24, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = InvertedResidual(2 * width, 2 * width, 1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(x.mean(dim=(2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v ``nn.Linear`` (columns ``[q | k | v]``, heads
    contiguous) and an output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((p @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention and a GELU MLP, each in a residual add."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTLike(nn.Module):
    """A small vision transformer on (N, 3, 16, 16) images: 4x4 patches embedded by a strided
    Conv2d, a class token and a learned position embedding (bare parameters), ``depth`` blocks,
    a final LayerNorm and a linear head on the class token."""

    def __init__(self, classes: int = 10, dim: int = 32, depth: int = 2, heads: int = 2, patch: int = 4,
                 image: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (image // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def image_batch(seed: int, n: int = 8, classes: int = 10, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(n, 3, 16, 16) images and (n,) labels from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)
