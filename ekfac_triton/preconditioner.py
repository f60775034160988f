"""The curvature engine: layer discovery, capture, statistics, eigenbasis refreshes and the
preconditioned directions. :class:`Preconditioner` is also public, for users who keep their own
torch optimizer: it rewrites ``.grad`` in place and that optimizer steps."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .backend import resolve_backend
from .capture import LayerCapture
from .config import PreconditionerConfig, check_damping, check_lr
from .curvature import CURVATURES, Curvature, EigenbasisCurvature, LayerShape
from .distributed import DataParallel, resolve_process_group, unwrap_model
from .eigen_engine import Decomposition, EigenEngine
from .fisher import check_fisher, curvature_grad_outputs
from .layers import LayerAdapter, LayerBatch, adapter_for


@dataclass(eq=False)
class PreconditionedLayer:
    """One preconditioned module: its adapter, capture and curvature state."""

    name: str
    adapter: LayerAdapter
    capture: LayerCapture
    curvature: Curvature
    warned: bool = field(default=False)


def _factor_dtype(weight: Tensor) -> torch.dtype:
    # Statistics of half-precision layers accumulate in float32; float64 models stay float64.
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def kl_clip_scale(terms: Iterable[tuple[Tensor, Tensor, float]], kl_clip: float) -> Tensor | None:
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


class Preconditioner:
    """Kronecker-factored eigenbasis preconditioner for the Linear, Conv2d and Embedding layers
    of a model.

    Used on its own, call :meth:`step` after ``loss.backward()``: it replaces each preconditioned
    layer's ``.grad`` by ``(F̂ + λI)⁻¹ ∇L`` (times the KL-clip factor when ``kl_clip`` is set), and
    your optimizer then steps (plain SGD on top gives natural-gradient descent)::

        pre = Preconditioner(model, curvature="ekfac", damping=1e-3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss.backward(); pre.step(); opt.step(); opt.zero_grad()

    With ``fisher="mc"`` or ``"type-2"`` the statistics come from extra backward passes of the
    model output (:mod:`ekfac_triton.fisher`), run by :meth:`backward` (or
    :meth:`curvature_backward` before your own ``loss.backward()``)::

        pre = Preconditioner(model, fisher="type-2", loss=nn.CrossEntropyLoss())
        pre.backward(model(x), y); pre.step(); opt.step(); opt.zero_grad()

    Args:
        model: the module whose ``nn.Linear``, ``nn.Conv2d`` (groups=1, zero padding) and
            ``nn.Embedding`` (no max_norm, not sparse; not with ``curvature="mac"``) submodules
            are preconditioned (with ``curvature="mac"`` also depthwise convolutions and
            self-attention ``nn.MultiheadAttention``); hooks are registered on them
            (:meth:`remove_hooks`).
        damping: λ added to the scaling, > 0.
        curvature: ``"ekfac"``, ``"kfac"``, ``"tekfac"`` or ``"mac"`` (see
            :mod:`ekfac_triton.curvature.mac`: there ``damping`` is ρ and the direction is
            ``∇W̄ · ρ(m̂m̂ᵀ + ρI)⁻¹``).
        fisher: which Fisher the statistics estimate (:mod:`ekfac_triton.fisher`):
            ``"empirical"`` (default: output-gradients of the training loss, no extra cost),
            ``"mc"`` (targets sampled from the model's predictive distribution; ``mc_samples``
            extra backward passes per statistics step) or ``"type-2"`` (the exact Gauss-Newton /
            type-2 Fisher through a factor of the loss Hessian: P·C extra backward passes per
            statistics step, C the number of classes or outputs at each of P output positions
            (P = 1 for (N, C) outputs), and P·C times the output-gradient memory until the step). mc and type-2 need ``loss`` and a curvature backward
            (:meth:`backward` or :meth:`curvature_backward`) on every statistics step; they are
            not defined for ``curvature="mac"`` (which reads no output-gradient).
        loss: the training loss, an ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or
            ``nn.BCEWithLogitsLoss`` instance with reduction ``"mean"`` (no class weights, label
            smoothing or pos_weight). Required for mc/type-2; optional for empirical (then
            :meth:`backward` computes the loss for you).
        mc_samples: number of MC draws per example (>= 1; only with ``fisher="mc"``).
        loss_scale: the training loss is ``loss_scale · loss(output, target)`` (e.g. the number
            of entries of an example, for a loss summed over pixels or tokens and averaged over the
            batch): mc/type-2 then estimate the curvature of that scaled loss (the backward passes
            are scaled by √loss_scale) and :meth:`backward` trains on it. Default 1.
        seed: seed of the generator the MC targets are drawn with (it lives on the model's
            device and is saved in :meth:`state_dict`); None: drawn from torch's global RNG, so
            ``torch.manual_seed`` makes runs reproducible.
        factor_decay: EMA decay of factors and scalings, in [0, 1) (bias-corrected).
        factor_every: update factors (and per-example scalings) every this many steps.
        eigen_every: recompute each layer's eigenbasis every this many steps (MAC: the refresh
            period of its mean snapshot, on the steps that are multiples of it).
        scaling: ``"per_example"`` (exact diagonal), ``"batch"`` (from the mini-batch gradient) or
            ``"per_position"`` (positions as examples: an approximation under weight sharing).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        kl_clip: None, or the KL-clip size; needs ``lr``.
        lr: learning rate the KL clip assumes (required with ``kl_clip``, else unused).
        effective_damping: TEKFAC's ``λ_l = max(mean(Θ_l), λ)``.
        stagger: spread the layers' refreshes over the ``eigen_every`` steps by estimated cost
            (see :mod:`ekfac_triton.eigen_engine`), so no step pays for all of them.
        synchronous: refresh on the due step (True) or on a worker thread, installing the new
            basis at a later step boundary (False); None: True on CPU and with
            ``eigen_every=1``, else False on CUDA.
        float64_max_dim: eigendecompose factors up to this dimension in float64; None: 1024 on
            CUDA (the H100 crossover), 0 on CPU.
        warm_starts: after each full eigh, refresh a layer's basis this many times by one step of
            subspace iteration from the previous basis (cheaper), then a full eigh again.
        modules: restrict preconditioning to these submodules (default: all supported ones).
        factor_dtype: dtype of the factors (statistics), ``torch.float32`` or ``torch.float64``;
            None (default): float64 for float64 layers, else float32. Inputs and output-gradients
            of any dtype (bf16/fp16 under autocast) are accumulated in this dtype.
        basis_dtype: dtype of the eigenbases, eigenvalues and scalings (and of the
            preconditioning arithmetic), ``torch.float32`` or ``torch.float64``; None (default):
            the factors' dtype.
        grad_scaler: the ``torch.amp.GradScaler`` whose scaled loss is backpropagated (fp16
            training), or None. The captured output-gradients carry its scale: they are divided
            by ``grad_scaler.get_scale()`` (in float32) before they enter the statistics. The
            parameter gradients must be unscaled as usual (``scaler.unscale_(optimizer)``
            before :meth:`step`).
        process_group: data-parallel training (:mod:`ekfac_triton.distributed`): None (default)
            is not distributed unless ``model`` is wrapped in DistributedDataParallel (then DDP's
            group); a ``torch.distributed`` process group averages the statistics over its ranks
            and splits the eigendecompositions among them. ``model`` may be the DDP wrapper.
    """

    def __init__(self, model: nn.Module, *, damping: float = 1e-3, curvature: str = "ekfac",
                 factor_decay: float = 0.95, factor_every: int = 1, eigen_every: int = 10,
                 scaling: str = "per_example", backend: str = "auto", kl_clip: float | None = None,
                 lr: float | None = None, effective_damping: bool = False, stagger: bool = True,
                 synchronous: bool | None = None, float64_max_dim: int | None = None, warm_starts: int = 0,
                 modules: Sequence[nn.Module] | None = None, process_group: object | None = None,
                 factor_dtype: torch.dtype | None = None, basis_dtype: torch.dtype | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None, fisher: str = "empirical",
                 loss: nn.Module | None = None, mc_samples: int = 1, seed: int | None = None,
                 loss_scale: float = 1.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model={type(model).__name__}: must be a torch.nn.Module")
        check_fisher(fisher, mc_samples, loss)
        if fisher != "empirical" and curvature in CURVATURES and CURVATURES[curvature].inputs_only:
            raise ValueError(f"Invalid fisher={fisher!r} with curvature={curvature!r}: this curvature reads only "
                             "the layer inputs, so it has no Fisher type (use fisher='empirical')")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"Invalid seed={seed!r}: must be None or an integer")
        if (isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not math.isfinite(loss_scale)
                or loss_scale <= 0):
            raise ValueError(f"Invalid loss_scale={loss_scale!r}: must be a finite number > 0")
        self.fisher = fisher
        self.loss = loss
        self.loss_scale = float(loss_scale)
        self.mc_samples = mc_samples
        group = resolve_process_group(model, process_group)
        model = unwrap_model(model)
        check_damping(damping)
        self.config = PreconditionerConfig(curvature=curvature, factor_decay=factor_decay, factor_every=factor_every,
                                           eigen_every=eigen_every, scaling=scaling, backend=backend,
                                           kl_clip=kl_clip, effective_damping=effective_damping, stagger=stagger,
                                           synchronous=synchronous, float64_max_dim=float64_max_dim,
                                           warm_starts=warm_starts, factor_dtype=factor_dtype,
                                           basis_dtype=basis_dtype)
        if kl_clip is not None:
            if lr is None:
                raise ValueError("Invalid lr=None: kl_clip needs the learning rate (pass lr=...)")
            check_lr(lr)
        self.damping = damping
        self.lr = lr
        self.grad_scaler = grad_scaler
        self.steps = 0
        self._host_skipped_steps = 0  # skips decided on the host (see skipped_steps)
        #: the compiled per-step tensor work (:mod:`ekfac_triton.compiled_step`), set by EKFAC's
        #: ``compile_step``; None: eager
        self.compiled_step: Any = None
        self.layers: list[PreconditionedLayer] = []
        self.unsupported: dict[str, str] = {}
        wanted = None if modules is None else {id(m) for m in modules}
        parents = {id(child): parent for parent in model.modules() for child in parent.children()}
        candidates: list[tuple[str, LayerAdapter]] = []
        for name, module in model.named_modules():
            if wanted is not None and id(module) not in wanted:
                continue
            cls, reason = adapter_for(module, inputs_only=CURVATURES[curvature].inputs_only,
                                      parent=parents.get(id(module)))
            if cls is None:
                continue
            if reason is not None:
                self.unsupported[name] = reason
                continue
            adapter = cls(module)
            if not adapter.weight.requires_grad:
                self.unsupported[name] = "the weight is frozen (requires_grad=False)"
                continue
            candidates.append((name or type(module).__name__, adapter))
        # Tied weights (an embedding shared with the output head): the gradient sums both uses,
        # which per-layer statistics do not model, and two directions for one tensor would
        # silently overwrite each other. Both modules get the plain update.
        users: dict[int, list[str]] = {}
        for name, adapter in candidates:
            users.setdefault(id(adapter.weight), []).append(name)
        for name, adapter in candidates:
            shared = [other for other in users[id(adapter.weight)] if other != name]
            if shared:
                self.unsupported[name] = (f"its weight is shared with {shared} (tied weights are not modelled: the "
                                          "gradient sums both uses)")
        candidates = [(name, adapter) for name, adapter in candidates if name not in self.unsupported]
        if group is not None and any(adapter.one_hot_inputs for _, adapter in candidates):
            embeddings = [name for name, adapter in candidates if adapter.one_hot_inputs]
            raise ValueError(f"Invalid process_group: data-parallel training does not support nn.Embedding layers "
                             f"yet ({embeddings}); exclude them with modules=... or params=...")
        if not candidates:
            detail = f" (unsupported: {self.unsupported})" if self.unsupported else ""
            raise ValueError("Invalid model: it has no supported layer to precondition "
                             f"(nn.Linear, nn.Conv2d with groups=1, nn.Embedding){detail}")
        # Hooks last: a refused model keeps none.
        kwargs = {"effective_damping": effective_damping} if curvature == "tekfac" else {}
        for name, adapter in candidates:
            shape = LayerShape(d_out=adapter.d_out, d_in=adapter.d_in, bias=adapter.has_bias,
                               one_hot=adapter.one_hot_inputs, value_rows=adapter.value_rows)
            dtype = factor_dtype or _factor_dtype(adapter.weight)
            curv = CURVATURES[curvature](shape, dtype, adapter.weight.device, scaling, **kwargs)
            curv.basis_dtype = basis_dtype
            capture = LayerCapture(adapter.hooked_module, adapter.read_call)
            self.layers.append(PreconditionedLayer(name, adapter, capture, curv))
        device = self.layers[0].adapter.weight.device
        self.device = device
        # MC targets are drawn with this generator (on the model's device; saved in state_dict).
        # Only fisher="mc" seeds it from the global RNG: constructing any other preconditioner
        # must not advance torch's RNG (a user's data order would silently change).
        self.generator = torch.Generator(device=device)
        if fisher == "mc":
            self.generator.manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
        self._curvature_passes = 0
        self.backend = resolve_backend(backend, device)
        for layer in self.layers:
            layer.curvature.backend = self.backend
        costs = [layer.curvature.refresh_cost() for layer in self.layers]
        self.eigen = EigenEngine(costs, device, period=eigen_every, stagger=stagger, synchronous=synchronous,
                                 float64_max_dim=float64_max_dim, warm_starts=warm_starts)
        #: the collectives when distributed (None: a single process, no collective at all)
        self.distributed = None if group is None else DataParallel(group, costs, device)
        for name, reason in self.unsupported.items():
            warnings.warn(f"ekfac_triton: module {name!r} is not preconditioned: {reason}; it gets the plain update",
                          stacklevel=2)
        self._arm_capture()

    # -- introspection ----------------------------------------------------------------------------
    def preconditioned_modules(self) -> list[str]:
        """Names of the preconditioned modules, in model order."""
        return [layer.name for layer in self.layers]

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}(curvature={self.config.curvature!r}, scaling={self.config.scaling!r}, "
                 f"backend={self.backend!r}, steps={self.steps}) preconditioning:"]
        lines += [f"  {layer.name}: {layer.adapter.describe()}" for layer in self.layers]
        lines += [f"  not preconditioned {name}: {reason}" for name, reason in self.unsupported.items()]
        return "\n".join(lines)

    def remove_hooks(self) -> None:
        """Remove every hook this preconditioner registered on the model (and stop the eigen
        worker thread, if any)."""
        for layer in self.layers:
            layer.capture.remove()
        self.eigen.shutdown()

    # -- the step -----------------------------------------------------------------------------
    def _arm_capture(self) -> None:
        """Capture inputs and output-gradients only before steps that update statistics."""
        enabled = self.steps % self.config.factor_every == 0
        self._curvature_passes = 0
        for layer in self.layers:
            layer.capture.clear()
            layer.capture.enabled = enabled
            layer.capture.keep_loss_grads = self.fisher == "empirical"
            layer.capture.keep_outputs = self.fisher != "empirical"

    @property
    def statistics_due(self) -> bool:
        """Whether the next :meth:`step` updates the statistics (every ``factor_every`` steps)."""
        return self.steps % self.config.factor_every == 0

    def curvature_backward(self, output: Tensor) -> None:
        """The curvature backward passes of ``fisher="mc"`` / ``"type-2"`` on the model output
        of this step's forward (a no-op for ``"empirical"`` and on steps without statistics).

        Call it after the forward and before ``loss.backward()`` frees the graph (it retains
        it). It backpropagates each MC draw / type-2 column as ``grad_outputs`` with
        ``torch.autograd.grad`` wrt the preconditioned layers' outputs (eager models; a compiled
        model's parameters), so no ``.grad`` is touched and no forward runs again; the capture
        records the output-gradients it sees.
        Works for eager and ``torch.compile``d models.

        Args:
            output: the model output the loss is applied to (logits for the CE and BCE losses).
        """
        if self.fisher == "empirical" or not self.statistics_due:
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            raise ValueError("Invalid output: curvature_backward needs the model output with its graph "
                             "(requires_grad=True), before loss.backward() frees it")
        dtype = torch.promote_types(output.dtype, torch.float32)  # no sqrt/softmax in half precision
        vectors = curvature_grad_outputs(self.fisher, self.loss, output.detach().to(dtype), self.mc_samples,
                                         self.generator)
        root = math.sqrt(self.loss_scale)  # H and E[ssᵀ] scale with the loss: s by its square root
        # Stop at the layer outputs when the eager forward kept them all: autograd then computes no
        # weight gradient (about half of each pass; for an embedding a V x D tensor). A compiled
        # model hides its intermediate tensors: there the passes go to the parameters.
        outputs = [layer.capture.output for layer in self.layers]
        targets = outputs if all(o is not None for o in outputs) else [
            p for layer in self.layers for p in layer.adapter.params]
        for layer in self.layers:
            layer.capture.curvature_pass = True
        try:
            for v in vectors:  # one vector at a time: P·C type-2 columns never exist at once
                if root != 1.0:
                    v = v * root
                torch.autograd.grad(output, targets, grad_outputs=v.to(output.dtype), retain_graph=True,
                                    allow_unused=True)
                self._curvature_passes += 1
        finally:
            for layer in self.layers:
                layer.capture.curvature_pass = False
                layer.capture.output = None  # not needed any more: do not hold it until the step

    def backward(self, output: Tensor, target: Tensor) -> Tensor:
        """``loss_scale · loss(output, target)``, the curvature backward (mc/type-2, on statistics steps), then
        ``loss.backward()`` (``grad_scaler.scale(loss).backward()`` with an enabled
        ``grad_scaler``); returns the loss (detached, unscaled). Needs ``loss`` at construction.

        Args:
            output: the model output of this step's forward.
            target: the targets, as the loss module takes them.
        """
        if self.loss is None:
            raise ValueError("Invalid loss=None: backward(output, target) needs the loss module given at "
                             "construction (loss=...)")
        loss = self.loss(output, target)
        if self.loss_scale != 1.0:
            loss = loss * self.loss_scale
        if (self.fisher != "empirical" and self.statistics_due and isinstance(self.loss, nn.CrossEntropyLoss)
                and bool((target == self.loss.ignore_index).any())):
            raise ValueError(f"Invalid target: it contains ignore_index={self.loss.ignore_index}, which "
                             f"fisher={self.fisher!r} does not model (every position gets curvature)")
        self.curvature_backward(output)
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            self.grad_scaler.scale(loss).backward()  # fp16: as the user's own loop would
        else:
            loss.backward()
        return loss.detach()

    def _capture_unscale(self) -> float | None:
        """1 / the loss scale the captured output-gradients carry (None: no GradScaler)."""
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return None
        return 1.0 / self.grad_scaler.get_scale()

    def _batches(self, active: list[PreconditionedLayer]) -> dict[PreconditionedLayer, LayerBatch]:
        batches = {}
        unscale = self._capture_unscale() if active else None
        for layer in active:
            cap = layer.capture
            if cap.completed == 0:
                raise RuntimeError(f"ekfac_triton: no input/output-gradient was captured for layer {layer.name!r} "
                                   "since the last step; run the forward and backward of the batch between steps")
            if cap.completed > 1:
                raise RuntimeError(f"ekfac_triton: layer {layer.name!r} ran {cap.completed} times with a backward since "
                                   "the last step (shared weights or gradient accumulation), which this version does "
                                   "not model; call step() after each forward/backward")
            if self.fisher != "empirical":
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
        if self._curvature_passes == 0:
            raise RuntimeError(f"ekfac_triton: fisher={self.fisher!r} needs a curvature backward on every statistics "
                               "step: call opt.backward(output, target), or opt.curvature_backward(output) before "
                               "loss.backward()")
        if len(cap.curvature_grads) != self._curvature_passes:
            raise RuntimeError(f"ekfac_triton: layer {layer.name!r} received {len(cap.curvature_grads)} output-gradients "
                               f"in {self._curvature_passes} curvature backward passes (a module run several times, or "
                               "not at all, in the forward), which this version does not model")
        batch = layer.adapter.batch_draws(cap.inputs, cap.curvature_grads)
        cap.curvature_grads = []  # the batch holds them now (stacked): do not keep both until the step ends
        return batch

    def _install(self, layer: PreconditionedLayer, result: Decomposition) -> None:
        note = layer.curvature.install(result)
        if note:
            self._warn(layer, note)

    def _warn(self, layer: PreconditionedLayer, note: str) -> None:
        if not layer.warned:
            layer.warned = True
            warnings.warn(f"ekfac_triton: eigendecomposition of layer {layer.name!r}: {note} "
                          "(warned once per layer)", RuntimeWarning, stacklevel=3)

    def skip_step(self) -> None:
        """Count a skipped step and drop what was captured for it; nothing else changes (used
        when a GradScaler found non-finite gradients, and by the non-finite skip policy)."""
        self._host_skipped_steps += 1
        self._arm_capture()

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite values: those decided on the host (with a warning) plus,
        with ``compile_step``, those the compiled step skipped on the device (reading that counter
        is one host sync)."""
        if self.compiled_step is None:
            return self._host_skipped_steps
        return self._host_skipped_steps + self.compiled_step.device_skips()

    # Always eager, also inside ``torch.compile(opt.step)``: dynamo's trace of this orchestration
    # (Python counters, attribute re-binding at refreshes, graph breaks at eigh) diverged from eager
    # at the second step (torch 2.13); ``compile_step`` compiles the tensor work instead.
    @torch.compiler.disable
    @torch.no_grad()
    def compute_directions(self, damping_of: Callable[[PreconditionedLayer], float],
                           also_check: Sequence[Tensor] = (),
                           fused: Callable[[PreconditionedLayer], bool] | None = None,
                           ) -> list[tuple[PreconditionedLayer, Tensor | None]] | None:
        """Advance the statistics by one step and return ``(layer, direction matrix)`` for every
        layer with a gradient; None when the step is skipped. Layers for which ``fused`` says
        True (after their statistics and refresh) get None: the caller applies their curvature
        inside its own update (MAC's fused kernel).

        Skip policy: if any gradient of a preconditioned layer, any tensor of ``also_check`` or any
        captured statistic is not finite, nothing changes (factors, bases, scalings, step count),
        a warning is issued and None is returned. One host sync per step makes that decision.

        Order: bases finished by the asynchronous worker are installed; on a statistics step the
        factors are updated; bases due on this step are refreshed (synchronously, or submitted to
        the worker); scalings are updated in the current basis; then the directions — so with
        ``factor_decay=0, eigen_every=1`` (synchronous) the direction is exactly
        ``(F̂ + λI)⁻¹ ∇L`` for this batch's F̂.

        Distributed (:mod:`ekfac_triton.distributed`): the skip decision is taken by all ranks
        together, factors and per-example scalings are averaged over the ranks after their update,
        and each due refresh runs on one rank and is broadcast.
        """
        cfg = self.config
        dp = self.distributed
        stats_step = self.steps % cfg.factor_every == 0
        active = [layer for layer in self.layers if layer.adapter.has_grad()]
        grads = {layer: layer.adapter.grad_matrix() for layer in active}
        batches = self._batches(active) if stats_step else {}
        examples = [layer.adapter.num_examples(layer.capture.input_shape) if layer in grads else 0
                    for layer in self.layers]

        checks = list(grads.values()) + [t for t in also_check if t is not None]
        checks += [t for b in batches.values() for t in (b.a, b.g, b.token_weights) if t is not None]
        compiled = self.compiled_step
        if compiled is not None:
            finite = compiled.all_finite(checks)
        else:
            finite = torch.stack([torch.isfinite(t).all() for t in checks]).all() if checks else torch.tensor(True)
        if dp is not None:  # every rank skips if any rank saw a non-finite value
            agreement = dp.agree(finite.to(self.device), examples)
            finite, examples = agreement.finite, agreement.examples
        # The compiled step decides on the device (no host sync) unless this step refreshes or
        # installs a basis, which syncs anyway (see ekfac_triton.compiled_step).
        on_host = compiled is None or self._refreshes_now(grads, batches)
        if on_host and not bool(finite):
            self.skip_step()
            warnings.warn("ekfac_triton: non-finite gradient or activation; step skipped, optimizer state unchanged",
                          RuntimeWarning, stacklevel=3)
            return None

        if on_host:
            for index, result in self._finished_refreshes().items():
                self._install(self.layers[index], result)
        if compiled is not None:
            compiled.begin(finite, dict(zip(self.layers, examples)))
            compiled.update_statistics(batches, cfg.factor_decay)
        else:
            for layer, batch in batches.items():
                layer.curvature.update_statistics(batch, cfg.factor_decay)
        # Distributed: weights N_rank / N make the averaged EMA that of the estimate over all ranks
        weight = {layer: batches[layer].num_examples / examples[i] for i, layer in enumerate(self.layers)
                  if layer in batches} if dp is not None else {}
        if dp is not None:
            self._average(dp, [(weight[layer], layer.curvature.statistics()) for layer in batches])
        self._refresh_due(grads)
        if compiled is not None:
            compiled.after_refresh(batches, cfg.factor_decay)
        else:
            for layer, batch in batches.items():
                layer.curvature.after_refresh(batch, cfg.factor_decay)
        if dp is not None:
            self._average(dp, [(weight[layer], layer.curvature.refreshed_statistics()) for layer in batches])
        directions = []
        for index, layer in enumerate(self.layers):
            if layer not in grads:
                continue
            curv = layer.curvature
            if not curv.has_statistics:
                # Never seen a statistics step (unused on all of them so far): no curvature yet.
                directions.append((layer, grads[layer]))
                continue
            if fused is not None and fused(layer):
                directions.append((layer, None))
                continue
            # ``batch`` scaling: N of the (averaged) gradient, over all ranks when distributed
            directions.append((layer, curv.precondition(grads[layer], damping_of(layer), examples[index],
                                                        cfg.factor_decay)))
        self.steps += 1
        self._arm_capture()
        return directions

    def _refreshes_now(self, grads: dict[PreconditionedLayer, Tensor],
                       batches: dict[PreconditionedLayer, LayerBatch]) -> bool:
        """Whether the compiled step must decide a non-finite skip on the host: this step refreshes
        a basis or has a finished asynchronous one to install, or it is a layer's first factor or
        scaling update since the start or a refresh (that EMA update replaces the state: a
        device-side skip would still count it, and the next update would then mix the replaced
        state in with weight β instead of 0)."""
        if self.eigen.ready():
            return True
        for layer in batches:
            curv = layer.curvature
            estimated = curv.estimates_scaling and curv.scaling_mode != "batch"
            if curv.factor_updates == 0 or (estimated and curv.scaling_updates == 0):
                return True
        return any(layer in grads and (layer.curvature.has_statistics or layer in batches)
                   and layer.curvature.refresh_due(self.eigen, index, self.steps)
                   for index, layer in enumerate(self.layers))

    @staticmethod
    def _average(dp: DataParallel, tensors: list[tuple[float, tuple[Tensor, ...]]]) -> None:
        """Average ``(weight, statistics)`` of the layers over the ranks (one collective per dtype)."""
        dp.average([t for _, ts in tensors for t in ts], [w for w, ts in tensors for _ in ts])

    def _finished_refreshes(self) -> dict[int, Decomposition]:
        """Asynchronous refreshes to install now: whatever the worker has finished; when
        distributed, those submitted on the last step (waited for, then broadcast by their owners)."""
        dp = self.distributed
        if dp is None:
            return self.eigen.collect()
        if not dp.in_flight:
            return {}
        self.eigen.wait()
        results = self.eigen.collect()
        factors = {i: (self.layers[i].curvature.in_factor, self.layers[i].curvature.out_factor) for i in dp.in_flight}
        shared = dp.share(dp.in_flight, results, factors)
        dp.in_flight = {}
        return shared

    def _refresh_due(self, grads: dict[PreconditionedLayer, Tensor]) -> None:
        """Refresh what is due on this step (a layer's first eigenbasis always synchronously).
        When distributed, each due eigendecomposition runs on one rank only and its basis is
        broadcast; other refreshes (MAC's snapshot of its mean) are cheap and run on every rank."""
        dp = self.distributed
        due = [index for index, layer in enumerate(self.layers)
               if layer in grads and layer.curvature.has_statistics
               and layer.curvature.refresh_due(self.eigen, index, self.steps)]
        split = [i for i in due if dp is not None and isinstance(self.layers[i].curvature, EigenbasisCurvature)]
        for index in due:
            if index not in split:
                note = self.layers[index].curvature.refresh(self.eigen, index)
                if note:
                    self._warn(self.layers[index], note)
        if not split:
            return
        owners = dp.owners(split)
        results: dict[int, Decomposition] = {}
        shared_now: dict[int, int] = {}  # synchronous refreshes to broadcast: layer -> owner
        for index in split:
            curv = self.layers[index].curvature
            warm = self.eigen.warm_basis(index, curv.q_in, curv.q_out)  # on every rank: same counters
            synchronous = not curv.has_basis or self.eigen.synchronous
            (shared_now if synchronous else dp.in_flight)[index] = owners[index]
            if owners[index] != dp.rank:
                continue
            if synchronous:
                results[index] = self.eigen.decompose(curv.in_factor, curv.out_factor, warm)
            else:
                self.eigen.submit(index, curv.in_factor, curv.out_factor, warm)
        if shared_now:
            factors = {i: (self.layers[i].curvature.in_factor, self.layers[i].curvature.out_factor)
                       for i in shared_now}
            results = dp.share(shared_now, results, factors)
        for index, result in results.items():
            self._install(self.layers[index], result)

    def step(self) -> bool:
        """Precondition every layer's ``.grad`` in place; returns False if the step was skipped
        (non-finite values: the gradients are then left untouched). Runs outside any autocast
        region (its arithmetic is in the factor and basis dtypes)."""
        with torch.autocast(self.device.type, enabled=False):
            directions = self.compute_directions(lambda layer: self.damping)
        if directions is None:
            return False
        scale = None
        if self.config.kl_clip is not None:
            scale = kl_clip_scale(((d, layer.adapter.grad_matrix(), self.lr) for layer, d in directions),
                                  self.config.kl_clip)
        with torch.no_grad():
            for layer, d in directions:
                if scale is not None:
                    d = d * scale
                for p, part in zip(layer.adapter.params, layer.adapter.split(d)):
                    if p.grad is None:
                        p.grad = part.to(p.dtype).clone()
                    else:
                        p.grad.copy_(part)
        return True

    # -- serialisation ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counts and every layer's curvature state (references, as torch optimizers do).
        Asynchronous refreshes still in flight are not part of it."""
        return {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "layers": [{"name": layer.name, **layer.curvature.state_dict()} for layer in self.layers],
            "fisher": self.fisher,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` of a preconditioner of the same model and settings."""
        names = [entry["name"] for entry in state["layers"]]
        if names != self.preconditioned_modules():
            raise ValueError(f"state_dict is for layers {names}, this preconditioner has {self.preconditioned_modules()}")
        if state.get("fisher", "empirical") != self.fisher:
            raise ValueError(f"state_dict is for fisher={state.get('fisher', 'empirical')!r}, this preconditioner "
                             f"uses fisher={self.fisher!r}")
        self.eigen.cancel()  # refreshes in flight belong to the state being replaced
        if self.distributed is not None:
            self.distributed.in_flight = {}
        for layer, entry in zip(self.layers, state["layers"]):
            layer.curvature.load_state_dict(entry)
        self.steps = int(state["steps"])
        self._host_skipped_steps = int(state["skipped_steps"])
        if "generator" in state:  # resume draws the same MC targets
            self.generator.set_state(state["generator"])
        if self.compiled_step is not None:  # the loaded count includes the device-counted skips
            self.compiled_step.reset_device_skips()
        self._arm_capture()
