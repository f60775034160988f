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
from ..curvature.eigenbasis import EigenbasisCurvature
from ..distributed import SingleProcess
from ..eigen_engine import Decomposition, EigenEngine
from ..layers import LayerAdapter, LayerBatch
from . import maths
from .execution import Eager
from .jobs import mutated, state_tensors
from .rows import GradientWitness, rows_match
from .transaction import Transaction


@dataclass(eq=False)
class PreconditionedLayer:
    """One preconditioned module: its adapter, capture and curvature state."""

    name: str
    adapter: LayerAdapter
    capture: LayerCapture
    curvature: Curvature
    warned: bool = field(default=False)
    #: the guard of the projected gradient's row form (:mod:`ekfac_triton.step.rows`)
    witness: GradientWitness | None = field(default=None)


@dataclass
class StepPlan:
    """What the update needs after the statistics phases: per layer with a gradient its
    direction job (None: the caller applies the curvature in a fused update), the job scalars so
    far, and the mask flag of the state updates (None: unmasked)."""

    layers: list[PreconditionedLayer]
    jobs: list[Any]
    scalars: list[float]
    finite: Tensor | None
    #: the step's undo record, open until ``finish``
    transaction: Transaction | None = None
    #: whether ``check`` decides on the host (the compiled step's ordinary steps do not)
    host_check: bool = True
    #: set by ``finish`` once the step is counted
    committed: bool = False


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
    #: the generator of the row form's probe vectors (created at first use, seed 0)
    _rows_generator: torch.Generator | None = None

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

    def discard_capture(self) -> None:
        """Drop what was captured since the last step (a step that raised before it began)."""
        self._arm_capture()

    def _arm_capture(self) -> None:
        """Capture inputs and output-gradients only before steps that update statistics."""
        enabled = self.statistics_due
        self._curvature_passes = 0
        empirical = self.config.fisher.fisher == "empirical"
        rows = self.config.statistics.projected_gradient != "gradient"
        for layer in self.layers:
            if rows and layer.witness is None and isinstance(layer.curvature, EigenbasisCurvature):
                layer.witness = GradientWitness(layer.adapter.params)
            if layer.witness is not None:
                layer.witness.reset()
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
        skipped. The step stays open until :meth:`finish` (or :meth:`abort`): the caller runs
        the directions, hands them to :meth:`check`, updates only if it returns True, then
        finishes.
        Layers for which ``fused`` says True (after their statistics and refresh) get no
        direction job: the caller applies their curvature inside its own update.

        Skip policy: if any gradient of a preconditioned layer, any tensor of ``also_check``, any
        captured statistic, or anything the step produces (factors, scalings, eigenvalues,
        directions) is not finite, nothing changes (factors, bases, scalings, counts), a warning
        is issued and the step is skipped; one host sync decides it, at :meth:`check` (earlier
        on steps that refresh or install a basis, which sync anyway). The compiled step may
        instead mask the updates on the device (:mod:`ekfac_triton.step.execution`). Any
        exception inside the step undoes it as well.
        """
        tx = Transaction([layer.curvature for layer in self.layers], self.eigen, self.distribution)
        try:
            plan = self._advance(tx, damping_of, also_check, fused)
        except BaseException:
            self.abort(tx)
            raise
        if plan is None:
            self.abort(tx, skipped=True)
        return plan

    def _advance(self, tx: Transaction, damping_of: Callable[[PreconditionedLayer], float],
                 also_check: Sequence[Tensor], fused: Callable[[PreconditionedLayer], bool] | None) -> StepPlan | None:
        stats_step = self.statistics_due
        grads = {layer: layer.adapter.grad_matrix() for layer in self.layers if layer.adapter.has_grad()}
        batches = self._collect(grads) if stats_step else {}
        examples = [layer.adapter.num_examples(layer.capture.input_shape) if layer in grads else 0
                    for layer in self.layers]
        checked = self._check(tx, grads, batches, also_check, examples)
        if checked is None:
            return None
        finite, examples, early, special = checked
        mask = self.execution.finite_flag(finite) if isinstance(finite, Tensor) else None
        if early:
            self._install_finished(tx)
        weights = {layer: batches[layer].num_examples / examples[i] for i, layer in enumerate(self.layers)
                   if layer in batches}  # data-parallel: N_rank / N, the averaged EMA is that of all ranks
        decay = self.config.factor_decay
        scalars: list[float] = []
        jobs = [layer.curvature.statistics_job(batch, decay, scalars) for layer, batch in batches.items()]
        self._run_jobs(tx, "factors", maths.update_factors, jobs, scalars, mask,
                       [(weights[layer], layer.curvature.statistics()) for layer in batches])
        due = self._due(grads)
        if early and due and not self._produced_finite(tx):
            return None  # an overflowing statistic: caught before it reaches an eigendecomposition
        self._refresh(tx, due)
        self._exact_rows(grads, batches)
        scalars = []
        jobs = [layer.curvature.scaling_job(batch, decay, scalars) for layer, batch in batches.items()]
        self._run_jobs(tx, "scalings", maths.update_scalings, jobs, scalars, mask,
                       [(weights[layer], layer.curvature.refreshed_statistics()) for layer in batches])
        plan = self._plan_directions(grads, examples, damping_of, fused, mask)
        tx.before_update(t for job in plan.jobs if job is not None for t in mutated(job))
        plan.transaction = tx
        plan.host_check = self.execution.checks_at_end(special)
        return plan

    def check(self, plan: StepPlan, directions: Sequence[Tensor] = ()) -> bool:
        """Check the step of ``plan``: its inputs (if not checked yet), what it produced and
        ``directions`` for finiteness (one host sync; none on the compiled step's ordinary steps);
        if any is not, undo it (skipped, warned) and return False. The caller updates the
        parameters only after True, then calls :meth:`finish`."""
        tx = plan.transaction
        if plan.host_check:
            flag = maths.all_finite(tx.produced + [d for d in directions if d is not None], self.device)
            for inputs_finite in tx.inputs:
                flag = flag & inputs_finite
            if not self.distribution.agree_flag(flag):
                self.abort(tx, skipped=True)
                return False
        return True

    def finish(self, plan: StepPlan) -> None:
        """Count the step of ``plan``: it is committed."""
        self.steps += 1
        plan.committed = True
        self._arm_capture()

    def abort(self, tx: Transaction, skipped: bool = False) -> None:
        """Undo an open step (``skipped``: count and warn about it as a non-finite skip)."""
        tx.rollback()
        if skipped:
            self.skip_step()
            warnings.warn("ekfac_triton: non-finite gradient, activation or statistic; step skipped, optimizer "
                          "state unchanged", RuntimeWarning, stacklevel=4)
        else:
            self._arm_capture()

    def _collect(self, grads: dict[PreconditionedLayer, Tensor]) -> dict[PreconditionedLayer, LayerBatch]:
        """Phase 1: each layer's captured batch (:meth:`_batches`)."""
        return self._batches([layer for layer in self.layers if layer in grads])

    def _check(self, tx: Transaction, grads: dict[PreconditionedLayer, Tensor],
               batches: dict[PreconditionedLayer, LayerBatch], also_check: Sequence[Tensor],
               examples: list[int]) -> tuple[bool | Tensor, list[int], bool, bool] | None:
        """Phase 2: the non-finite check of the inputs: ``(finite, examples, decided now, special
        step)``, or
        None when the step is skipped. Decided on the host now when data-parallel ranks must
        agree, or on a step that refreshes or installs a basis (the compiled step: also a first
        EMA update); otherwise the flag joins :meth:`check`."""
        checks = list(grads.values()) + [t for t in also_check if t is not None]
        checks += [t for b in batches.values() for t in (b.a, b.g, b.token_weights) if t is not None]
        agreement = self.distribution.agree(self.execution.all_finite(checks, self.device), examples)
        finite, examples = agreement.finite, agreement.examples
        special = self._special_step(grads, batches)
        early = not isinstance(finite, Tensor) or self.execution.checks_early(special)
        if early and not bool(finite):
            return None
        if not early and isinstance(finite, Tensor):
            tx.inputs.append(finite)
        return finite, examples, early, special

    def _produced_finite(self, tx: Transaction) -> bool:
        """Whether what the step produced so far is finite (one host sync, agreed over ranks)."""
        return self.distribution.agree_flag(maths.all_finite(tx.produced, self.device))

    def _due(self, grads: dict[PreconditionedLayer, Tensor]) -> list[int]:
        """The layers whose refresh is due on this step, after its statistics phase."""
        return [index for index, layer in enumerate(self.layers)
                if layer in grads and layer.curvature.has_statistics
                and layer.curvature.refresh_due(self.eigen, index, self.steps)]

    def _special_step(self, grads: dict[PreconditionedLayer, Tensor],
                      batches: dict[PreconditionedLayer, LayerBatch]) -> bool:
        """Whether this step refreshes a basis, has a finished asynchronous one to install, or
        makes a layer's first factor or scaling update since the start or a refresh (that EMA
        update replaces the state: a device-side skip would still count it, and the next update
        would then mix the replaced state in with weight β instead of 0; the compiled step only).
        The input check is decided on the host on such steps."""
        if self.eigen.ready():
            return True
        if self.execution.compiled and any(layer.curvature.first_update_due() for layer in batches):
            return True
        return any(self._refresh_due(index, layer, grads, batches) for index, layer in enumerate(self.layers))

    def _refresh_due(self, index: int, layer: PreconditionedLayer, grads: dict, batches: dict) -> bool:
        curv = layer.curvature
        return (layer in grads and (curv.has_statistics or layer in batches)
                and curv.refresh_due(self.eigen, index, self.steps))

    def _install_finished(self, tx: Transaction) -> None:
        """Phase 3: the bases the asynchronous worker has finished (data-parallel: those submitted
        on the last step, broadcast by their owners)."""
        for index, result in self.distribution.finished(self.eigen, self._factors_of).items():
            self._install(tx, self.layers[index], result)

    def _factors_of(self, index: int) -> tuple[Tensor, Tensor]:
        curv = self.layers[index].curvature
        return curv.in_factor, curv.out_factor

    def _run_jobs(self, tx: Transaction, name: str, fn: Callable[..., None], jobs: list[Any], scalars: list[float],
                  mask: Tensor | None, averaged: list[tuple[float, tuple[Tensor, ...]]]) -> None:
        """Phases 4 and 6: run one phase's jobs in one call (one compiled graph), then average
        what they updated over the ranks (``averaged``: ``(weight, tensors)`` per layer)."""
        jobs = [job for job in jobs if job is not None]
        changed = [t for job in jobs for t in mutated(job)]
        tx.before_update(changed)
        tx.produced += changed
        if jobs:
            self.execution.mark_static(*[t for job in jobs for t in state_tensors(job)])
            self.execution.run(fn, jobs, self.execution.scalars(name, scalars), mask, self.backend)
        self.distribution.average([t for _, ts in averaged for t in ts], [w for w, ts in averaged for _ in ts])

    def _refresh(self, tx: Transaction, due: list[int]) -> None:
        """Phase 5: refresh the layers ``due`` (a layer's first eigenbasis always synchronously);
        the distribution strategy runs the requested decompositions."""
        requests = [r for r in (self.layers[index].curvature.refresh(self.eigen, index) for index in due)
                    if r is not None]
        for index, result in self.distribution.refresh(requests, self.eigen).items():
            self._install(tx, self.layers[index], result)

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

    def _exact_rows(self, grads: dict[PreconditionedLayer, Tensor],
                    batches: dict[PreconditionedLayer, LayerBatch]) -> None:
        """Phase 5b: hand each eigenbasis curvature its batch where the projected gradient may be
        formed from the rows, ``(ĜQ_out)ᵀ(ĀQ_in)/N`` (``projected_gradient``: where it pays, or
        wherever allowed), None elsewhere; the guard (:mod:`ekfac_triton.step.rows`) decides,
        its probes in one host sync."""
        for layer in self.layers:
            if isinstance(layer.curvature, EigenbasisCurvature):
                layer.curvature.rows = None
        mode = self.config.statistics.projected_gradient
        candidates = [(layer, batch) for layer, batch in batches.items()
                      if self._rows_allowed(layer, batch)
                      and (mode == "rows" or layer.curvature.rows_pay(batch.num_examples))]
        if not candidates:
            return
        if self._rows_generator is None:
            self._rows_generator = torch.Generator(device=self.device).manual_seed(0)
        flags = torch.stack([rows_match(grads[layer], batch, layer.adapter.has_bias, self._rows_generator)
                             for layer, batch in candidates]).tolist()
        for (layer, batch), exact in zip(candidates, flags):
            if exact:
                layer.curvature.rows = batch

    def _rows_allowed(self, layer: PreconditionedLayer, batch: LayerBatch) -> bool:
        """The exact checks of the row form's guard (the configuration, the batch's shape, the
        witness); the probe comes after."""
        scaler = self.config.statistics.grad_scaler
        return (self.config.statistics.projected_gradient != "gradient"
                and self.config.fisher.fisher == "empirical"
                and isinstance(self.distribution, SingleProcess)
                and not self.execution.compiled
                and (scaler is None or not scaler.is_enabled())
                and isinstance(layer.curvature, EigenbasisCurvature) and layer.curvature.has_basis
                and batch.draws == 1 and batch.g is not None and batch.a.is_floating_point()
                and batch.a.dim() == 3 and batch.a.shape[1] == 1 and batch.g.shape[1] == 1
                and layer.capture.completed == 1
                and layer.witness is not None and layer.witness.untouched())

    def _install(self, tx: Transaction, layer: PreconditionedLayer, result: Decomposition) -> None:
        tx.before_update(layer.curvature.installs_in_place())
        tx.produced += [t for e in (result.new_in, result.new_out) if e is not None
                        for t in (e.values, e.vectors) if t is not None]
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
            cap.check_unchanged(layer.name)
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
