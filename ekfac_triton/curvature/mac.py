"""MAC (Seung, Lee & Ko, ICDM 2025, arXiv 2506.08464): mean-activation curvature.

The input-side factor is the damped outer product of the **mean** layer input, the output side
the identity, so the inverse is closed-form (Sherman–Morrison) and never a matrix:

    m̂ = bias-corrected EMA of the batch mean of the rows x̃ = [x; 1]     (a d_in̄ vector)
    R  = ρ (m̂ m̂ᵀ + ρ I)⁻¹ = I − m̂ m̂ᵀ / (ρ + ‖m̂‖²)
    D  = G R = G − (G m̂) m̂ᵀ / (ρ + ‖m̂‖²)            G = [∇W | ∇b]  (d_out x d_in̄)

Rows are one per example and position (Linear on (B, T, d): per token; Conv2d: per im2col patch;
depthwise Conv2d: per example, channel and position). The statistic is updated every
``factor_every`` steps; the *refresh* (every ``eigen_every`` steps — for MAC that argument is the
refresh period, there is no eigendecomposition) snapshots m̂ and ‖m̂‖², which the steps in between
apply. Memory per layer: two d_in̄ vectors. ρ is the ``damping`` argument.

Attention layers (``shape.value_rows`` set: ``nn.MultiheadAttention``'s in-projection, a marked
fused q/k/v ``nn.Linear``): the query and key rows use R as above; the value rows
``[start, stop)`` use ``R_v = I − v̂ v̂ᵀ / (ρ + ‖v̂‖²)``, v̂ the bias-corrected EMA (same decay,
count and schedule as m̂) of the attention-weighted token mean ``v = X̄ᵀ p̄``: X̄[j] the batch mean
of x̃ at token j, p̄[j] the mean over examples, heads and queries of the attention probability of
key j (the adapter's ``LayerBatch.token_weights``; masked entries 0, so Σ_j p̄_j = 1 and v's bias
entry is 1). One more d_in̄ vector pair per attention layer.

An optional fixed dense inverse (``first_layer="dense"`` of :class:`~ekfac_triton.MAC`) replaces
R by ``(C + ρI)⁻¹`` (no ρ factor, never refreshed), C the mean of x̃x̃ᵀ over a pass of data.
"""

from __future__ import annotations

import dataclasses

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from .. import ops
from ..layers import LayerBatch
from .base import AccumulatedEMA, Curvature, CurvatureOptions, LayerShape, ema_weights

if TYPE_CHECKING:
    from ..eigen_engine import EigenEngine


def mac_precondition_reference(grad: Tensor, mean: Tensor, sq_norm: Tensor | float, damping: float) -> Tensor:
    """``grad − (grad m̂) m̂ᵀ / (ρ + ‖m̂‖²)``: one GEMV and a rank-one update, R never formed."""
    return torch.addr(grad, (grad @ mean) / (damping + sq_norm), mean, alpha=-1)


class MACStatistics(NamedTuple):
    """The EMA of one layer's mean input row, ``m̂ <- β m̂ + α ā_t``, and for attention layers of
    ``v = X̄ᵀ p̄`` (X̄ the (R, d_in) batch mean per token), with ``(β, α) = scalars[at:at+2]``."""

    mean_ema: Tensor
    value_ema: Tensor | None
    a: Tensor
    token_weights: Tensor | None
    at: int
    d_in: int
    bias: bool

    def mutated(self) -> tuple[Tensor, ...]:
        return (self.mean_ema,) if self.value_ema is None else (self.mean_ema, self.value_ema)

    def run(self, scalars: Any, finite: Tensor | None, backend: str) -> None:
        beta, alpha = scalars[self.at], scalars[self.at + 1]
        dtype, d = self.mean_ema.dtype, self.d_in
        ops.ema(self.mean_ema[:d], self.a.reshape(-1, self.a.shape[-1]).mean(dim=0, dtype=dtype), beta, alpha, finite)
        if self.bias:
            ops.ema(self.mean_ema[d:], torch.ones_like(self.mean_ema[d:]), beta, alpha, finite)
        if self.value_ema is None:
            return
        p = self.token_weights
        if p is None:
            raise ValueError("an attention layer's batch has no attention weights (token_weights)")
        p = p.to(dtype)
        ops.ema(self.value_ema[:d], self.a.mean(dim=0, dtype=dtype).T @ p, beta, alpha, finite)
        if self.bias:  # X̄'s bias column is 1: that entry of v is Σ_j p̄_j
            ops.ema(self.value_ema[d:], p.sum().reshape(1), beta, alpha, finite)


