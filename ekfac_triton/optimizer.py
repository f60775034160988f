"""``EKFAC``: a ``torch.optim.Optimizer`` over all parameters of a model. Linear, Conv2d and
Embedding layers get curvature-preconditioned directions; every other parameter its plain
gradient. Then weight decay, momentum and the update act on the direction, as SGD does on a
gradient (ARCHITECTURE.md, "The update")."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .config import EigenConfig, StatisticsConfig, argument_docs, check_bool, check_group, check_plain_update
from .curvature import CURVATURES, Curvature
from .discovery import Coverage, coverage, discover
from .distributed import unwrap_model
from .layers import weight_and_bias
from .layers.base import MatrixLayout
from .preconditioner import PreconditionedLayer, Preconditioner
from .step import maths
from .step.engine import StepPlan
from .step.execution import Compiled, compile_options

class EKFAC(torch.optim.Optimizer):
    """EKFAC (George et al. 2018), K-FAC (Martens & Grosse 2015) or TEKFAC (Gao et al. 2020).

    One step: statistics are updated (every ``factor_every`` steps), bases refreshed (every
    ``eigen_every``), each Linear/Conv2d gradient ``[∇W | ∇b]`` becomes
    ``Q_G [(Q_Gᵀ ∇W̄ Q_A) / (S + λ)] Q_Aᵀ``, scaled by the KL clip (the default trust region);
    then for every parameter ``u = d + weight_decay·p``, ``m = momentum·m + u``, ``p -= lr·m``
    (parameters without curvature: the same on their gradient, or AdamW with
    ``plain_update="adamw"``). With ``momentum=0, weight_decay=0, factor_decay=0, eigen_every=1``
    a step changes the parameters by exactly ``-lr·(F̂ + λI)⁻¹ ∇L`` (the default ``kl_clip="auto"``
    is off in that configuration; an explicit ``kl_clip`` number still clips).

    The loss must be a mean over the batch's first dimension: the per-example statistics
    rescale autograd's gradients by N. Gradient accumulation (several ``backward()`` calls
    before ``step()``, each micro-batch's mean loss scaled by n_i / N) gives the step of one
    batch of all N examples (ARCHITECTURE.md, "Gradient accumulation").

    Fisher types (:mod:`ekfac_triton.fisher`): the default ``fisher="empirical"`` builds the
    statistics from the training backward (``loss.backward(); opt.step()``). ``"mc"`` and
    ``"type-2"`` need the loss module and a curvature backward on the statistics steps::

        opt = EKFAC(model, fisher="type-2", loss=nn.CrossEntropyLoss())
        loss = opt.backward(model(x), y)   # loss, curvature backward, loss.backward()
        opt.step(); opt.zero_grad()

    Args:
        model: the model; hooks are registered on its supported layers (may be wrapped in
            DistributedDataParallel).
        lr: learning rate (>= 0; per group). Default 0.1.
        damping: λ (> 0; per group). Default 1e-2. The defaults (lr 0.1, damping 1e-2, momentum 0.9
            and the ``kl_clip`` trust region 1e-3) were chosen on six models, transformers to
            ResNets (ARCHITECTURE.md, "Default hyperparameters"); without the clip, lr 0.1 diverged.
        curvature: ``"ekfac"``, ``"kfac"``, ``"tekfac"``, ``"mac"`` or a
            :class:`~ekfac_triton.curvature.Curvature` subclass.
        momentum: heavy-ball momentum on the direction, in [0, 1) (per group).
        weight_decay: L2 term added to the direction after preconditioning (per group).
        params: optional parameter groups (as for any torch optimizer) over the model's
            parameters, e.g. for per-group lr, damping or weight decay; a layer's weight and bias
            must share a group. Default: all parameters of ``model`` in one group.
        decoupled_weight_decay: False (default): ``u = d + weight_decay·p`` (L2, as above);
            True: ``u = d`` and ``p <- p·(1 − lr·weight_decay)`` before ``p -= lr·m``
            (Loshchilov & Hutter; MAC's ImageNet/GPT recipes).
        process_group: data-parallel training (:mod:`ekfac_triton.distributed`). None (default):
            not distributed, unless ``model`` is wrapped in ``DistributedDataParallel``, whose
            process group is then used; a ``torch.distributed`` process group: statistics averaged
            over its ranks (gradients must already be averaged, by DDP or
            :func:`ekfac_triton.distributed.average_gradients`), eigendecompositions split among
            them, the state identical on every rank.
        compile_step: False (default): the step's tensor work runs eagerly. True or a dict of
            ``torch.compile`` arguments (e.g. ``{"mode": "reduce-overhead"}`` for CUDA graphs):
            the same functions run compiled, with graphs that do not change with the step, and
            non-finite steps are skipped on the device where the step would otherwise not sync
            (:mod:`ekfac_triton.step.execution`): such a skip leaves parameters and state
            bit-identical but issues no warning and still advances the step and EMA counts;
            ``preconditioner.skipped_steps`` counts it. EKFAC, K-FAC and TEKFAC, single process,
            empirical Fisher, nn.Linear, transformers Conv1D and nn.Conv2d layers. With a GradScaler every step still
            syncs once (``found_inf`` is read on the host).
        plain_update: how the parameters without curvature (norm weights, biases of modules
            left plain, embeddings not preconditioned, tied weights; ``plain_update_report()``)
            move. ``"sgd"`` (default): like the directions, by weight decay, momentum and
            ``p -= lr·m`` on their gradient. ``"adamw"``: by AdamW with its own ``plain_lr``,
            ``plain_betas``, ``plain_eps`` and ``plain_weight_decay`` (per group; exactly
            ``torch.optim.AdamW``'s update, its ``step``/``exp_avg``/``exp_avg_sq`` in ``state``
            and the state_dict), as Shampoo and SOAP graft Adam; the KL clip, ``momentum`` and
            ``weight_decay`` do not apply to them. An lr scheduler changes ``lr`` only: schedule
            ``plain_lr`` through ``param_groups`` yourself. With ``compile_step`` a step skipped on
            the device still advances their step counts (as the EMA counts).
        plain_lr: AdamW's learning rate (``plain_update="adamw"``; >= 0, per group). Default 1e-3.
        plain_betas: AdamW's (β1, β2), each in [0, 1) (per group). Default (0.9, 0.999).
        plain_eps: AdamW's ε (> 0, per group). Default 1e-8.
        plain_weight_decay: AdamW's decoupled weight decay (>= 0, per group). Default 0.
        **options: the engine's settings, all keyword-only:
{arguments}
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, damping: float = 1e-2,
                 curvature: str | type[Curvature] = "ekfac", momentum: float = 0.9, weight_decay: float = 0.0, *,
                 params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
                 decoupled_weight_decay: bool = False, process_group: object | None = None,
                 compile_step: bool | dict[str, Any] = False, plain_update: str = "sgd",
                 plain_lr: float = 1e-3, plain_betas: tuple[float, float] = (0.9, 0.999), plain_eps: float = 1e-8,
                 plain_weight_decay: float = 0.0, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model={type(model).__name__}: must be a torch.nn.Module "
                            "(EKFAC hooks into the model's layers; pass parameter groups as params=...)")
        check_bool("decoupled_weight_decay", decoupled_weight_decay)
        self.decoupled_weight_decay = decoupled_weight_decay
        check_plain_update(plain_update)
        self.plain_update = plain_update
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        if plain_update == "adamw":
            defaults.update(plain_lr=plain_lr, plain_betas=tuple(plain_betas), plain_eps=plain_eps,
                            plain_weight_decay=plain_weight_decay)
        check_group(defaults)
        compile_args = compile_options(compile_step)
        self._model = unwrap_model(model)  # add_param_group finds the modules of new parameters in it
        super().__init__(list(model.parameters()) if params is None else params, defaults)
        if options.get("kl_clip", "auto") == "auto" and _exact_configuration(momentum, weight_decay, options):
            # the public contract: in this configuration one step is exactly -lr (F̂ + λI)⁻¹ ∇L, so
            # the default trust region (which guards the EMA'd, stale and momentum-amplified steps
            # of the other configurations) is off; an explicit kl_clip still applies
            options = {**options, "kl_clip": None}
        self._preconditioner = Preconditioner(model, damping=damping, curvature=curvature, lr=lr,
                                              modules=self._modules_in_groups(model), process_group=process_group,
                                              **options)
        if compile_args is not None:
            try:
                self._compile(compile_args)
            except ValueError:
                self._preconditioner.remove_hooks()  # a refused optimizer leaves no hook on the model
                raise
        layer_params = {p for layer in self._preconditioner.layers for p in layer.adapter.params}
        self._preconditioner.watch_backward([p for g in self.param_groups for p in g["params"]
                                             if p not in layer_params])
        # torch.amp.GradScaler.step then calls step() itself, even on inf steps, with grad_scale and
        # found_inf set (torch/amp/grad_scaler.py): the step needs the scale, which the captured
        # output-gradients carry, whether or not the scaler was passed as grad_scaler=.
        self._step_supports_amp_scaling = True

    def _compile(self, options: dict[str, Any]) -> None:
        """Run the step's tensor work compiled (checking first that it covers this optimizer)."""
        pre = self._preconditioner
        if not pre.config.curvature_class.compiles:
            raise ValueError(f"Invalid compile_step with curvature={pre.config.curvature!r}: the compiled step "
                             "covers the curvatures whose jobs trace under torch.compile: 'ekfac', 'kfac' and "
                             "'tekfac' (MAC has its own fused Triton update)")
        if pre.distributed is not None:
            raise ValueError("Invalid compile_step with a process group: the compiled step is single-process")
        if pre.fisher != "empirical":
            raise ValueError(f"Invalid compile_step with fisher={pre.fisher!r}: the compiled step covers "
                             "the empirical Fisher only (one output-gradient per example)")
        other = [f"{layer.name} ({type(layer.adapter.module).__name__})" for layer in pre.layers
                 if not layer.adapter.compiles]
        if other:
            raise ValueError(f"Invalid compile_step with layers {other}: the compiled step covers nn.Linear, "
                             "transformers Conv1D and nn.Conv2d (exclude the others with params=...)")
        pre.execution = Compiled(options, pre.device)
        if pre.execution.cudagraphs:
            for layer in pre.layers:
                layer.curvature.install_in_place = True

    def _modules_in_groups(self, model: nn.Module) -> list[nn.Module]:
        """The model's modules whose weight this optimizer owns; weight and bias in one group."""
        group_of = {p: i for i, group in enumerate(self.param_groups) for p in group["params"]}
        ours = {id(p) for p in unwrap_model(model).parameters()}
        foreign = [tuple(p.shape) for p in group_of if id(p) not in ours]
        if foreign:
            raise ValueError(f"Invalid params: {len(foreign)} tensor(s) of shapes {foreign} are not parameters of "
                             "the model (EKFAC's parameter groups are over the model it hooks into)")
        owned = []
        for name, module in unwrap_model(model).named_modules():
            weight, bias = weight_and_bias(module)
            if weight is None or weight not in group_of:
                continue
            if bias is not None and bias.requires_grad and group_of.get(bias) != group_of[weight]:
                raise ValueError(f"Invalid params: the weight and bias of module {name!r} must be in the same "
                                 "parameter group (they are preconditioned together)")
            owned.append(module)
        return owned

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate before torch adds it, so that a rejected group leaves param_groups unchanged.
        check_group({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)
        pre = getattr(self, "_preconditioner", None)
        if pre is None:  # torch.optim.Optimizer.__init__ adding the groups given at construction
            return
        new = self.param_groups[-1]["params"]
        pre.watch_backward(new)
        ids = {id(p) for p in new}
        owners = [m for m in self._model.modules() if id(weight_and_bias(m)[0]) in ids]
        if not owners:
            return
        found = discover(self._model, inputs_only=pre.config.curvature_class.inputs_only, modules=owners)
        names = [name for name, _ in found.layers]
        if names:
            reason = "its parameters were added by add_param_group after construction (not preconditioned)"
            pre.plain.update(dict.fromkeys(names, reason))
            warnings.warn(f"ekfac_triton: add_param_group: modules {names} are layers this optimizer could "
                          "precondition, but layers are found at construction only: they get the plain update "
                          "(momentum on the raw gradient). To precondition them, construct the optimizer with "
                          "every parameter group (params=[...])", UserWarning, stacklevel=2)

    # -- introspection ----------------------------------------------------------------------------
    @property
    def preconditioner(self) -> Preconditioner:
        """The curvature engine (layers, statistics, counts)."""
        return self._preconditioner

    def preconditioned_modules(self) -> list[str]:
        """Names of the modules that get curvature preconditioning."""
        return self._preconditioner.preconditioned_modules()

    def plain_update_report(self) -> dict[str, str]:
        """Every module with a weight that gets the plain update instead, with its reason."""
        return self._preconditioner.plain_update_report()

    def coverage(self) -> Coverage:
        """The fraction of this optimizer's trainable elements (its parameter groups) that get
        curvature-preconditioned directions, and the names of the others
        (:class:`~ekfac_triton.discovery.Coverage`)."""
        ours = {id(p) for group in self.param_groups for p in group["params"]}
        named = [(n, p) for n, p in self._preconditioner._named_parameters if id(p) in ours]
        return coverage(named, [layer.adapter for layer in self._preconditioner.layers])

    def remove_hooks(self) -> None:
        """Remove the hooks on the model (the optimizer cannot update statistics afterwards)."""
        self._preconditioner.remove_hooks()

    def __repr__(self) -> str:
        return f"{super().__repr__()}\n{self._preconditioner!r}"

    # -- the backward -------------------------------------------------------------------------
    def backward(self, output: Tensor, target: Tensor) -> Tensor:
        """``loss(output, target)``, the curvature backward of mc/type-2 (on statistics steps),
        then ``loss.backward()``; returns the detached loss. Needs ``loss`` at construction.
        See :meth:`Preconditioner.backward`.

        Args:
            output: the model output of this step's forward.
            target: the targets, as the loss module takes them.
        """
        return self._preconditioner.backward(output, target)

    def curvature_backward(self, output: Tensor) -> None:
        """Only the curvature backward (mc/type-2), for loops that compute the loss themselves:
        call it before ``loss.backward()`` (it needs the graph). Touches no ``.grad``.
        See :meth:`Preconditioner.curvature_backward`.

        Args:
            output: the model output the loss is applied to.
        """
        self._preconditioner.curvature_backward(output)

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimisation step (the closure, if given, re-evaluates the loss with gradients).

        A step whose gradients or captured activations are not finite is skipped: parameters and
        every state tensor stay as they are (see :meth:`StepEngine.advance
        <ekfac_triton.step.engine.StepEngine.advance>`); so is a step in which the
        ``grad_scaler`` found inf/NaN. ``scaler.step(opt)`` of a ``torch.amp.GradScaler`` not
        passed as ``grad_scaler=`` gives the same step as passing it, except after
        ``scaler.unscale_(opt)``, where the loss scale is unknown here: that raises. A step
        without a backward since the last one changes nothing (a warning). The step runs outside
        autocast.

        Raises:
            RuntimeError: when this is the ``max_skipped_steps``-th non-finite step in a row (the
                run has stopped training; the message says what to change).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group_of: dict[Tensor, dict[str, Any]] = {p: g for g in self.param_groups for p in g["params"]}
        grads = [p.grad for p in group_of if p.grad is not None]
        for g in grads:
            if g.is_sparse:
                self._preconditioner.discard_capture()
                raise RuntimeError("EKFAC does not support sparse gradients")
        if self._preconditioner.backward_missing(stacklevel=5):  # past no_grad and torch's step wrapper
            return loss
        self._preconditioner.warn_unfrozen(stacklevel=5)
        # Set by GradScaler.step (protocol above) for this call only.
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        if found_inf is not None and bool(found_inf):
            self._preconditioner.skip_step()
            return loss
        pre = self._preconditioner
        if found_inf is not None and pre.config.statistics.grad_scaler is None:
            if grad_scale is None:
                pre.discard_capture()
                raise RuntimeError("ekfac_triton: a torch.amp.GradScaler stepped this optimizer after "
                                   "scaler.unscale_(opt), but it was built without grad_scaler=: the captured "
                                   "output-gradients carry the loss scale, which this step cannot know. Pass "
                                   "grad_scaler=scaler to the optimizer")
            # the scale the captures carry: what grad_scaler=scaler would read (scaler.get_scale())
            pre.driving_scale = float(grad_scale)
        if grad_scale is not None:  # not unscaled by the user: as GradScaler.unscale_ would
            inv_scale = grad_scale.double().reciprocal().float()
            for g in grads:
                g.mul_(inv_scale.to(g.device))
        try:
            with torch.autocast(pre.device.type, enabled=False):
                self._step(group_of, grads)
        finally:
            pre.driving_scale = None
        return loss

    def _step(self, group_of: dict[Tensor, dict[str, Any]], grads: list[Tensor]) -> None:
        """The engine's phases, then — through the execution strategy — the directions, the
        step's check, and KL clip, weight decay, momentum and the update of every parameter
        (:mod:`ekfac_triton.step.maths`); the step commits only once all of it has run."""
        pre = self._preconditioner
        try:
            for group in self.param_groups:  # values may have been changed since construction
                check_group(group)
        except ValueError:
            pre.discard_capture()  # this step is over: its batch must not count towards the next
            raise
        fuse = not pre.execution.compiled and pre.backend == "triton" and pre.config.kl_clip is None
        plan = pre.advance(lambda layer: group_of[layer.adapter.weight]["damping"], also_check=grads,
                           fused=self._fusable if fuse else None)
        if plan is None:
            return
        fused = [layer for layer, job in zip(plan.layers, plan.jobs) if job is None]
        stateless = [p for p in group_of if p not in self.state]  # momentum buffers the step may create
        plan.transaction.on_rollback(lambda: [self.state.pop(p, None) for p in stateless])
        try:
            groups, jobs, layouts, lr_at = self._updates(plan, group_of,
                                                         {p for layer in fused for p in layer.adapter.params})
            # the update is part of the step's transaction: parameters and buffers can be put back
            plan.transaction.before_update(
                t for p in group_of if p.grad is not None
                for t in (p, *(self.state[p].get(k) for k in ("momentum_buffer", "exp_avg", "exp_avg_sq"))))
            if not pre.execution.apply_update(pre, plan, jobs, layouts, groups, pre.config.kl_clip, lr_at,
                                              self.decoupled_weight_decay):
                return
            for layer in fused:
                group = group_of[layer.adapter.weight]
                layer.curvature.fused_update(layer.adapter, self._momentum_buffer, damping=group["damping"],
                                             lr=group["lr"], momentum=group["momentum"],
                                             weight_decay=group["weight_decay"],
                                             decoupled=self.decoupled_weight_decay, backend=pre.backend)
            for group in groups:  # last: nothing after it can fail and leave the counts advanced
                if isinstance(group, maths.AdamWUpdate):
                    for p in group.params:
                        self.state[p]["step"] += 1
        except BaseException:
            if not plan.committed:
                pre.abort(plan.transaction)
            raise
        pre.finish(plan)

    def _updates(self, plan: StepPlan, group_of: dict[Tensor, dict[str, Any]], fused: set[Tensor],
                 ) -> tuple[list[Any], list[Any], tuple[MatrixLayout, ...], tuple[int, ...]]:
        """The per-group updates of ``plan`` (``GroupUpdate``, and ``AdamWUpdate`` for the
        parameters without curvature with ``plain_update="adamw"``; their lrs appended to
        ``plan.scalars``), the
        direction jobs, their layers' matrix layouts and the lr index of each job."""
        lr_index = {}
        for g, group in enumerate(self.param_groups):
            lr_index[g] = len(plan.scalars)
            plan.scalars.append(group["lr"])
        index_of = {id(group): g for g, group in enumerate(self.param_groups)}
        jobs, layouts, lr_at, part_of = [], [], [], {}
        for layer, job in zip(plan.layers, plan.jobs):
            if job is None:
                continue
            a = layer.adapter
            for part, p in enumerate(a.params):
                part_of[p] = (len(jobs), part)
            lr_at.append(lr_index[index_of[id(group_of[a.weight])]])
            layouts.append(a.layout)
            jobs.append(job)
        groups: list[Any] = []
        for g, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None and p not in fused]
            if self.plain_update == "adamw":
                plain = [p for p in params if p not in part_of]
                params = [p for p in params if p in part_of]
                if plain:
                    groups.append(self._adamw_update(plain, group, plan.scalars))
            if not params:
                continue
            buffers = [self._momentum_buffer(p) for p in params] if group["momentum"] != 0 else [None] * len(params)
            groups.append(maths.GroupUpdate(params, [p.grad for p in params], buffers,
                                            tuple(part_of.get(p, (-1, 0)) for p in params), lr_index[g],
                                            float(group["momentum"]), float(group["weight_decay"])))
        return groups, jobs, tuple(layouts), tuple(lr_at)

    def _adamw_update(self, params: list[Tensor], group: dict[str, Any], scalars: list[float]) -> maths.AdamWUpdate:
        """The AdamW update of a group's parameters without curvature (``plain_update="adamw"``);
        its lr, step sizes ``lr/(1 − β1ᵗ)`` and ``√(1 − β2ᵗ)`` (computed as torch.optim.AdamW
        computes them, in Python floats) appended to ``scalars``."""
        beta1, beta2 = group["plain_betas"]
        lr = group["plain_lr"]
        lr_at = len(scalars)
        scalars.append(lr)
        at = []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            t = float(state["step"]) + 1
            at.append(len(scalars))
            scalars += [lr / (1 - beta1 ** t), (1 - beta2 ** t) ** 0.5]
        return maths.AdamWUpdate(params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                                 [self.state[p]["exp_avg_sq"] for p in params], lr_at, tuple(at), float(beta1),
                                 float(beta2), float(group["plain_eps"]), float(group["plain_weight_decay"]))

    @staticmethod
    def _fusable(layer: PreconditionedLayer) -> bool:
        # the fused kernel updates rows of a (d_out, d_in) weight: a transposed one (Conv1D) is not fused
        return bool(getattr(layer.curvature, "fusable", False)) and not layer.adapter.layout.transposed

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    # -- serialisation ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state (momentum buffers, groups) plus the curvature state."""
        state = super().state_dict()
        state["preconditioner"] = self._preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        if "preconditioner" not in state_dict:
            raise ValueError("Invalid state_dict: it has no 'preconditioner' entry (not saved by EKFAC?)")
        preconditioner = state_dict.pop("preconditioner")
        self._preconditioner.check_state_dict(preconditioner)  # everything is checked before anything changes
        self._check_buffers(state_dict)
        super().load_state_dict(state_dict)
        self._preconditioner.load_state_dict(preconditioner)

    def _check_buffers(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` if a saved momentum buffer does not fit its parameter (torch checks
        the groups' sizes, not the buffers' shapes)."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            return  # torch raises its own clear error
        state = state_dict.get("state", {})
        for saved, group in zip(saved_groups, self.param_groups):
            saved_plain = "adamw" if "plain_lr" in saved else "sgd"
            if saved_plain != self.plain_update:
                raise ValueError(f"Invalid state_dict: it was saved with plain_update={saved_plain!r}, this optimizer "
                                 f"uses plain_update={self.plain_update!r}")
            for key, p in zip(saved.get("params", []), group["params"]):
                for name in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                    buffer = state.get(key, {}).get(name)
                    if isinstance(buffer, Tensor) and buffer.shape != p.shape:
                        raise ValueError(f"Invalid state_dict: the {name} of parameter {key} has shape "
                                         f"{tuple(buffer.shape)}, the parameter {tuple(p.shape)} (a model of another "
                                         "width?)")


EKFAC.__doc__ = EKFAC.__doc__.replace("{arguments}", argument_docs(curvatures=tuple(CURVATURES.values())))


class KFAC(EKFAC):
    """K-FAC: :class:`EKFAC` with ``curvature="kfac"`` (all other arguments as there)."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        if kwargs.setdefault("curvature", "kfac") != "kfac":
            raise ValueError(f"Invalid curvature={kwargs['curvature']!r}: KFAC is curvature='kfac'")
        super().__init__(model, **kwargs)


class TEKFAC(EKFAC):
    """TEKFAC: :class:`EKFAC` with ``curvature="tekfac"`` (all other arguments as there)."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        if kwargs.setdefault("curvature", "tekfac") != "tekfac":
            raise ValueError(f"Invalid curvature={kwargs['curvature']!r}: TEKFAC is curvature='tekfac'")
        super().__init__(model, **kwargs)


def _exact_configuration(momentum: float, weight_decay: float, options: dict[str, Any]) -> bool:
    """Whether the step is the exact one of the public contract: ``momentum=0, weight_decay=0,
    factor_decay=0, eigen_every=1`` (the last two given in ``options`` or by their defaults)."""
    defaults = {f.name: f.default for cls in (StatisticsConfig, EigenConfig) for f in dataclasses.fields(cls)}
    return (momentum == 0 and weight_decay == 0 and options.get("factor_decay", defaults["factor_decay"]) == 0
            and options.get("eigen_every", defaults["eigen_every"]) == 1)
