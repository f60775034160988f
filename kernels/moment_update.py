"""Kernel family 3: the multi-tensor moment update applied after preconditioning.

For every parameter p with preconditioned direction d (the raw gradient for parameters without
curvature), momentum buffer m, learning rate η, momentum μ, weight decay ω and a global scale ν
(the KL-clip factor of the preconditioned layers, Ba et al. 2017 / kfac-pytorch; 1 elsewhere):

    u = ν·d + ω·p;   m <- μ·m + u;   p <- p - η·m          (μ = 0: p <- p - η·u)

Buffers start at zero, so the first step gives m = u exactly, as torch.optim.SGD's clone does.
Pure-torch reference: the CPU implementation and the oracle of the Triton kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["moment_update_reference"]


@torch.no_grad()
def moment_update_reference(params: Sequence[Tensor], directions: Sequence[Tensor],
                            buffers: Sequence[Tensor | None], *, lr: float | Tensor, momentum: float,
                            weight_decay: float, scales: Sequence[Tensor | None]) -> None:
    """Apply the update above in place to ``params`` (and ``buffers`` when momentum > 0).

    Args:
        params: parameters, updated in place.
        directions: one direction per parameter, same shape.
        buffers: one momentum buffer per parameter (ignored and may be None when momentum == 0).
        lr, momentum, weight_decay: the parameter group's hyperparameters.
        scales: per parameter a 0-dim tensor ν multiplying its direction, or None for 1.
    """
    if not (len(params) == len(directions) == len(buffers) == len(scales)):
        raise ValueError("params, directions, buffers and scales must have equal lengths")
    for p, d, m, nu in zip(params, directions, buffers, scales):
        if p.shape != d.shape:
            raise ValueError(f"direction shape {tuple(d.shape)} != parameter shape {tuple(p.shape)}")
        u = d.to(p.dtype) if nu is None else d.to(p.dtype) * nu.to(p.dtype)
        if weight_decay != 0.0:
            u = u.add(p, alpha=weight_decay)
        if momentum != 0.0:
            if m is None:
                raise ValueError("a momentum buffer is required when momentum != 0")
            m.mul_(momentum).add_(u)
            u = m
        if isinstance(lr, Tensor):
            p.sub_(u * lr)
        else:
            p.add_(u, alpha=-lr)
