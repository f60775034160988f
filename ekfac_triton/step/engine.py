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

Gradient accumulation (several backward passes before a step) lives in
:mod:`ekfac_triton.step.accumulation`: ``fold``, called by the capture from the backward, folds each
micro-batch into running sums; the step's statistics and scalings phases then update the EMAs from
those sums, normalised by the total number of examples (ARCHITECTURE.md, "Gradient accumulation").
"""

from __future__ import annotations

import functools
import warnings
import weakref
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
from .accumulation import Accumulation, AccumulationSteps, fold_hook, unscaled
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
    #: gradient accumulation: what this step's micro-batches folded so far (None: at most one)
    accumulation: Accumulation | None = field(default=None)


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


class StepEngine(AccumulationSteps):
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
        self._host_skips_in_a_row = 0  # non-finite skips since the last committed step (max_skipped_steps)
        self._curvature_passes = 0
        self.execution = Eager()
        #: the watched parameters' gradients since the last step: which a backward reached (a step
        #: without a backward, a capture that missed one) and whether each is untouched (the row form)
        self._witness = GradientWitness()
        #: the loss scale of a step driven by a GradScaler that is not the configured grad_scaler
        self.driving_scale: float | None = None
        #: (name, weight) of the layers left out at construction because frozen (warned if unfrozen)
        self.frozen: list[tuple[str, Tensor]] = []

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

    def watch_backward(self, params: Sequence[Tensor]) -> None:
        """Note, for :meth:`backward_missing` and the capture check of :meth:`_collect`, each
        backward that accumulates a gradient into one of ``params``, and its gradient tensor for the
        row form's guard (:class:`~ekfac_triton.step.rows.GradientWitness`; removed by
        :meth:`unwatch_backward`)."""
        self._witness.watch(params)

    def unwatch_backward(self) -> None:
        self._witness.remove()

    def backward_missing(self, stacklevel: int = 3) -> bool:
        """True, with a warning, when no backward reached a preconditioned layer or a watched
        parameter since the last step: the caller then changes nothing (no statistics, no
        update, the step is not counted); stale gradients would otherwise be applied again and
        counted as a step. ``stacklevel``: of the warning, so that it names the caller's line."""
        if self._witness.reached() or any(layer.capture.arrivals for layer in self.layers):
            return False
        warnings.warn("ekfac_triton: step() was called without a backward since the last step (no gradient "
                      "reached the model's parameters, or remove_hooks() removed the hooks that see it); nothing "
                      "was changed: no statistics, no update, and the step is not counted. Call loss.backward() "
                      "before each step()", UserWarning, stacklevel=stacklevel)
        return True

    def _arm_capture(self) -> None:
        """Capture inputs and output-gradients only before steps that update statistics."""
        enabled = self.statistics_due
        self._curvature_passes = 0
        self._witness.reset()
        empirical = self.config.fisher.fisher == "empirical"
        for layer in self.layers:
            layer.capture.clear()
            layer.accumulation = None
            if layer.capture.fold is None:
                layer.capture.name = layer.name
                layer.capture.fold = functools.partial(fold_hook, weakref.ref(self), layer)
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

    def warn_unfrozen(self, stacklevel: int = 3) -> None:
        """Warn, once per layer, when a layer that was frozen at construction (so never hooked nor
        given curvature state) has a gradient: it is trained with the plain update only.
        ``stacklevel``: of the warning, so that it names the caller's line."""
        unfrozen = [name for name, weight in self.frozen if weight.grad is not None]
        if unfrozen:
            self.frozen = [(name, w) for name, w in self.frozen if name not in unfrozen]
            warnings.warn(f"ekfac_triton: layers {unfrozen} were frozen (requires_grad=False) when the optimizer was "
                          "built and have a gradient now: they are not preconditioned (they get the plain update, "
                          "if the optimizer holds their parameters). To precondition them, build the optimizer "
                          "after unfreezing them", UserWarning, stacklevel=stacklevel)

    def _advance(self, tx: Transaction, damping_of: Callable[[PreconditionedLayer], float],
                 also_check: Sequence[Tensor], fused: Callable[[PreconditionedLayer], bool] | None) -> StepPlan | None:
        stats_step = self.statistics_due
        with maths.profile_range("collect"):
            grads = {layer: layer.adapter.grad_matrix() for layer in self.layers if layer.adapter.has_grad()}
            batches = self._collect(grads) if stats_step else {}
        # A layer no backward reached since the last step (its gradient zeros, or left from before)
        # has 0 examples: no statistics this step, and no batch-scaling update (curvature.base).
        examples = [self._num_examples(layer) if layer in grads and layer.capture.arrivals else 0
                    for layer in self.layers]
        with maths.profile_range("check"):
            checked = self._check(tx, grads, batches, also_check, examples)
        if checked is None:
            return None
        finite, examples, early, special = checked
        mask = self.execution.finite_flag(finite) if isinstance(finite, Tensor) else None
        if early:
            with maths.profile_range("install"):
                self._install_finished(tx)
        weights = {layer: batches[layer].num_examples / examples[i] for i, layer in enumerate(self.layers)
                   if layer in batches}  # data-parallel: N_rank / N, the averaged EMA is that of all ranks
        decay = self.config.factor_decay
        scalars: list[float] = []
        with maths.profile_range("factors"):
            jobs = [layer.curvature.accumulated_statistics_job(batch.sums, batch.num_examples, decay, scalars)
                    if isinstance(batch, Accumulation) else layer.curvature.statistics_job(batch, decay, scalars)
                    for layer, batch in batches.items()]
            self._run_jobs(tx, "factors", maths.update_factors, jobs, scalars, mask,
                           [(weights[layer], layer.curvature.statistics()) for layer in batches])
        due = self._due(grads)
        if early and due and not self._produced_finite(tx):
            return None  # an overflowing statistic: caught before it reaches an eigendecomposition
        with maths.profile_range("refresh"):
            self._refresh(tx, due)
        self._exact_rows(grads, batches)
        scalars = []
        with maths.profile_range("scalings"):
            jobs = [self._accumulated_scaling_job(layer, batch, decay, scalars)
                    if isinstance(batch, Accumulation) else layer.curvature.scaling_job(batch, decay, scalars)
                    for layer, batch in batches.items()]
            self._run_jobs(tx, "scalings", maths.update_scalings, jobs, scalars, mask,
                           [(weights[layer], layer.curvature.refreshed_statistics()) for layer in batches])
        with maths.profile_range("plan"):
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
            with maths.profile_range("finite_check"):
                flag = maths.all_finite(tx.produced + [d for d in directions if d is not None], self.device)
                for inputs_finite in tx.inputs:
                    flag = flag & inputs_finite
                agreed = self.distribution.agree_flag(flag)
            if not agreed:
                self.abort(tx, skipped=True)
                return False
        return True

    def finish(self, plan: StepPlan) -> None:
        """Count the step of ``plan``: it is committed (the compiled step may still have skipped
        it on the device: then every few steps the device's run of skips is checked)."""
        self.steps += 1
        plan.committed = True
        self._host_skips_in_a_row = 0
        self._arm_capture()
        self._check_skips_in_a_row(host_decided=False)

    def abort(self, tx: Transaction, skipped: bool = False) -> None:
        """Undo an open step (``skipped``: count and warn about it as a non-finite skip, and raise
        once ``max_skipped_steps`` such skips came in a row)."""
        tx.rollback()
        if skipped:
            self.skip_step()
            self._host_skips_in_a_row += 1
            self.execution.count_host_skip()
            warnings.warn("ekfac_triton: non-finite gradient, activation or statistic; step skipped, optimizer "
                          "state unchanged", RuntimeWarning, stacklevel=4)
            self._check_skips_in_a_row(host_decided=True)
        else:
            self._arm_capture()

    def _check_skips_in_a_row(self, host_decided: bool) -> None:
        """Raise ``RuntimeError`` when the last ``max_skipped_steps`` steps were all skipped for
        non-finite values: such a run no longer trains, and would otherwise go on silently. The
        compiled step's device skips are read only where it costs no extra sync per step
        (:meth:`~ekfac_triton.step.execution.Compiled.skips_in_a_row`)."""
        limit = self.config.statistics.max_skipped_steps
        if limit is None:
            return
        run = self.execution.skips_in_a_row(self._host_skips_in_a_row, self.steps, limit, host_decided)
        if run is None or run < limit:
            return
        raise RuntimeError(
            f"ekfac_triton: the last {run} steps were all skipped because their gradients, captured activations or "
            f"statistics were not finite (inf/NaN), so the run has stopped training (max_skipped_steps={limit}). "
            "The parameters and the optimizer state are those of the last good step. Check the loss and the model "
            "for inf/NaN first (e.g. the log of 0, a division by 0, fp16 overflow); if they diverged from finite "
            "values, lower lr, raise damping, or enable the trust region (kl_clip=..., smaller is safer). "
            "max_skipped_steps=None disables this check.")

    def _collect(self, grads: dict[PreconditionedLayer, Tensor]) -> dict[PreconditionedLayer, LayerBatch]:
        """Phase 1: each layer's captured batch (:meth:`_batches`), for the layers a backward
        reached since the last step; the others (a layer used on some steps only, whose gradient is
        zeros or None) keep their statistics as they are. A layer whose weight received a gradient
        from a backward that its capture did not see raises."""
        owners = set(getattr(self, "tied", {}).values())  # a tied weight's gradient may come from its other use
        for layer in grads:
            if (not layer.capture.arrivals and self._witness.reached(layer.adapter.weight)
                    and layer.name not in owners):
                raise RuntimeError(
                    f"ekfac_triton: layer {layer.name!r} received a gradient in a backward that its capture hook "
                    "did not see: the hook is not in the code that ran (e.g. a function compiled with "
                    "torch.compile around the model, such as a training step, traced before the optimizer "
                    "existed; or a hook removed by remove_hooks()); its statistics cannot be updated. Construct "
                    "the optimizer before the first call of such a compiled function, or call "
                    "torch._dynamo.reset() after constructing it")
        return self._batches([layer for layer in self.layers if layer in grads and layer.capture.arrivals])

    def _check(self, tx: Transaction, grads: dict[PreconditionedLayer, Tensor],
               batches: dict[PreconditionedLayer, LayerBatch], also_check: Sequence[Tensor],
               examples: list[int]) -> tuple[bool | Tensor, list[int], bool, bool] | None:
        """Phase 2: the non-finite check of the inputs: ``(finite, examples, decided now, special
        step)``, or
        None when the step is skipped. Decided on the host now when data-parallel ranks must
        agree, or on a step that refreshes or installs a basis (the compiled step: also a first
        EMA update); otherwise the flag joins :meth:`check`."""
        checks = list(grads.values()) + [t for t in also_check if t is not None]
        checks += [t for b in batches.values()
                   for t in (b.tensors() if isinstance(b, Accumulation) else (b.a, b.g, b.token_weights))
                   if t is not None]
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
                    batches: dict[PreconditionedLayer, LayerBatch | Accumulation]) -> None:
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

    def _rows_allowed(self, layer: PreconditionedLayer, batch: LayerBatch | Accumulation) -> bool:
        """The exact checks of the row form's guard (the configuration, the batch's shape, the
        witness); the probe comes after."""
        scaler = self.config.statistics.grad_scaler
        return (isinstance(batch, LayerBatch)  # not the sums of several micro-batches
                and self.config.statistics.projected_gradient != "gradient"
                and self.config.fisher.fisher == "empirical"
                and isinstance(self.distribution, SingleProcess)
                and not self.execution.compiled
                and (scaler is None or not scaler.is_enabled())
                and isinstance(layer.curvature, EigenbasisCurvature) and layer.curvature.has_basis
                # the probe's tolerance is N·eps of the gradient's dtype: in half precision it would
                # accept contributions the row form drops, so half-precision weights keep the gradient form
                and layer.adapter.weight.dtype in (torch.float32, torch.float64)
                and batch.draws == 1 and batch.g is not None and batch.a.is_floating_point()
                and batch.a.dim() == 3 and batch.a.shape[1] == 1 and batch.g.shape[1] == 1
                and layer.capture.completed == 1 and layer.capture.micro_batches == 1
                and self._witness.untouched(layer.adapter.params))

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
        if scaler is None and self.driving_scale is not None:
            return 1.0 / self.driving_scale
        if scaler is None or not scaler.is_enabled():
            return None
        return 1.0 / scaler.get_scale()

    def _batches(self, active: list[PreconditionedLayer]) -> dict[PreconditionedLayer, LayerBatch]:
        batches = {}
        unscale = self._capture_unscale() if active else None
        empirical = self.config.fisher.fisher == "empirical"
        for layer in active:
            cap = layer.capture
            if cap.completed == 0:  # a gradient arrived, but from a forward run before the last step
                raise RuntimeError(f"ekfac_triton: no input/output-gradient was captured for layer {layer.name!r} "
                                   "since the last step (its forward ran before the last step() and its backward "
                                   "after it); run the forward and backward of the batch between steps")
            if cap.shared:
                raise RuntimeError(f"ekfac_triton: layer {layer.name!r} ran {cap.completed} times in one backward pass "
                                   "(shared weights: the module is called more than once in one forward graph), "
                                   "which this version does not model; gradient accumulation over several "
                                   "backward() calls before step() is supported, one call of the module per backward")
            if cap.error is not None:
                raise cap.error  # raised while folding a micro-batch inside the backward
            if cap.micro_batches > 1 and not empirical:
                raise RuntimeError(f"ekfac_triton: layer {layer.name!r} received {cap.micro_batches} backward passes "
                                   f"since the last step; gradient accumulation is supported with fisher='empirical' "
                                   f"only, not with fisher={self.config.fisher.fisher!r}: call step() after each "
                                   "opt.backward(output, target), or use fisher='empirical'")
            if layer.accumulation is not None:
                if unscale is not None and layer.accumulation.folded_unscaled:
                    # scaler.step(opt) without grad_scaler=: the scale was unknown while the backward
                    # passes folded their loss-scaled output-gradients into the sums
                    raise RuntimeError(f"ekfac_triton: layer {layer.name!r} accumulated several backward passes "
                                       "under a GradScaler that was not passed as grad_scaler=: the micro-batches "
                                       "were folded at the loss scale, which the optimizer learns only at the step. "
                                       "Pass grad_scaler=scaler to the optimizer to accumulate with a GradScaler")
                self._check_kept(layer)
                layer.accumulation.num_examples = cap.examples
                batches[layer] = layer.accumulation
                continue
            if not empirical:
                batches[layer] = self._curvature_batch(layer)
                continue
            cap.check_unchanged(layer.name)
            grad_output = None if layer.curvature.inputs_only else unscaled(cap.grad_output, unscale)
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

    # -- gradient accumulation (ARCHITECTURE.md, "Gradient accumulation") ---------------------------
    def _num_examples(self, layer: PreconditionedLayer) -> int:
        """N of the step: the examples of every backward pass since the last step (local ones:
        data-parallel ranks add theirs in the agreement)."""
        cap = layer.capture
        return cap.examples if cap.micro_batches else layer.adapter.num_examples(cap.input_shape)
