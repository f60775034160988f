"""The step, as a short list of phases over the preconditioned layers:

    collect → check → install finished bases → statistics → refresh → scalings → directions

(the update itself is the caller's: :class:`~ekfac_triton.EKFAC` moves the parameters,
:class:`~ekfac_triton.Preconditioner` rewrites ``.grad``). Two strategies decide how a phase
runs, and no phase branches on them:

* ``execution`` (:mod:`ekfac_triton.step.execution`): eager or compiled tensor work, and where
  the non-finite skip is decided;
* ``distribution`` (:mod:`ekfac_triton.distributed`): a single process, or data-parallel ranks
  that agree on the skip, average the statistics and split the eigendecompositions.

The order makes the exactness contract hold: with ``factor_decay=0, eigen_every=1`` (synchronous)
the direction is exactly ``(F̂ + λI)⁻¹ ∇L`` for this batch's F̂.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..capture import LayerCapture
from ..curvature import Curvature
from ..curvature.base import Direction
from ..eigen_engine import Decomposition, EigenEngine
from ..layers import LayerAdapter, LayerBatch
from . import maths
from .execution import Eager


@dataclass(eq=False)
class PreconditionedLayer:
    """One preconditioned module: its adapter, capture and curvature state."""

    name: str
    adapter: LayerAdapter
    capture: LayerCapture
    curvature: Curvature
    warned: bool = field(default=False)


@dataclass
class StepPlan:
    """What the update needs after the statistics phases: per layer with a gradient its
    direction job (None: the caller applies the curvature in a fused update), the job scalars so
    far, and the mask flag of the state updates (None: unmasked)."""

    layers: list[PreconditionedLayer]
    jobs: list[Any]
    scalars: list[float]
    finite: Tensor | None


class StepEngine:
    """The phased step (see the module docstring); :class:`~ekfac_triton.Preconditioner` builds it.

    Subclasses set, before the first step: ``layers``, ``eigen`` (:class:`EigenEngine`),
    ``distribution``, ``config`` (:class:`~ekfac_triton.config.PreconditionerConfig`), ``backend``
    and ``device``.
    """

    layers: list[PreconditionedLayer]
    eigen: EigenEngine
    distribution: Any
    execution: Eager
    backend: str
    device: torch.device

    def _init_counts(self) -> None:
        self.steps = 0
        self._host_skipped_steps = 0  # skips decided on the host (see skipped_steps)
        self._curvature_passes = 0
        self.execution = Eager()

    # -- counters -------------------------------------------------------------------------------
    @property
    def statistics_due(self) -> bool:
        """Whether the next step updates the statistics (every ``factor_every`` steps)."""
        return self.steps % self.config.factor_every == 0

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite values: those decided on the host (with a warning) plus,
        with ``compile_step``, those the compiled step skipped on the device (reading that counter
        is one host sync)."""
        return self._host_skipped_steps + self.execution.device_skips()

    def skip_step(self) -> None:
        """Count a skipped step and drop what was captured for it; nothing else changes (used
        when a GradScaler found non-finite gradients, and by the non-finite skip policy)."""
        self._host_skipped_steps += 1
        self._arm_capture()

    def _arm_capture(self) -> None:
        """Capture inputs and output-gradients only before steps that update statistics."""
        enabled = self.statistics_due
        self._curvature_passes = 0
        empirical = self.config.fisher.fisher == "empirical"
        for layer in self.layers:
            layer.capture.clear()
            layer.capture.enabled = enabled
            layer.capture.keep_loss_grads = empirical
            layer.capture.keep_outputs = not empirical

    # -- the step -----------------------------------------------------------------------------
    # Always eager, also inside ``torch.compile(opt.step)``: dynamo's trace of this orchestration
    # (Python counters, attribute re-binding at refreshes, graph breaks at eigh) diverged from eager
    # at the second step (torch 2.13); ``compile_step`` compiles the phase functions instead.
    @torch.compiler.disable
    @torch.no_grad()
    def advance(self, damping_of: Callable[[PreconditionedLayer], float], also_check: Sequence[Tensor] = (),
                fused: Callable[[PreconditionedLayer], bool] | None = None) -> StepPlan | None:
        """Advance the statistics by one step and plan the directions; None when the step is
        skipped. Layers for which ``fused`` says True (after their statistics and refresh) get
        no direction job: the caller applies their curvature inside its own update.

        Skip policy: if any gradient of a preconditioned layer, any tensor of ``also_check`` or
        any captured statistic is not finite, nothing changes (factors, bases, scalings, step
        count), a warning is issued and None is returned (the compiled step may instead mask the
        updates on the device: :mod:`ekfac_triton.step.execution`).
        """
        stats_step = self.statistics_due
        grads = {layer: layer.adapter.grad_matrix() for layer in self.layers if layer.adapter.has_grad()}
        batches = self._collect(grads) if stats_step else {}
        examples = [layer.adapter.num_examples(layer.capture.input_shape) if layer in grads else 0
                    for layer in self.layers]
        finite, examples = self._check(grads, batches, also_check, examples)
        if finite is None:
            return None
        mask = self.execution.finite_flag(finite) if isinstance(finite, Tensor) else None
        if self._on_host:
            self._install_finished()
        weights = {layer: batches[layer].num_examples / examples[i] for i, layer in enumerate(self.layers)
                   if layer in batches}  # data-parallel: N_rank / N, the averaged EMA is that of all ranks
        decay = self.config.factor_decay
        scalars: list[float] = []
        jobs = [layer.curvature.statistics_job(batch, decay, scalars) for layer, batch in batches.items()]
        self._run_jobs("factors", maths.update_factors, jobs, scalars, mask,
                       [(weights[layer], layer.curvature.statistics()) for layer in batches])
        self._refresh(grads)
        scalars = []
        jobs = [layer.curvature.scaling_job(batch, decay, scalars) for layer, batch in batches.items()]
        self._run_jobs("scalings", maths.update_scalings, jobs, scalars, mask,
                       [(weights[layer], layer.curvature.refreshed_statistics()) for layer in batches])
        plan = self._plan_directions(grads, examples, damping_of, fused, mask)
        self.steps += 1
        self._arm_capture()
        return plan

    def _collect(self, grads: dict[PreconditionedLayer, Tensor]) -> dict[PreconditionedLayer, LayerBatch]:
        """Phase 1: each layer's captured batch (:meth:`_batches`)."""
        return self._batches([layer for layer in self.layers if layer in grads])

    def _check(self, grads: dict[PreconditionedLayer, Tensor], batches: dict[PreconditionedLayer, LayerBatch],
               also_check: Sequence[Tensor], examples: list[int]) -> tuple[bool | Tensor | None, list[int]]:
        """Phase 2: the non-finite check (None: the step is skipped, counted and warned)."""
        checks = list(grads.values()) + [t for t in also_check if t is not None]
        checks += [t for b in batches.values() for t in (b.a, b.g, b.token_weights) if t is not None]
        agreement = self.distribution.agree(self.execution.all_finite(checks, self.device), examples)
        finite, examples = agreement.finite, agreement.examples
        self._on_host = self.execution.decides_on_host(self._special_step(grads, batches))
        if self._on_host and not bool(finite):
            self.skip_step()
            warnings.warn("ekfac_triton: non-finite gradient or activation; step skipped, optimizer state unchanged",
                          RuntimeWarning, stacklevel=4)
            return None, examples
        return finite, examples

    def _special_step(self, grads: dict[PreconditionedLayer, Tensor],
                      batches: dict[PreconditionedLayer, LayerBatch]) -> bool:
        """Whether this step refreshes a basis, has a finished asynchronous one to install, or
        makes a layer's first factor or scaling update since the start or a refresh (that EMA
        update replaces the state: a device-side skip would still count it, and the next update
        would then mix the replaced state in with weight β instead of 0). The compiled step
        decides a non-finite skip on the host on such steps."""
        if not self.execution.compiled:
            return True
        if self.eigen.ready() or any(layer.curvature.first_update_due() for layer in batches):
            return True
        return any(self._refresh_due(index, layer, grads, batches) for index, layer in enumerate(self.layers))

    def _refresh_due(self, index: int, layer: PreconditionedLayer, grads: dict, batches: dict) -> bool:
        curv = layer.curvature
        return (layer in grads and (curv.has_statistics or layer in batches)
                and curv.refresh_due(self.eigen, index, self.steps))

    def _install_finished(self) -> None:
        """Phase 3: the bases the asynchronous worker has finished (data-parallel: those submitted
        on the last step, broadcast by their owners)."""
        for index, result in self.distribution.finished(self.eigen, self._factors_of).items():
            self._install(self.layers[index], result)

    def _factors_of(self, index: int) -> tuple[Tensor, Tensor]:
        curv = self.layers[index].curvature
        return curv.in_factor, curv.out_factor

    def _run_jobs(self, name: str, fn: Callable[..., None], jobs: list[Any], scalars: list[float],
                  mask: Tensor | None, averaged: list[tuple[float, tuple[Tensor, ...]]]) -> None:
        """Phases 4 and 6: run one phase's jobs in one call (one compiled graph), then average
        what they updated over the ranks (``averaged``: ``(weight, tensors)`` per layer)."""
        jobs = [job for job in jobs if job is not None]
        if jobs:
            self.execution.mark_static(*[t for job in jobs for t in state_tensors(job)])
            self.execution.run(fn, jobs, self.execution.scalars(name, scalars), mask, self.backend)
        self.distribution.average([t for _, ts in averaged for t in ts], [w for w, ts in averaged for _ in ts])

    def _refresh(self, grads: dict[PreconditionedLayer, Tensor]) -> None:
        """Phase 5: refresh what is due on this step (a layer's first eigenbasis always
        synchronously); the distribution strategy runs the requested decompositions."""
        requests = []
        for index, layer in enumerate(self.layers):
            curv = layer.curvature
            if layer in grads and curv.has_statistics and curv.refresh_due(self.eigen, index, self.steps):
                request = curv.refresh(self.eigen, index)
                if request is not None:
                    requests.append(request)
        for index, result in self.distribution.refresh(requests, self.eigen).items():
            self._install(self.layers[index], result)

    def _plan_directions(self, grads: dict[PreconditionedLayer, Tensor], examples: list[int],
                         damping_of: Callable[[PreconditionedLayer], float],
                         fused: Callable[[PreconditionedLayer], bool] | None, mask: Tensor | None) -> StepPlan:
        """Phase 7: each layer's direction job (``batch`` scaling: N of the averaged gradient)."""
        scalars: list[float] = []
        layers, jobs = [], []
        for index, layer in enumerate(self.layers):
            if layer not in grads:
                continue
            curv = layer.curvature
            if not curv.has_statistics:  # never seen a statistics step: no curvature yet
                job = Direction(grads[layer])
            elif fused is not None and fused(layer):
                job = None
            else:
                job = curv.direction_job(grads[layer], damping_of(layer), examples[index], self.config.factor_decay,
                                         scalars)
            layers.append(layer)
            jobs.append(job)
        return StepPlan(layers, jobs, scalars, mask)

    def _install(self, layer: PreconditionedLayer, result: Decomposition) -> None:
        note = layer.curvature.install(result)
        if note:
            self._warn(layer, note)

    def _warn(self, layer: PreconditionedLayer, note: str) -> None:
        if not layer.warned:
            layer.warned = True
            warnings.warn(f"ekfac_triton: eigendecomposition of layer {layer.name!r}: {note} "
                          "(warned once per layer)", RuntimeWarning, stacklevel=4)

    # -- phase 1 in detail: the captured batches ---------------------------------------------------------
    def _capture_unscale(self) -> float | None:
        """1 / the loss scale the captured output-gradients carry (None: no GradScaler)."""
        scaler = self.config.statistics.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return 1.0 / scaler.get_scale()

    def _batches(self, active: list[PreconditionedLayer]) -> dict[PreconditionedLayer, LayerBatch]:
        batches = {}
        unscale = self._capture_unscale() if active else None
        empirical = self.config.fisher.fisher == "empirical"
        for layer in active:
            cap = layer.capture
            if cap.completed == 0:
                raise RuntimeError(f"ekfac_triton: no input/output-gradient was captured for layer {layer.name!r} "
                                   "since the last step; run the forward and backward of the batch between steps")
            if cap.completed > 1:
                raise RuntimeError(f"ekfac_triton: layer {layer.name!r} ran {cap.completed} times with a backward since "
                                   "the last step (shared weights or gradient accumulation), which this version does "
                                   "not model; call step() after each forward/backward")
            if not empirical:
                batches[layer] = self._curvature_batch(layer)
                continue
            grad_output = None if layer.curvature.inputs_only else cap.grad_output
            if unscale is not None and grad_output is not None:
                # in float32 at least: fp16 would overflow (times N) or underflow
                grad_output = grad_output.to(torch.promote_types(grad_output.dtype, torch.float32)) * unscale
            batches[layer] = layer.adapter.batch(cap.inputs, grad_output, cap.record)
        return batches

    def _curvature_batch(self, layer: PreconditionedLayer) -> LayerBatch:
        """The batch of an mc/type-2 statistics step: the curvature passes' output-gradients
        (unscaled: those passes never carry a GradScaler's scale)."""
        cap = layer.capture
        fisher = self.config.fisher.fisher
        if self._curvature_passes == 0:
            raise RuntimeError(f"ekfac_triton: fisher={fisher!r} needs a curvature backward on every statistics "
                               "step: call opt.backward(output, target), or opt.curvature_backward(output) before "
                               "loss.backward()")
        if len(cap.curvature_grads) != self._curvature_passes:
            raise RuntimeError(f"ekfac_triton: layer {layer.name!r} received {len(cap.curvature_grads)} output-gradients "
                               f"in {self._curvature_passes} curvature backward passes (a module run several times, or "
                               "not at all, in the forward), which this version does not model")
        batch = layer.adapter.batch_draws(cap.inputs, cap.curvature_grads)
        cap.curvature_grads = []  # the batch holds them now (stacked): do not keep both until the step ends
        return batch


def state_tensors(job: Any) -> list[Tensor]:
    """The state tensors a job updates or reads every step (CUDA graphs keep their addresses):
    its fields other than the batch's own tensors."""
    batch_fields = {"a", "g", "grad", "token_weights"}
    return [getattr(job, name) for name in job._fields
            if name not in batch_fields and isinstance(getattr(job, name), Tensor)]
