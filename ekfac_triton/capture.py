"""Recording each preconditioned module's input and output-gradient during forward/backward.

A forward hook keeps the input and registers a hook on the output tensor that keeps the gradient
arriving there. Both are kept only while the engine asks for statistics (``enabled``) and only for
forwards that build a graph. The torch.compile-friendly capture (custom ops, no Python side
effects in the graph) is a later issue; this one is plain eager PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def _inside_functorch() -> bool:
    """torch.func transforms (vmap, grad) run module hooks on wrapped tensors: not training data."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


class LayerCapture:
    """The last completed (input, output-gradient) pair of one module since ``clear()``.

    ``completed`` counts pairs whose gradient arrived: more than one between two steps means the
    module ran several times in one graph (shared weights) or gradients were accumulated over
    several backwards, which the statistics do not model yet — the engine refuses it clearly.
    """

    def __init__(self, module: nn.Module) -> None:
        self.enabled = False
        self.inputs: Tensor | None = None
        self.grad_output: Tensor | None = None
        self.completed = 0
        self.input_shape: torch.Size | None = None
        self._handle: RemovableHandle = module.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not isinstance(output, Tensor) or not output.requires_grad or _inside_functorch():
            return
        # The batch shape is needed on every step (the ``batch`` scaling reads N), the tensors only
        # when statistics are due. Both are taken when the gradient arrives, so a forward that is
        # never backpropagated (a metric computed with grad enabled) changes nothing.
        shape = args[0].shape
        inputs = args[0].detach() if self.enabled else None

        def keep_grad(grad: Tensor) -> None:
            self.input_shape = shape
            if inputs is not None:
                self.inputs = inputs
                self.grad_output = grad.detach()
                self.completed += 1

        output.register_hook(keep_grad)

    def clear(self) -> None:
        self.inputs = None
        self.grad_output = None
        self.completed = 0

    def remove(self) -> None:
        self._handle.remove()
        self.clear()
