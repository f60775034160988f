"""The compiled optimizer step (``EKFAC(..., compile_step=True)``; issue 7, items 2 and 3).

The step is split in two. What decides *what* to do stays eager Python: the schedules
(``factor_every``, ``eigen_every``, staggering), the EMA counts and their weights, the
eigendecompositions, warnings. The tensor work of a step runs in four ``torch.compile``d pure
functions over lists of tensors, one call each per step:

* :func:`all_finite`: the non-finite check of gradients and captured statistics;
* :func:`update_factors`: the factor EMAs (statistics steps; George et al. 2018, Alg. 1);
* :func:`update_scalings`: EKFAC's per-example / per-position scaling EMA in the current basis
  (their Eq. 9-10; statistics steps);
* :func:`precondition_and_update`: ``Q_out [(Q_outᵀ ∇W̄ Q_in) / (S + λ)] Q_inᵀ`` per layer (with
  the ``batch`` scaling update), the KL clip, weight decay, momentum and the parameter update.

Every value that changes from step to step (EMA weights, lr, damping) enters these functions as
an element of one float64 device vector, never as a Python number, so the graphs depend only on
the model's shapes and the constant settings: a refresh step changes the *values* of the bases
and scalings, not the graphs, and there is no recompilation after the first few steps.

Kernels: with ``backend="triton"`` the factor, scaling and projection kernels are called as
their ``torch.library`` ops (single nodes in the graph). Their EMA weights are Python floats,
so they are called with the constant weights ``(alpha=1, beta=0)`` into a fresh tensor and the
EMA is applied around them. The ``batch`` scaling (whose kernel fuses a step-varying EMA into
the projection) and the moment update are plain tensor code that inductor fuses itself.

Non-finite steps: the eager step syncs once per step to skip a non-finite step. Here, on a
step that refreshes or installs a basis (which syncs anyway) the same host decision is taken;
on every other step the decision stays on the device: each state update is
``where(finite, new, old)``, so a non-finite step leaves parameters, momentum, factors and
scalings bit-identical, and a device counter counts it (``Preconditioner.skipped_steps``
reads it). Unlike the eager skip, the step and EMA counts still advance and no warning is issued.
That makes ordinary steps free of host syncs, and so capturable as CUDA graphs
(``compile_step={"mode": "reduce-overhead"}``: then the tensors the graphs mutate are marked as
static addresses and new bases are copied into the existing tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from . import ops
from .curvature import EigenbasisCurvature
from .curvature.tekfac import TEKFACCurvature, trace_weights
from .layers import Conv2dAdapter, LinearAdapter
from .preconditioner import kl_clip_scale

if TYPE_CHECKING:
    from .layers import LayerBatch
    from .preconditioner import PreconditionedLayer, Preconditioner

#: torch.compile modes that capture CUDA graphs
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_options(compile_step: object) -> dict[str, Any] | None:
    """The ``torch.compile`` arguments of ``compile_step`` (None: eager step).

    Args:
        compile_step: False (eager), True (``torch.compile`` defaults, ``fullgraph=True``) or a
            dict of ``torch.compile`` keyword arguments (e.g. ``{"mode": "reduce-overhead"}``).
    """
    if compile_step is False:
        return None
    if compile_step is True:
        return {"fullgraph": True}
    if isinstance(compile_step, dict) and all(isinstance(k, str) for k in compile_step):
        return {"fullgraph": True, **compile_step}
    raise ValueError(f"Invalid compile_step={compile_step!r}: must be a bool or a dict of torch.compile arguments")


# -------------------------------------------------------------------------------------------------
# the pure functions (compiled); every step-dependent number is an element of ``scalars``
# -------------------------------------------------------------------------------------------------
def all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-dim bool tensor: whether every element of every tensor is finite."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def _ema(state: Tensor, batch: Tensor, beta: Tensor, alpha: Tensor, finite: Tensor) -> None:
    """``state <- beta·state + alpha·batch`` where ``finite``, else unchanged (bit for bit)."""
    state.copy_(torch.where(finite, state * beta + batch * alpha, state))


def update_factors(in_factors: list[Tensor], out_factors: list[Tensor], inputs: list[Tensor],
                   grad_outputs: list[Tensor], finite: Tensor, scalars: Tensor, biases: tuple[bool, ...],
                   trace_weighted: bool, backend: str) -> None:
    """Factor EMAs of each layer ``j`` (K-FAC-expand, DESIGN §1): ``A <- β A + α_A ĀᵀĀ``,
    ``G <- β G + α_G ĜᵀĜ`` with ``(β, α_A, α_G) = scalars[3j:3j+3]``; TEKFAC weights the rows
    by ``‖ĝ‖²`` and ``‖ā‖²`` (Gao et al. 2020)."""
    for j, (A, G, a, g) in enumerate(zip(in_factors, out_factors, inputs, grad_outputs)):
        w_in = w_out = None
        if trace_weighted:
            w_in, w_out = trace_weights(a, g, A.dtype, biases[j])
        batch_a = ops.factor_update(torch.empty_like(A), a, alpha=1.0, beta=0.0, bias=biases[j], weights=w_in,
                                    backend=backend)
        batch_g = ops.factor_update(torch.empty_like(G), g, alpha=1.0, beta=0.0, bias=False, weights=w_out,
                                    backend=backend)
        _ema(A, batch_a, scalars[3 * j], scalars[3 * j + 1], finite)
        _ema(G, batch_g, scalars[3 * j], scalars[3 * j + 2], finite)


def update_scalings(scalings: list[Tensor], grad_outputs: list[Tensor], inputs: list[Tensor],
                    q_outs: list[Tensor], q_ins: list[Tensor], finite: Tensor, scalars: Tensor,
                    biases: tuple[bool, ...], per_position: bool, backend: str) -> None:
    """EKFAC's scaling EMA of each layer ``j`` (George et al. 2018, Eq. 9-10):
    ``S <- β S + α Σ_n ((Q_outᵀ ĝ_n)(Q_inᵀ ā_n)ᵀ)²`` with ``(β, α) = scalars[2j:2j+2]``;
    ``per_position`` treats positions as examples."""
    for j, (S, g, a) in enumerate(zip(scalings, grad_outputs, inputs)):
        if per_position:
            g, a = g.reshape(-1, 1, g.shape[-1]), a.reshape(-1, 1, a.shape[-1])
        batch = ops.per_example_scaling(torch.empty_like(S), g, a, q_outs[j], q_ins[j], alpha=1.0, beta=0.0,
                                        bias=biases[j], backend=backend)
        _ema(S, batch, scalars[2 * j], scalars[2 * j + 1], finite)


class LayerSpec(NamedTuple):
    """The constant description of one layer in :func:`precondition_and_update`."""

    weight_shape: tuple[int, ...]
    d_out: int
    d_in: int
    bias: bool
    group: int          # index of its parameter group
    mode: str           # "plain" (no curvature yet), "fixed" (S as is), "batch" (S updated first)
    effective_damping: bool


def _precondition(G: Tensor, q_out: Tensor, q_in: Tensor, S: Tensor, damping: Tensor, beta: Tensor,
                  alpha_n: Tensor, spec: LayerSpec, finite: Tensor, backend: str) -> Tensor:
    G = G.to(q_in.dtype)
    # TEKFAC's effective damping max(mean Θ, λ) (Gao et al. 2020, Eq. 3.5), from S before its update
    damp = S.mean().clamp_min(damping.to(S.dtype)) if spec.effective_damping else damping
    if spec.mode == "batch":  # EKFAC's batch scaling: S <- β S + α N P², then divide by it
        P = q_out.T @ G @ q_in
        S_new = S * beta + P.square() * alpha_n
        S.copy_(torch.where(finite, S_new, S))
        return q_out @ (P / (S_new + damp)) @ q_in.T
    return ops.precondition(G, q_out, q_in, S, damp, backend=backend)


def precondition_and_update(weight_grads: list[Tensor], bias_grads: list[Tensor | None], q_outs: list[Tensor | None],
                            q_ins: list[Tensor | None], scalings: list[Tensor | None], params: list[Tensor],
                            grads: list[Tensor], buffers: list[Tensor | None], skips: Tensor, finite: Tensor,
                            scalars: Tensor, layers: tuple[LayerSpec, ...], entries: tuple[tuple[int, int, int], ...],
                            groups: tuple[tuple[float, float], ...], decoupled: bool, kl_clip: float | None,
                            backend: str) -> None:
    """Directions, KL clip and update of one step (DESIGN §1), masked by ``finite``.

    ``scalars``: per group ``g`` its lr and ``1 − lr·weight_decay`` at ``[2g, 2g+1]``, then per
    layer ``j`` its damping and batch-scaling EMA weights ``(β, α·N)`` at ``2·len(groups) + 3j``.
    ``entries[i] = (layer, part, group)`` of ``params[i]``: its direction is part ``part``
    (weight 0, bias 1) of layer ``layer``'s direction, or its gradient when ``layer < 0``.
    ``groups[g] = (momentum, weight_decay)``.
    """
    base = 2 * len(groups)
    directions, terms = [], []
    for j, spec in enumerate(layers):
        G = weight_grads[j].reshape(spec.d_out, -1)
        if spec.bias:
            gb = bias_grads[j]
            gb = torch.zeros(spec.d_out, dtype=G.dtype, device=G.device) if gb is None else gb
            G = torch.cat([G, gb.reshape(-1, 1)], dim=1)
        D = G
        if spec.mode != "plain":
            D = _precondition(G, q_outs[j], q_ins[j], scalings[j], scalars[base + 3 * j], scalars[base + 3 * j + 1],
                              scalars[base + 3 * j + 2], spec, finite, backend)
        directions.append(D)
        terms.append((D, G, scalars[2 * spec.group]))
    scale = kl_clip_scale(terms, kl_clip) if kl_clip is not None else None

    for p, grad, buf, (layer, part, group) in zip(params, grads, buffers, entries):
        momentum, weight_decay = groups[group]
        lr = scalars[2 * group]
        if layer >= 0:
            spec, D = layers[layer], directions[layer]
            d = D[:, : spec.d_in].reshape(spec.weight_shape) if part == 0 else D[:, spec.d_in]
            u = d.to(p.dtype) if scale is None else d.to(p.dtype) * scale.to(p.dtype)
        else:
            u = grad.to(p.dtype)
        start = p
        if weight_decay != 0.0 and decoupled:   # Loshchilov & Hutter: p <- p·(1 − lr·wd) first
            start = p * scalars[2 * group + 1]
        elif weight_decay != 0.0:               # L2: u = d + wd·p
            u = u + p * weight_decay
        if momentum != 0.0:
            m = buf * momentum + u
            buf.copy_(torch.where(finite, m, buf))
            u = m
        p.copy_(torch.where(finite, start - u * lr, p))
    skips.add_((~finite).to(skips.dtype))


# -------------------------------------------------------------------------------------------------
# the driver: gathers the lists and scalars, calls the compiled functions
# -------------------------------------------------------------------------------------------------
class _Scalars:
    """Step-dependent numbers as float64 device vectors (one per use). A vector is rewritten
    only when its values change, by a non-blocking copy from pinned memory: no host sync."""

    def __init__(self, device: torch.device, static: bool) -> None:
        self.device, self.static = device, static
        self.buffers: dict[str, Tensor] = {}
        self.values: dict[str, list[float]] = {}

    def load(self, name: str, values: list[float]) -> Tensor:
        buffer = self.buffers.get(name)
        if buffer is not None and self.values[name] == values:
            return buffer
        if buffer is None or buffer.numel() != len(values):
            buffer = torch.empty(len(values), dtype=torch.float64, device=self.device)
            if self.static:
                torch._dynamo.mark_static_address(buffer)
            self.buffers[name] = buffer
        host = torch.tensor(values, dtype=torch.float64)
        if self.device.type == "cuda":
            buffer.copy_(host.pin_memory(), non_blocking=True)
        else:
            buffer.copy_(host)
        self.values[name] = list(values)
        return buffer


class CompiledStep:
    """Runs the tensor work of :class:`~ekfac_triton.EKFAC`'s step through compiled functions
    (see the module docstring). Created by ``EKFAC(..., compile_step=...)``.

    Args:
        preconditioner: the optimizer's curvature engine (its ``compiled_step`` is set to this).
        options: ``torch.compile`` keyword arguments (see :func:`compile_options`).
    """

    def __init__(self, preconditioner: Preconditioner, options: dict[str, Any]) -> None:
        curvature = preconditioner.config.curvature
        if curvature not in ("ekfac", "kfac", "tekfac"):
            raise ValueError(f"Invalid compile_step with curvature={curvature!r}: the compiled step covers "
                             "'ekfac', 'kfac' and 'tekfac' (MAC has its own fused Triton update)")
        if preconditioner.distributed is not None:
            raise ValueError("Invalid compile_step with a process group: the compiled step is single-process")
        if preconditioner.fisher != "empirical":
            raise ValueError(f"Invalid compile_step with fisher={preconditioner.fisher!r}: the compiled step covers "
                             "the empirical Fisher only (one output-gradient per example)")
        # A whitelist: the compiled functions assume [∇W | ∇b] is the weight's plain reshape and
        # dense inputs (an Embedding's one-hot curvature, for one, is not there)
        other = [f"{layer.name} ({type(layer.adapter.module).__name__})" for layer in preconditioner.layers
                 if type(layer.adapter) not in (LinearAdapter, Conv2dAdapter)]
        if other:
            raise ValueError(f"Invalid compile_step with layers {other}: the compiled step covers nn.Linear and "
                             "nn.Conv2d (exclude the others with params=...)")
        self.pre = preconditioner
        self.options = dict(options)
        self.cudagraphs = self.options.get("mode") in CUDAGRAPH_MODES
        device = preconditioner.device
        self.scalars = _Scalars(device, self.cudagraphs)
        self.skips = torch.zeros((), dtype=torch.int64, device=device)
        self._finite_true = torch.ones((), dtype=torch.bool, device=device)
        self.finite = self._finite_true
        self.examples: dict[PreconditionedLayer, int] = {}
        compile_ = lambda fn: torch.compile(fn, **self.options)  # noqa: E731
        self._all_finite = compile_(all_finite)
        self._update_factors = compile_(update_factors)
        self._update_scalings = compile_(update_scalings)
        self._precondition_and_update = compile_(precondition_and_update)
        if self.cudagraphs:
            self._static(self.skips)
            for layer in preconditioner.layers:
                layer.curvature.install_in_place = True
        preconditioner.compiled_step = self

    def _static(self, *tensors: Tensor | None) -> None:
        """CUDA graphs: tensors the graphs mutate or read every step keep their address."""
        if self.cudagraphs:
            for t in tensors:
                if t is not None:
                    torch._dynamo.mark_static_address(t)

    # -- counters ---------------------------------------------------------------------------------
    def device_skips(self) -> int:
        """Steps skipped on the device so far (reads the counter: one host sync)."""
        return int(self.skips.item())

    def reset_device_skips(self) -> None:
        self.skips.zero_()

    # -- the phases, called by Preconditioner.compute_directions and EKFAC._step --------------------
    def all_finite(self, checks: Sequence[Tensor]) -> Tensor:
        """Whether all of ``checks`` are finite, as a 0-dim device tensor (no sync)."""
        return self._all_finite(list(checks)) if checks else self._finite_true

    def begin(self, finite: Tensor, examples: dict[PreconditionedLayer, int]) -> None:
        """Start a step whose state updates are masked by the device flag ``finite``;
        ``examples``: N per layer (the ``batch`` scaling's weight)."""
        self.finite = finite
        self.examples = examples

    def update_statistics(self, batches: dict[PreconditionedLayer, LayerBatch], decay: float) -> None:
        """The factor EMAs of the layers in ``batches`` (counts advanced eagerly)."""
        if not batches:
            return
        layers = list(batches)
        values = []
        for layer in layers:
            beta, alpha = layer.curvature.next_factor_weights(decay)
            n, r = batches[layer].num_examples, batches[layer].num_positions
            values += [beta, alpha / (n * r), alpha / n]  # as EigenbasisCurvature.update_factors
        curvatures = [layer.curvature for layer in layers]
        self._static(*[t for c in curvatures for t in (c.in_factor, c.out_factor)])
        self._update_factors([c.in_factor for c in curvatures], [c.out_factor for c in curvatures],
                             [batches[layer].a for layer in layers], [batches[layer].g for layer in layers],
                             self.finite, self.scalars.load("factors", values),
                             tuple(c.shape.bias for c in curvatures), isinstance(curvatures[0], TEKFACCurvature),
                             self.pre.backend)

    def after_refresh(self, batches: dict[PreconditionedLayer, LayerBatch], decay: float) -> None:
        """The per-example / per-position scaling EMAs in the current bases."""
        layers = [layer for layer in batches if isinstance(layer.curvature, EigenbasisCurvature)
                  and layer.curvature.estimates_scaling and layer.curvature.scaling_mode != "batch"]
        if not layers:
            return
        values = []
        for layer in layers:
            beta, alpha = layer.curvature.next_scaling_weights(decay)
            values += [beta, alpha / batches[layer].num_examples]  # as EigenbasisCurvature.update_scaling
        curvatures = [layer.curvature for layer in layers]
        self._static(*[t for c in curvatures for t in (c.scaling, c.q_out, c.q_in)])
        self._update_scalings([c.scaling for c in curvatures], [batches[layer].g for layer in layers],
                              [batches[layer].a for layer in layers], [c.q_out for c in curvatures],
                              [c.q_in for c in curvatures], self.finite, self.scalars.load("scalings", values),
                              tuple(c.shape.bias for c in curvatures), curvatures[0].scaling_mode == "per_position",
                              self.pre.backend)

    def update(self, optimizer: torch.optim.Optimizer, directions: list[tuple[PreconditionedLayer, Tensor | None]],
               decoupled: bool) -> None:
        """Precondition, clip and update every parameter of ``optimizer`` with a gradient.

        Args:
            optimizer: the EKFAC optimizer (parameter groups, momentum buffers).
            directions: ``compute_directions``' result: None for a layer to precondition here,
                the gradient matrix for a layer without curvature yet.
            decoupled: decoupled weight decay.
        """
        group_index = {p: g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        decay = self.pre.config.factor_decay
        values = []
        for group in optimizer.param_groups:
            values += [group["lr"], 1.0 - group["lr"] * group["weight_decay"]]
        specs, place = [], {}
        weight_grads, bias_grads, q_outs, q_ins, scalings = [], [], [], [], []
        for j, (layer, matrix) in enumerate(directions):
            a, curv = layer.adapter, layer.curvature
            group = optimizer.param_groups[group_index[a.weight]]
            mode, beta, alpha_n = "plain", 0.0, 0.0
            if matrix is None:
                mode = "fixed"
                if curv.estimates_scaling and curv.scaling_mode == "batch":
                    mode = "batch"
                    beta, alpha = curv.next_scaling_weights(decay)
                    alpha_n = alpha * self.examples[layer]  # as kernels.precondition: α·N
            values += [group["damping"], beta, alpha_n]
            specs.append(LayerSpec(tuple(a.weight.shape), a.d_out, a.d_in, a.bias is not None, group_index[a.weight],
                                   mode, bool(getattr(curv, "effective_damping", False)) and mode != "plain"))
            weight_grads.append(a.weight.grad)
            bias_grads.append(None if a.bias is None else a.bias.grad)
            known = mode != "plain"
            q_outs.append(curv.q_out if known else None)
            q_ins.append(curv.q_in if known else None)
            scalings.append(curv.scaling if known else None)
            for part, p in enumerate(a.params):
                place[p] = (j, part)
        params, grads, buffers, entries = [], [], [], []
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                params.append(p)
                grads.append(p.grad)
                buffers.append(optimizer._momentum_buffer(p) if group["momentum"] != 0 else None)
                entries.append((*place.get(p, (-1, 0)), g))
        groups = tuple((float(group["momentum"]), float(group["weight_decay"])) for group in optimizer.param_groups)
        self._static(*params, *buffers, *q_outs, *q_ins, *scalings)
        self._precondition_and_update(weight_grads, bias_grads, q_outs, q_ins, scalings, params, grads, buffers,
                                      self.skips, self.finite, self.scalars.load("update", values), tuple(specs),
                                      tuple(entries), groups, decoupled, self.pre.config.kl_clip, self.pre.backend)
        self.finite = self._finite_true
