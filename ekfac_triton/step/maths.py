"""The step's tensor work, written once: pure functions of tensors, called eagerly or under
``torch.compile`` (:mod:`ekfac_triton.step.execution`).

Every step-varying number (EMA weights, lr, damping) is an element of ``scalars``: a list of
Python floats in the eager step, a float64 device vector in the compiled one, so the compiled
graphs depend only on the model's shapes and the constant settings (a refresh changes the
*values* of bases and scalings, not the graphs). ``finite`` is None in the eager step (which
decides a non-finite skip on the host before any update) and a 0-dim bool tensor in the compiled
one, where each state update is ``where(finite, new, old)`` (:func:`ekfac_triton.ops.commit`).

The per-layer work is a *job* handed out by the layer's curvature
(:mod:`ekfac_triton.curvature`): a ``NamedTuple`` whose ``run(scalars, finite, backend)`` does it.
Each function below is one phase of the step over all layers, and one compiled graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import ops
from ..layers.base import MatrixLayout

#: ``scalars``: a list of floats (eager) or a float64 device vector (compiled)
Scalars = Any

#: Whether the step's phases open ``torch.profiler.record_function`` ranges (``ekfac::<phase>``,
#: read by ``bench.cost_model``). Off by default: entering a range costs a few microseconds even
#: with no profiler running, so the ordinary step enters none.
PROFILE_RANGES = False
#: The names :func:`profile_range` is called with, in step order (the cost model's parts).
RANGES = ("collect", "check", "install", "factors", "refresh", "scalings", "plan", "directions", "direction",
          "finite_check", "update")
_NO_RANGE = contextlib.nullcontext()


def profile_range(name: str) -> contextlib.AbstractContextManager[Any]:
    """A profiler range ``ekfac::<name>`` around one phase of the step when
    :data:`PROFILE_RANGES` is set (never inside ``torch.compile``: the compiled graphs are left as
    they are); otherwise a no-op context."""
    if not PROFILE_RANGES or torch.compiler.is_compiling():
        return _NO_RANGE
    return torch.profiler.record_function("ekfac::" + name)


def all_finite(tensors: list[Tensor], device: torch.device | None = None) -> Tensor:
    """A 0-dim bool tensor: whether every element of every tensor is finite (True for none:
    then on ``device``).

    From each floating tensor's largest and smallest element: ``amax`` propagates NaN and shows
    +inf, ``amin`` shows -inf, so both are finite exactly when every element is. Two reductions
    without a temporary, about 15x cheaper than ``isfinite(t).all()`` on CPU; integer tensors
    (token indices) are finite by construction.
    """
    extremes: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        if t.is_floating_point() and t.numel():
            extremes.setdefault(t.dtype, []).extend((t.amax(), t.amin()))
    if not extremes:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else device)
    flags = [torch.isfinite(torch.stack(values)).all() for values in extremes.values()]
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def update_factors(jobs: list[Any], scalars: Scalars, finite: Tensor | None, backend: str) -> None:
    """The statistics phase: each layer's factor EMAs (George et al. 2018, Alg. 1)."""
    for job in jobs:
        job.run(scalars, finite, backend)


def update_scalings(jobs: list[Any], scalars: Scalars, finite: Tensor | None, backend: str) -> None:
    """The scalings phase: what each layer measures in its current basis (EKFAC's S, Eq. 9-10)."""
    for job in jobs:
        job.run(scalars, finite, backend)


def kl_clip_scale(terms: Iterable[tuple[Tensor, Tensor, Any]], kl_clip: float) -> Tensor | None:
    """KL-clip factor ``ν = min(1, sqrt(kl_clip / |Σ lr² ⟨v, g⟩|))`` over the preconditioned
    layers (Ba et al. 2017; kfac-pytorch's semantics), as a 0-dim tensor: no host sync.

    Args:
        terms: ``(v, g, lr)`` per layer: preconditioned direction, raw gradient, learning rate.
        kl_clip: the trust-region size.
    """
    total = None
    for v, g, lr in terms:
        term = (v * g.to(v.dtype)).sum() * (lr * lr)
        total = term if total is None else total + term
    if total is None:
        return None
    # |total| = 0 gives inf, clamped to 1: no clipping of a zero step.
    return torch.sqrt(kl_clip / total.abs()).clamp(max=1.0)


def directions(jobs: Sequence[Any], scalars: Scalars, finite: Tensor | None, backend: str,
               kl_clip: float | None = None, lr_at: Sequence[int] = ()) -> tuple[list[Tensor], Tensor | None]:
    """Each layer's preconditioned direction and, with ``kl_clip``, the KL-clip factor (``lr_at``:
    per job, the index of its group's lr in ``scalars``)."""
    with profile_range("directions"):
        out = []
        for job in jobs:
            with profile_range("direction"):
                out.append(job.run(scalars, finite, backend))
        scale = None
        if kl_clip is not None:
            scale = kl_clip_scale(((d, job.grad, scalars[at]) for d, job, at in zip(out, jobs, lr_at)), kl_clip)
    return out, scale


