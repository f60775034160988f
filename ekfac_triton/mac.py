"""``MAC``: the mean-activation-curvature optimizer (Seung, Lee & Ko, ICDM 2025) with the official
defaults, and its optional dense first layer. The maths is in :mod:`ekfac_triton.curvature.mac`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .optimizer import EKFAC
from .preconditioner import PreconditionedLayer

FIRST_LAYER = ("mac", "dense")


class _Captured(Exception):
    """Stops a forward once the first layer's input is captured."""


@torch.no_grad()
def dense_first_layer_inverse(model: nn.Module, layer: PreconditionedLayer, data: Iterable[Any],
                              damping: float, dtype: torch.dtype) -> Tensor:
    """``(C + ρI)⁻¹`` with C the mean over ``data``'s batches of ``X̃ᵀX̃ / rows`` (X̃ the layer's
    input rows with the bias 1 appended), from one pass in which each forward stops at ``layer``.

    ``data`` yields model inputs, or tuples/lists whose first element is the input.
    """
    adapter = layer.adapter
    rows: list[Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        rows.append(adapter.input_rows(args[0].detach()))
        raise _Captured

    handle = adapter.module.register_forward_pre_hook(hook)
    total, batches = None, 0
    try:
        for item in data:
            x = item[0] if isinstance(item, (tuple, list)) else item
            if isinstance(x, Tensor):
                x = x.to(adapter.weight.device)
            rows.clear()
            try:
                model(x)
            except _Captured:
                pass
            if not rows:
                raise ValueError(f"Invalid first_layer_data: a forward of the model never reached layer {layer.name!r}")
            a = rows[0].reshape(-1, rows[0].shape[-1]).to(dtype)
            if adapter.has_bias:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
            c = a.T @ a / a.shape[0]
            total = c if total is None else total.add_(c)
            batches += 1
    finally:
        handle.remove()
    if total is None:
        raise ValueError("Invalid first_layer_data: it yielded no batch")
    total /= batches
    eye = torch.eye(total.shape[0], dtype=total.dtype, device=total.device)
    return torch.linalg.inv(total + damping * eye)


class MAC(EKFAC):
    """MAC: :class:`EKFAC`'s engine with ``curvature="mac"`` and the official defaults (CIFAR
    scripts): lr 0.1, ρ = ``damping`` 1.0, statistic decay 0.95, statistics every 5 steps, refresh
    every 50 (``eigen_every`` is MAC's refresh period), momentum 0.9, weight decay 5e-4 coupled.

    Per Linear/Conv2d layer (depthwise convolutions included), with m̂ the bias-corrected EMA of
    the mean input row ``[x; 1]``, the direction is ``D = G − (G m̂) m̂ᵀ / (ρ + ‖m̂‖²)``
    (= ``G · ρ(m̂m̂ᵀ + ρI)⁻¹``, never formed); then momentum SGD on D. Memory per layer: two d_in̄
    vectors. Other parameters get the same momentum SGD on their gradient.

    Args:
        model, lr, damping, momentum, weight_decay, factor_decay, factor_every, eigen_every,
        decoupled_weight_decay: as for :class:`EKFAC` (``decoupled_weight_decay=True`` for the
            official ImageNet/GPT recipes).
        first_layer: ``"mac"`` (default) or ``"dense"``: the first preconditioned layer
            (``preconditioned_modules()[0]``) uses the fixed ``(C + ρI)⁻¹``, C the mean of
            ``x̃x̃ᵀ`` over one pass of ``first_layer_data`` made at construction (forwards stop
            at that layer), never refreshed. Costs a d_in̄ x d_in̄ matrix for that layer.
        first_layer_data: an iterable of inputs or ``(inputs, ...)`` batches (required with
            ``first_layer="dense"``).
        attention_layers: not implemented in this version (MAC's attention-score preconditioning
            of Q/K/V rows); passing anything but None raises ``NotImplementedError``.
        **kwargs: other :class:`EKFAC` arguments (``backend``, ``params``, ...).
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, damping: float = 1.0, momentum: float = 0.9,
                 weight_decay: float = 5e-4, factor_decay: float = 0.95, factor_every: int = 5,
                 eigen_every: int = 50, decoupled_weight_decay: bool = False, first_layer: str = "mac",
                 first_layer_data: Iterable[Any] | None = None, attention_layers: Any = None,
                 **kwargs: Any) -> None:
        if kwargs.setdefault("curvature", "mac") != "mac":
            raise ValueError(f"Invalid curvature={kwargs['curvature']!r}: MAC is curvature='mac'")
        if attention_layers is not None:
            raise NotImplementedError("attention_layers: MAC's attention preconditioning (R_v from attention "
                                      "scores) is not implemented in this version; attention projections that are "
                                      "nn.Linear get plain MAC, nn.MultiheadAttention's in_proj the plain update")
        if first_layer not in FIRST_LAYER:
            raise ValueError(f"Invalid first_layer={first_layer!r}: must be one of {FIRST_LAYER}")
        if first_layer == "dense" and first_layer_data is None:
            raise ValueError("Invalid first_layer_data=None: first_layer='dense' needs an iterable of input batches")
        if first_layer == "mac" and first_layer_data is not None:
            raise ValueError("Invalid first_layer_data: only used with first_layer='dense'")
        super().__init__(model, lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
                         factor_decay=factor_decay, factor_every=factor_every, eigen_every=eigen_every,
                         decoupled_weight_decay=decoupled_weight_decay, **kwargs)
        if first_layer == "dense":
            layer = self.preconditioner.layers[0]
            curv = layer.curvature
            inverse = dense_first_layer_inverse(model, layer, first_layer_data, damping, curv.mean_ema.dtype)
            curv.set_dense_inverse(inverse)
