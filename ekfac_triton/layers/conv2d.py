"""``nn.Conv2d`` through im2col patches (Grosse & Martens 2016, KFC): each output position is a
position sharing the weight; the patch columns follow ``W.reshape(d_out, -1)``'s order."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerAdapter, LayerBatch


def _same_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric padding equivalent to padding='same', or None when it is asymmetric."""
    pads = []
    for k, d in zip(module.kernel_size, module.dilation):
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return pads[0], pads[1]


def _depthwise(module: nn.Conv2d) -> bool:
    return module.groups > 1 and module.groups == module.in_channels


class Conv2dAdapter(LayerAdapter):
    """Adapter for ``nn.Conv2d`` with groups=1 and zero padding; depthwise convolutions
    (``groups == in_channels``) for the curvatures that read only the inputs (MAC): their rows
    are the kh·kw patches of one channel, one per (example, channel, position)."""

    module: nn.Conv2d

    compiles = True
    example_dims = 3

    @staticmethod
    def unsupported_reason(module: nn.Module, inputs_only: bool = False) -> str | None:
        if _depthwise(module) and not inputs_only:
            return (f"groups={module.groups} (a depthwise convolution: its Fisher block is not one Kronecker "
                    "product; only curvature='mac' preconditions it)")
        if module.groups != 1 and not _depthwise(module):
            return (f"groups={module.groups} with in_channels={module.in_channels} (grouped convolutions are "
                    "preconditioned only with groups=1, or with groups == in_channels (depthwise) by "
                    "curvature='mac')")
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is preconditioned)"
        if module.padding == "same" and _same_padding(module) is None:
            return "padding='same' with an even effective kernel (asymmetric padding)"
        return None

    def __init__(self, module: nn.Conv2d) -> None:
        super().__init__(module)
        if module.padding == "valid":
            self.padding = (0, 0)
        elif module.padding == "same":
            self.padding = _same_padding(module)
        else:
            self.padding = tuple(module.padding)

    def batch(self, inputs: Tensor, grad_output: Tensor | None, record: Any = None) -> LayerBatch:
        m = self.module
        if inputs.dim() == 3:  # an unbatched call is one example
            inputs = inputs[None]
            grad_output = None if grad_output is None else grad_output[None]
        n = inputs.shape[0]
        patches = F.unfold(inputs, m.kernel_size, dilation=m.dilation, padding=self.padding, stride=m.stride)
        if _depthwise(m):  # rows per (example, channel, position); no Kronecker output side
            a = patches.reshape(n, m.in_channels, self.d_in, -1).transpose(2, 3).reshape(n, -1, self.d_in)
            return LayerBatch(a=a, g=None)
        a = patches.transpose(1, 2)                                   # (N, L, C_in*kh*kw)
        if grad_output is None:
            return LayerBatch(a=a, g=None)
        return LayerBatch(a=a, g=self.output_rows(grad_output, n))

    def output_rows(self, grad_output: Tensor, n: int) -> Tensor:
        return grad_output.reshape(n, self.d_out, -1).transpose(1, 2) * n  # (N, L, C_out)