class MACDirection(NamedTuple):
    """``D = G − (G m̂) m̂ᵀ / (ρ + ‖m̂‖²)`` per block of rows with its own vector, or
    ``G (C + ρI)⁻¹`` with a dense inverse; ρ = ``scalars[at]``."""

    grad: Tensor
    blocks: tuple[tuple[slice, Tensor, Tensor], ...]
    dense_inverse: Tensor | None
    at: int

    def run(self, scalars: Any, finite: Tensor | None, backend: str) -> Tensor:
        if self.dense_inverse is not None:
            return self.grad.to(self.dense_inverse.dtype) @ self.dense_inverse
        damping = scalars[self.at]
        grad = self.grad.to(self.blocks[0][1].dtype)
        if len(self.blocks) == 1:
            return mac_precondition_reference(grad, self.blocks[0][1], self.blocks[0][2], damping)
        return torch.cat([mac_precondition_reference(grad[rows], vec, sq, damping) for rows, vec, sq in self.blocks])


class MACCurvature(Curvature):
    """Per-layer MAC state: the EMA of the mean input row, and the snapshot the steps apply."""

    name = "mac"
    inputs_only = True

    def __init__(self, shape: LayerShape, dtype: torch.dtype, device: torch.device,
                 options: CurvatureOptions | None = None):
        # ``options.scaling`` is an EKFAC/TEKFAC setting, which MAC ignores
        self.options = options or self.Options()
        self.shape = shape
        self.mean_ema = torch.zeros(shape.d_in_bar, dtype=dtype, device=device)
        self.mean: Tensor | None = None          # m̂ at the last refresh
        self.sq_norm: Tensor | None = None       # ‖m̂‖² at the last refresh (0-dim: no host sync)
        self.dense_inverse: Tensor | None = None  # the optional fixed (C + ρI)⁻¹
        # attention layers: the same three for v = X̄ᵀ p̄, applied to the value rows
        self.value_rows = shape.value_rows
        self.value_ema = None if self.value_rows is None else torch.zeros_like(self.mean_ema)
        self.value_mean: Tensor | None = None
        self.value_sq_norm: Tensor | None = None
        self.factor_updates = 0
        self.refreshes = 0

    # -- statistics -------------------------------------------------------------------------------
    @property
    def has_statistics(self) -> bool:
        return self.factor_updates > 0 or self.dense_inverse is not None

    def statistics_job(self, batch: LayerBatch, decay: float, scalars: list[float]) -> MACStatistics | None:
        """``m̂ <- β' m̂ + α ā_t``, ā_t the mean of the batch's N·R rows (bias 1 appended), weights
        from :func:`ema_weights` so m̂ is the bias-corrected EMA ``m_k / (1 − β^k)``."""
        if self.dense_inverse is not None:
            return None
        self.factor_updates += 1
        at = len(scalars)
        scalars += ema_weights(decay, self.factor_updates)
        return MACStatistics(self.mean_ema, self.value_ema, batch.a, batch.token_weights, at, self.shape.d_in,
                             self.shape.bias)

    def statistics(self) -> tuple[Tensor, ...]:
        return (self.mean_ema,) if self.value_ema is None else (self.mean_ema, self.value_ema)

    # -- gradient accumulation (ARCHITECTURE.md, "Gradient accumulation") --------------------------
    def fold(self, sums: dict[str, Any], batch: LayerBatch, num_examples: int, *, factors: bool,
             scaling: bool) -> None:
        """The sum of the micro-batch's rows and their count; for attention layers also the sum
        over examples of each token's row (R, d_in) and ``n·p̄`` (R,): ``v = X̄ᵀ p̄`` is a product of
        two batch means, so both means are accumulated and multiplied only at the step."""
        if self.dense_inverse is not None or not factors:
            return
        dtype = self.mean_ema.dtype
        rows = batch.a.reshape(-1, batch.a.shape[-1])
        if "rows" in sums:
            sums["rows"] += rows.sum(dim=0, dtype=dtype)
        else:
            sums["rows"] = rows.sum(dim=0, dtype=dtype)
        sums["count"] = sums.get("count", 0) + rows.shape[0]
        if self.value_ema is None:
            return
        if batch.token_weights is None:
            raise ValueError("an attention layer's batch has no attention weights (token_weights)")
        tokens = batch.a.sum(dim=0, dtype=dtype)                       # (R, d_in)
        weights = batch.token_weights.to(dtype) * num_examples          # n·p̄, (R,)
        if "tokens" in sums and sums["tokens"].shape != tokens.shape:
            raise ValueError(f"attention layer: micro-batches of {sums['tokens'].shape[0]} and {tokens.shape[0]} "
                             "tokens; gradient accumulation needs the same sequence length in every micro-batch "
                             "(as one batch would)")
        sums["tokens"] = sums["tokens"] + tokens if "tokens" in sums else tokens
        sums["weights"] = sums["weights"] + weights if "weights" in sums else weights

    def accumulated_statistics_job(self, sums: dict[str, Any], num_examples: int, decay: float,
                                   scalars: list[float]) -> AccumulatedEMA | None:
        """m̂ from the rows' sum over their total count (the bias entry 1); for attention layers
        ``v = (X_sum/N)ᵀ (p_sum/N)``, its bias entry ``Σ_j p̄_j``."""
        if self.dense_inverse is not None:
            return None
        self.factor_updates += 1
        beta, alpha = ema_weights(decay, self.factor_updates)
        d = self.shape.d_in
        targets, values = [self.mean_ema[:d]], [sums["rows"]]
        weights = [alpha / sums["count"]]
        if self.shape.bias:
            targets.append(self.mean_ema[d:])
            values.append(torch.ones_like(self.mean_ema[d:]))
            weights.append(alpha)
        if self.value_ema is not None:
            n = num_examples
            targets.append(self.value_ema[:d])
            values.append(sums["tokens"].T @ sums["weights"])
            weights.append(alpha / (n * n))
            if self.shape.bias:
                targets.append(self.value_ema[d:])
                values.append(sums["weights"].sum().reshape(1))
                weights.append(alpha / n)
        at = len(scalars)
        scalars += [beta, *weights]
        return AccumulatedEMA(tuple(targets), tuple(values), at)

    # -- refresh ----------------------------------------------------------------------------------
    def refresh_due(self, engine: EigenEngine, index: int, step: int) -> bool:
        if self.dense_inverse is not None:
            return False
        return self.mean is None or (step % engine.period == 0)

    def refresh(self, engine: EigenEngine, index: int) -> None:
        """Snapshot m̂ and ‖m̂‖² (O(d_in̄), no decomposition)."""
        self.refreshes += 1
        self.mean = self.mean_ema.clone()
        self.sq_norm = self.mean.dot(self.mean)
        if self.value_ema is not None:
            self.value_mean = self.value_ema.clone()
            self.value_sq_norm = self.value_mean.dot(self.value_mean)
        return None

    def row_blocks(self) -> list[tuple[slice, Tensor, Tensor]]:
        """``(rows, vector, ‖vector‖²)`` covering the rows of the gradient matrix: all rows with
        m̂, or for an attention layer the value rows with v̂ and the others with m̂."""
        d_out = self.shape.d_out
        if self.value_rows is None:
            return [(slice(0, d_out), self.mean, self.sq_norm)]
        start, stop = self.value_rows
        blocks = [(slice(0, start), self.mean, self.sq_norm),
                  (slice(start, stop), self.value_mean, self.value_sq_norm),
                  (slice(stop, d_out), self.mean, self.sq_norm)]
        return [b for b in blocks if b[0].stop > b[0].start]

    # -- the direction ----------------------------------------------------------------------------
    def direction_job(self, grad: Tensor, damping: float, num_examples: int, decay: float,
                      scalars: list[float]) -> MACDirection:
        """``D = G − (G m̂) m̂ᵀ / (ρ + ‖m̂‖²)`` (or ``G (C + ρI)⁻¹`` with a dense inverse)."""
        at = len(scalars)
        scalars.append(damping)
        blocks = () if self.dense_inverse is not None else tuple(self.row_blocks())
        return MACDirection(grad, blocks, self.dense_inverse, at)

    def fused_update(self, adapter: Any, buffer_of: Any, *, damping: float, lr: float, momentum: float,
                     weight_decay: float, decoupled: bool, backend: str) -> None:
        """MAC's preconditioning, weight decay, momentum and update in one kernel launch per block
        of rows with its own vector (one block; an attention layer's value rows are a second).

        Args:
            adapter: the layer's adapter (weight, bias and their gradients).
            buffer_of: ``p -> momentum buffer`` (called only with momentum).
        """
        has_m = momentum != 0
        weight_buffer = buffer_of(adapter.weight) if has_m else None
        bias, bias_grad, bias_buffer = adapter.bias, None, None
        drop_bias = bias is not None and bias.grad is None  # as unfused: a bias without gradient stays
        if drop_bias:
            bias = None
        elif bias is not None:
            bias_grad = bias.grad
            bias_buffer = buffer_of(bias) if has_m else None

        def rows_of(t: Tensor | None, rows: slice) -> Tensor | None:
            return None if t is None else t[rows]  # contiguous row blocks: views, updated in place

        for rows, mean, sq_norm in self.row_blocks():
            ops.mac_update(adapter.weight[rows], adapter.weight.grad[rows], rows_of(weight_buffer, rows),
                           rows_of(bias, rows), rows_of(bias_grad, rows), rows_of(bias_buffer, rows),
                           mean[: adapter.d_in] if drop_bias else mean, sq_norm, damping=damping, lr=lr,
                           momentum=momentum, weight_decay=weight_decay, decoupled=decoupled, backend=backend)

    @property
    def fusable(self) -> bool:
        """Whether the direction is MAC's rank-one correction (which the fused kernel applies)."""
        return self.dense_inverse is None and self.mean is not None

    def set_dense_inverse(self, inverse: Tensor) -> None:
        """Use the fixed ``(d_in̄, d_in̄)`` matrix ``inverse`` instead of MAC's R (first layer)."""
        d = self.shape.d_in_bar
        if self.value_rows is not None:
            raise ValueError("an attention layer cannot use a dense first-layer inverse")
        if inverse.shape != (d, d):
            raise ValueError(f"dense inverse must be ({d}, {d}), got {tuple(inverse.shape)}")
        self.dense_inverse = inverse.to(dtype=self.mean_ema.dtype, device=self.mean_ema.device)

    # -- serialisation ----------------------------------------------------------------------------
    _TENSORS = ("mean_ema", "mean", "sq_norm", "dense_inverse", "value_ema", "value_mean", "value_sq_norm")
    _COUNTS = ("factor_updates", "refreshes")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: getattr(self, k) for k in self._TENSORS}
        state.update({k: getattr(self, k) for k in self._COUNTS})
        state["curvature"] = self.name
        state["options"] = dataclasses.asdict(self.options)
        return state

    def check_state(self, state: dict[str, Any], layer: str) -> None:
        super().check_state(state, layer)
        if (state.get("value_ema") is None) != (self.value_ema is None):
            raise ValueError(f"Invalid state_dict: layer {layer!r} was saved with" +
                             (" no" if self.value_ema is not None else "") +
                             " attention statistics; this layer differs (attention_layers must match)")
        d = self.shape.d_in_bar
        shapes = {"mean_ema": (d,), "mean": (d,), "sq_norm": (), "dense_inverse": (d, d), "value_ema": (d,),
                  "value_mean": (d,), "value_sq_norm": ()}
        for k in self._TENSORS:
            self.check_tensor(layer, k, state.get(k), shapes[k], self.mean_ema.dtype)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state, "?")
        device, dtype = self.mean_ema.device, self.mean_ema.dtype
        for k in self._TENSORS:
            value = state.get(k)  # the value_* entries are absent in states saved before attention support
            setattr(self, k, None if value is None else value.to(device=device, dtype=dtype, copy=True))
        for k in self._COUNTS:
            setattr(self, k, int(state[k]))
