"""The small vision models of the benchmarks and the tests, written here because timm cannot be
installed next to the CPU torch (its torchvision dependency does not load with it):

* :class:`ResNetLike`: a residual CNN (BatchNorm, strided and depthwise Conv2d, residual adds);
* :class:`ViTLike`: a vision transformer (patch-embedding Conv2d, LayerNorm, attention blocks with
  a fused q/k/v ``nn.Linear``, an MLP, class token and position embedding as bare parameters).

``bench.defaults`` trains them with the optimizers' defaults; ``tests/models`` checks what is
preconditioned in them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "BasicBlock", "Block", "InvertedResidual", "ResNetLike", "ViTLike"]


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
