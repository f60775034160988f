"""``nn.Conv2d`` through im2col patches (Grosse & Martens 2016, KFC): each output position is a
position sharing the weight; the patch columns follow ``W.reshape(d_out, -1)``'s order."""

from __future__ import annotations

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


class Conv2dAdapter(LayerAdapter):
    """Adapter for ``nn.Conv2d`` with groups=1 and zero padding."""

    module: nn.Conv2d

    example_dims = 3

    @staticmethod
    def unsupported_reason(module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is preconditioned)"
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

    def batch(self, inputs: Tensor, grad_output: Tensor) -> LayerBatch:
        m = self.module
        if inputs.dim() == 3:  # an unbatched call is one example
            inputs, grad_output = inputs[None], grad_output[None]
        n = inputs.shape[0]
        patches = F.unfold(inputs, m.kernel_size, dilation=m.dilation, padding=self.padding, stride=m.stride)
        a = patches.transpose(1, 2)                                   # (N, L, C_in*kh*kw)
        g = grad_output.reshape(n, self.d_out, -1).transpose(1, 2) * n  # (N, L, C_out)
        return LayerBatch(a=a, g=g)
