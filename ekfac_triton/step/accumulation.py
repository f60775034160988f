"""Gradient accumulation in the step (ARCHITECTURE.md, "Gradient accumulation"): several backward
passes before a step. :meth:`AccumulationSteps.fold`, called by each layer's capture from the
backward, folds a micro-batch into running sums (:class:`Accumulation`), whose size does not depend
on the number of micro-batches; the step's statistics and scalings phases then update the EMAs
from those sums. :class:`~ekfac_triton.step.engine.StepEngine` takes these methods as a base: they
read its ``layers``, ``eigen``, ``distribution``, ``steps``, ``device`` and ``_capture_unscale``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .engine import PreconditionedLayer


@dataclass(eq=False)
class Accumulation:
    """The micro-batches of one step folded so far (ARCHITECTURE.md, "Gradient accumulation").

    ``sums``: the curvature's running sums (:meth:`Curvature.fold`), whose size does not depend on
    the number of micro-batches; ``kept``: the raw captures ``(inputs, grad_output, record,
    versions)`` kept for the per-example projections when the basis may change on this step
    (together one full batch); ``basis``: the basis the folded projections were taken in;
    ``num_examples``: the local N of the step, set at collect."""

    sums: dict[str, Any] = field(default_factory=dict)
    kept: list[tuple[Tensor, Tensor | None, Any, tuple[int, int | None]]] = field(default_factory=list)
    basis: Any = None
    num_examples: int = 0
    #: whether the micro-batches were folded without knowing a loss scale (no ``grad_scaler=``)
    folded_unscaled: bool = False

    def tensors(self) -> list[Tensor]:
        """What the step's non-finite check reads."""
        return [t for t in self.sums.values() if isinstance(t, Tensor)] + [
            t for kept in self.kept for t in kept[:2] if t is not None]


class AccumulationSteps:
    """The step's methods for accumulated micro-batches (see the module docstring)."""

    def _basis_may_change(self, layer: PreconditionedLayer) -> bool:
        """Whether the layer's basis may be replaced before the scalings phase of the next step: a
        synchronous refresh due then (the first basis included), or an asynchronous one in flight
        (installed at the start of the step)."""
        index = self.layers.index(layer)
        return (layer.curvature.basis_changes(self.eigen, index, self.steps) or self.eigen.in_flight(index)
                or index in getattr(self.distribution, "in_flight", {}))

    @torch.no_grad()
    def fold(self, layer: PreconditionedLayer, inputs: Tensor, grad_output: Tensor | None, record: Any,
             copy: bool) -> None:
        """Fold one micro-batch of ``layer`` into its running sums (called by the capture, from
        the backward; ``copy``: the tensors belong to a compiled graph and must be copied to be
        kept). Its per-example projections are folded too when the basis of the next scalings phase
        is the current one; otherwise the micro-batch's capture is kept for that phase."""
        curv = layer.curvature
        acc = layer.accumulation
        if acc is None:
            acc = layer.accumulation = Accumulation()
        n = layer.adapter.num_examples(inputs.shape)
        unscale = self._capture_unscale()
        acc.folded_unscaled |= unscale is None
        fresh = unscale is not None and grad_output is not None  # the unscaled copy is a new tensor
        grad_output = None if curv.inputs_only else unscaled(grad_output, unscale)
        project = curv.projects_examples
        keep = project and self._basis_may_change(layer)
        with torch.autocast(self.device.type, enabled=False):
            batch = layer.adapter.batch(inputs, grad_output, record)
            curv.fold(acc.sums, batch, n, factors=True, scaling=project and not keep)
        if project and not keep:
            acc.basis = curv.basis_token()
        if keep:
            if copy:  # the compiled graph may reuse these buffers once the stash op returns
                inputs = inputs.clone()
                grad_output = None if grad_output is None or fresh else grad_output.clone()
            versions = (inputs._version, None if grad_output is None else grad_output._version)
            acc.kept.append((inputs, grad_output, record, versions))

    def _check_kept(self, layer: PreconditionedLayer) -> None:
        """Raise if a kept micro-batch was modified in place before the step (as a kept pair)."""
        for inputs, grad_output, _, (v_in, v_out) in layer.accumulation.kept:
            if inputs._version != v_in or (grad_output is not None and grad_output._version != v_out):
                raise RuntimeError(f"ekfac_triton: a micro-batch captured for layer {layer.name!r} was modified in "
                                   "place between its backward() and step(); the statistics would silently change. "
                                   "Do not overwrite the batches (or their gradients) before step()")

    def _accumulated_scaling_job(self, layer: PreconditionedLayer, acc: Accumulation, decay: float,
                                 scalars: list[float]) -> Any:
        """Phase 6 for an accumulated layer: the kept micro-batches' projections in the basis in use
        now (folded one at a time, each dropped after), then the scaling EMA from the sums."""
        curv = layer.curvature
        if curv.projects_examples:
            if acc.basis is not None and not _same_basis(acc.basis, curv.basis_token()):
                raise RuntimeError(f"ekfac_triton: internal error: the basis of layer {layer.name!r} changed after "
                                   "its micro-batches were projected into it")
            while acc.kept:
                inputs, grad_output, record, _ = acc.kept.pop(0)
                with torch.autocast(self.device.type, enabled=False):
                    batch = layer.adapter.batch(inputs, grad_output, record)
                    curv.fold(acc.sums, batch, layer.adapter.num_examples(inputs.shape), factors=False, scaling=True)
        return curv.accumulated_scaling_job(acc.sums, acc.num_examples, decay, scalars)


def fold_hook(engine: weakref.ref, layer: PreconditionedLayer, inputs: Tensor, grad_output: Tensor | None, record: Any,
          copy: bool) -> None:
    """The capture's ``fold`` (a weak reference: the model's hooks do not keep the optimizer alive)."""
    owner = engine()
    if owner is not None:
        owner.fold(layer, inputs, grad_output, record, copy)


def unscaled(grad_output: Tensor | None, unscale: float | None) -> Tensor | None:
    """The captured output-gradient without the GradScaler's loss scale (``unscale`` = 1/scale;
    None: no scale), in float32 at least: fp16 would overflow (times N) or underflow."""
    if unscale is None or grad_output is None:
        return grad_output
    return grad_output.to(torch.promote_types(grad_output.dtype, torch.float32)) * unscale


def _same_basis(a: Any, b: Any) -> bool:
    """Whether two :meth:`Curvature.basis_token` results are the same tensors at the same versions."""
    return (a is None) == (b is None) and (a is None or (len(a) == len(b) and all(
        x is y and vx == vy for (x, vx), (y, vy) in zip(a, b))))