class GroupUpdate(NamedTuple):
    """The parameter update of one parameter group: ``params[i]`` moves along part
    ``parts[i] = (job, part)`` of a layer's direction (weight 0, bias 1), or along its own
    gradient where ``job < 0``; ``lr = scalars[lr_at]``."""

    params: list[Tensor]
    grads: list[Tensor]
    buffers: list[Tensor | None]
    parts: tuple[tuple[int, int], ...]
    lr_at: int
    momentum: float
    weight_decay: float

    def tensors(self) -> list[Tensor]:
        """The parameters and buffers the update changes in place."""
        return [t for t in (*self.params, *self.buffers) if t is not None]


class AdamWUpdate(NamedTuple):
    """The ``plain_update="adamw"`` update of one group's parameters without curvature: AdamW
    in ``torch.optim.AdamW``'s arithmetic (:func:`ekfac_triton.ops.adamw_update`); ``lr =
    scalars[lr_at]``, parameter i's step size and ``√(1 − β2ᵗ)`` are ``scalars[at[i]]`` and
    ``scalars[at[i] + 1]``."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    lr_at: int
    at: tuple[int, ...]
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    def tensors(self) -> list[Tensor]:
        """The parameters and moments the update changes in place."""
        return [*self.params, *self.exp_avgs, *self.exp_avg_sqs]


def update_parameters(directions: list[Tensor], scale: Tensor | None, layouts: tuple[MatrixLayout, ...],
                      groups: list[GroupUpdate | AdamWUpdate], scalars: Scalars, finite: Tensor | None, skips: Tensor | None,
                      decoupled: bool, backend: str) -> None:
    """The update phase: per group weight decay, momentum and ``p -= lr·m`` along each layer's
    direction (``layouts[j]``: where job j's parameters sit in its direction matrix) or, where a
    parameter has no layer, its gradient (an :class:`AdamWUpdate` group: AdamW on those). ``skips``
    (compiled step): device counters of the steps ``finite`` skipped, ``[in all, in a row]`` (the
    second is reset by a step that commits)."""
    with profile_range("update"):
        _update_groups(directions, scale, layouts, groups, scalars, finite, decoupled, backend)
    if skips is not None and finite is not None:
        skipped = (~finite).to(skips.dtype)
        skips.copy_(torch.stack((skips[0] + skipped, (skips[1] + 1) * skipped)))


def _update_groups(directions: list[Tensor], scale: Tensor | None, layouts: tuple[MatrixLayout, ...],
                   groups: list[GroupUpdate | AdamWUpdate], scalars: Scalars, finite: Tensor | None,
                   decoupled: bool, backend: str) -> None:
    for group in groups:
        if isinstance(group, AdamWUpdate):
            ops.adamw_update(group.params, group.grads, group.exp_avgs, group.exp_avg_sqs, lr=scalars[group.lr_at],
                             step_sizes=[scalars[i] for i in group.at], bias2_sqrts=[scalars[i + 1] for i in group.at],
                             beta1=group.beta1, beta2=group.beta2, eps=group.eps, weight_decay=group.weight_decay,
                             finite=finite)
            continue
        updates, scales = [], []
        for grad, (j, part) in zip(group.grads, group.parts):
            if j < 0:
                updates.append(grad)
                scales.append(None)
            else:
                updates.append(layouts[j].part(directions[j], part))
                scales.append(scale)
        ops.moment_update(group.params, updates, group.buffers, lr=scalars[group.lr_at], momentum=group.momentum,
                          weight_decay=group.weight_decay, scales=scales, decoupled=decoupled, finite=finite,
                          backend=backend)


def precondition_and_update(jobs: list[Any], layouts: tuple[MatrixLayout, ...], groups: list[GroupUpdate | AdamWUpdate],
                            scalars: Scalars, finite: Tensor, skips: Tensor, kl_clip: float | None,
                            lr_at: tuple[int, ...], decoupled: bool, backend: str) -> None:
    """:func:`directions` then :func:`update_parameters` in one graph (the compiled step), the
    update masked by ``finite`` and by the directions' own finiteness."""
    dirs, scale = directions(jobs, scalars, finite, backend, kl_clip, lr_at)
    if dirs:
        finite = finite & all_finite(dirs)
    update_parameters(dirs, scale, layouts, groups, scalars, finite, skips, decoupled, backend)
