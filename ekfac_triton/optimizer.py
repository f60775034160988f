"""``EKFAC``: a ``torch.optim.Optimizer`` over all parameters of a model. Linear, Conv2d and
Embedding layers get curvature-preconditioned directions; every other parameter its plain gradient. Then weight
decay, momentum and the update act on the direction, as SGD does on a gradient (DESIGN §1)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .config import check_group
from . import ops
from .distributed import unwrap_model
from .compiled_step import CompiledStep, compile_options
from .layers import weight_and_bias
from .preconditioner import PreconditionedLayer, Preconditioner, kl_clip_scale


class EKFAC(torch.optim.Optimizer):
    """EKFAC (George et al. 2018), K-FAC (Martens & Grosse 2015) or TEKFAC (Gao et al. 2020).

    One step: statistics are updated (every ``factor_every`` steps), bases refreshed (every
    ``eigen_every``), each Linear/Conv2d gradient ``[∇W | ∇b]`` becomes
    ``Q_G [(Q_Gᵀ ∇W̄ Q_A) / (S + λ)] Q_Aᵀ``, scaled by the KL clip if set; then for every
    parameter ``u = d + weight_decay·p``, ``m = momentum·m + u``, ``p -= lr·m``. With
    ``momentum=0, weight_decay=0, factor_decay=0, eigen_every=1`` a step changes the
    parameters by exactly ``-lr·(F̂ + λI)⁻¹ ∇L``.

    The loss must be a mean over the batch's first dimension: the per-example statistics
    rescale autograd's gradients by N.

    Fisher types (:mod:`ekfac_triton.fisher`): the default ``fisher="empirical"`` builds the
    statistics from the training backward (``loss.backward(); opt.step()``). ``"mc"`` and
    ``"type-2"`` need the loss module and a curvature backward on the statistics steps::

        opt = EKFAC(model, fisher="type-2", loss=nn.CrossEntropyLoss())
        loss = opt.backward(model(x), y)   # loss, curvature backward, loss.backward()
        opt.step(); opt.zero_grad()

    Args:
        model: the model; hooks are registered on its supported layers.
        lr: learning rate (>= 0; per group).
        damping: λ (> 0; per group).
        curvature: ``"ekfac"``, ``"kfac"`` or ``"tekfac"``.
        momentum: heavy-ball momentum on the direction, in [0, 1) (per group).
        weight_decay: L2 term added to the direction after preconditioning (per group).
        factor_decay: EMA decay of the factors and scalings, in [0, 1); bias-corrected, so the
            first update sets a factor to its batch estimate.
        factor_every: update factors (and per-example scalings) every this many steps.
        eigen_every: recompute each layer's eigenbasis every this many steps (staggered: see
            ``stagger``; a layer's first statistics step always computes its first basis).
        scaling: EKFAC/TEKFAC scaling estimator: ``"per_example"`` (exact diagonal in the
            eigenbasis), ``"batch"`` (EMA of ``N·(Q_Gᵀ∇W̄Q_A)²``, no per-example work, updated every
            step) or ``"per_position"`` (positions as examples, an approximation for sequence and
            conv layers). Ignored by K-FAC.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        kl_clip: None (default) or the KL-clip size: the preconditioned directions are scaled by
            ``min(1, sqrt(kl_clip / |Σ lr²⟨v, g⟩|))`` (kfac-pytorch's semantics).
        effective_damping: TEKFAC only: damp each layer with ``max(mean(Θ_l), λ)``.
        stagger: give each layer an offset in [0, eigen_every) chosen by its estimated
            eigendecomposition cost, so that no step refreshes every layer (the first does).
            With ``eigen_every=1`` every layer refreshes every step either way.
        synchronous: True: refresh bases on the due step (reproducible); False: on a worker
            thread (a side CUDA stream on GPU), the new basis installed at the first step boundary
            after it is ready. None (default): True on CPU
            and with ``eigen_every=1``, else False on CUDA.
        float64_max_dim: factors up to this dimension are eigendecomposed in float64; None
            (default): 1024 on CUDA (where float64 eigh is as fast, DESIGN §4), 0 on CPU.
        warm_starts: after each full eigh, a layer's next ``warm_starts`` refreshes are one step
            of subspace iteration with QR from its previous basis (SOAP-style, cheaper than eigh),
            then a full eigh again. 0 (default): every refresh is a full eigh.
        params: optional parameter groups (as for any torch optimizer) over the model's
            parameters, e.g. for per-group lr, damping or weight decay; a layer's weight and bias
            must share a group. Default: all parameters of ``model`` in one group.
        process_group: data-parallel training (:mod:`ekfac_triton.distributed`). None (default):
            not distributed, unless ``model`` is wrapped in ``DistributedDataParallel`` (pass the
            wrapper), whose process group is then used; a ``torch.distributed`` process group:
            statistics averaged over its ranks (gradients must already be averaged, by DDP or
            :func:`ekfac_triton.distributed.average_gradients`), eigendecompositions split among
            them, the state identical on every rank.
        decoupled_weight_decay: False (default): ``u = d + weight_decay·p`` (L2, as above);
            True: ``u = d`` and ``p <- p·(1 − lr·weight_decay)`` before ``p -= lr·m``
            (Loshchilov & Hutter; MAC's ImageNet/GPT recipes).
        factor_dtype: dtype of the factors, ``torch.float32`` or ``torch.float64``; None
            (default): float64 for float64 layers, else float32. bf16/fp16 activations and
            output-gradients (autocast) are accumulated in it.
        basis_dtype: dtype of the eigenbases, eigenvalues and scalings, ``torch.float32`` or
            ``torch.float64``; None (default): the factors' dtype.
        fisher: ``"empirical"`` (default), ``"mc"`` or ``"type-2"``: the Fisher the statistics
            estimate. empirical: gradients of the training loss, no extra cost. mc: targets drawn
            from the model's predictive distribution, ``mc_samples`` extra backward passes per
            statistics step. type-2: the exact Gauss-Newton through a factor of the loss Hessian,
            P·C extra backward passes per statistics step (C classes / outputs at each of P
            output positions; P = 1 for (N, C) outputs) and P·C times the output-gradient memory. mc and type-2 need ``loss`` and, on each statistics step,
            :meth:`backward` (or :meth:`curvature_backward` before ``loss.backward()``); a step
            whose statistics are due without it raises. ``scaling="batch"`` takes S from the
            training gradient whatever the Fisher type.
        loss: the training loss module: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or
            ``nn.BCEWithLogitsLoss`` with reduction ``"mean"``. Required for mc/type-2; with
            empirical optional (it lets :meth:`backward` compute the loss).
        mc_samples: MC draws per example (>= 1, only with ``fisher="mc"``).
        loss_scale: the training loss is ``loss_scale · loss(output, target)`` (e.g. 784 for a
            per-image BCE summed over MNIST's pixels and averaged over the batch); mc/type-2
            estimate the curvature of that scaled loss and :meth:`backward` trains on it.
            Default 1.
        seed: seed of the MC generator (saved in :meth:`state_dict`, so a resumed run draws the
            same targets); None: drawn from torch's global RNG.
        grad_scaler: the ``torch.amp.GradScaler`` of fp16 training, or None. Needed because the
            captured output-gradients carry the loss scale, which the statistics divide out.
            With it, ``scaler.step(opt)`` always calls :meth:`step` (torch's
            ``_step_supports_amp_scaling`` protocol): a step in which the scaler found inf/NaN
            is skipped with the optimizer state untouched; gradients not yet unscaled are
            unscaled here, so ``scaler.unscale_(opt)`` beforehand is optional (for clipping).
        compile_step: False (default): the step's tensor work runs eagerly. True or a dict of
            ``torch.compile`` arguments (e.g. ``{"mode": "reduce-overhead"}`` for CUDA graphs):
            it runs in a few compiled functions whose graphs do not change with the step
            (refresh steps only change tensor values), and non-finite steps are skipped on the
            device where the step would otherwise not sync (:mod:`ekfac_triton.compiled_step`):
            such a skip leaves parameters and state bit-identical but issues no warning and
            still advances the step and EMA counts; ``preconditioner.skipped_steps`` counts it.
            EKFAC, K-FAC and TEKFAC, single process, empirical Fisher, no Embedding layers.
            With a GradScaler every step still syncs once (``found_inf`` is read on the host).
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, damping: float = 1e-3, curvature: str = "ekfac",
                 momentum: float = 0.9, weight_decay: float = 0.0, factor_decay: float = 0.95,
                 factor_every: int = 1, eigen_every: int = 10, scaling: str = "per_example",
                 backend: str = "auto", kl_clip: float | None = None, effective_damping: bool = False,
                 stagger: bool = True, synchronous: bool | None = None, float64_max_dim: int | None = None,
                 warm_starts: int = 0, params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
                 process_group: object | None = None, decoupled_weight_decay: bool = False,
                 factor_dtype: torch.dtype | None = None, basis_dtype: torch.dtype | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None, fisher: str = "empirical",
                 loss: nn.Module | None = None, mc_samples: int = 1, seed: int | None = None,
                 loss_scale: float = 1.0, compile_step: bool | dict[str, Any] = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model={type(model).__name__}: must be a torch.nn.Module "
                            "(EKFAC hooks into the model's layers; pass parameter groups as params=...)")
        if not isinstance(decoupled_weight_decay, bool):
            raise ValueError(f"Invalid decoupled_weight_decay={decoupled_weight_decay!r}: must be a bool")
        self.decoupled_weight_decay = decoupled_weight_decay
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        check_group(defaults)
        super().__init__(list(model.parameters()) if params is None else params, defaults)
        self._preconditioner = Preconditioner(model, damping=damping, curvature=curvature, factor_decay=factor_decay,
                                              factor_every=factor_every, eigen_every=eigen_every, scaling=scaling,
                                              backend=backend, kl_clip=kl_clip, lr=lr,
                                              effective_damping=effective_damping, stagger=stagger,
                                              synchronous=synchronous, float64_max_dim=float64_max_dim,
                                              warm_starts=warm_starts, modules=self._modules_in_groups(model),
                                              process_group=process_group, factor_dtype=factor_dtype,
                                              basis_dtype=basis_dtype, grad_scaler=grad_scaler, fisher=fisher,
                                              loss=loss, mc_samples=mc_samples, seed=seed,
                                              loss_scale=loss_scale)
        options = compile_options(compile_step)
        try:
            self._compiled_step = None if options is None else CompiledStep(self._preconditioner, options)
        except ValueError:
            self._preconditioner.remove_hooks()  # a refused optimizer leaves no hook on the model
            raise
        # GradScaler.step then calls step() itself, even on inf steps, with grad_scale/found_inf set
        self._step_supports_amp_scaling = grad_scaler is not None

    def _modules_in_groups(self, model: nn.Module) -> list[nn.Module]:
        """The model's modules whose weight this optimizer owns; weight and bias in one group."""
        group_of = {p: i for i, group in enumerate(self.param_groups) for p in group["params"]}
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

    # -- introspection ----------------------------------------------------------------------------
    @property
    def preconditioner(self) -> Preconditioner:
        """The curvature engine (layers, statistics, counts)."""
        return self._preconditioner

    def preconditioned_modules(self) -> list[str]:
        """Names of the modules that get curvature preconditioning."""
        return self._preconditioner.preconditioned_modules()

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
        every state tensor stay as they are (see :meth:`Preconditioner.compute_directions`); so is
        a step in which the ``grad_scaler`` found inf/NaN. The step runs outside autocast.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group_of: dict[Tensor, dict[str, Any]] = {p: g for g in self.param_groups for p in g["params"]}
        grads = [p.grad for p in group_of if p.grad is not None]
        for g in grads:
            if g.is_sparse:
                raise RuntimeError("EKFAC does not support sparse gradients")
        # Set by GradScaler.step (protocol above) for this call only.
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        if found_inf is not None and bool(found_inf):
            self._preconditioner.skip_step()
            return loss
        if grad_scale is not None:  # not unscaled by the user: as GradScaler.unscale_ would
            inv_scale = grad_scale.double().reciprocal().float()
            for g in grads:
                g.mul_(inv_scale.to(g.device))
        with torch.autocast(self._preconditioner.device.type, enabled=False):
            self._step(group_of, grads)
        return loss

    def _step(self, group_of: dict[Tensor, dict[str, Any]], grads: list[Tensor]) -> None:
        """Directions (unless skipped), then weight decay, momentum and the update per group."""

        def damping_of(layer: PreconditionedLayer) -> float:
            return group_of[layer.adapter.weight]["damping"]

        pre = self._preconditioner
        if self._compiled_step is not None:  # every layer's direction is computed in the compiled update
            directions = pre.compute_directions(damping_of, also_check=grads, fused=lambda layer: True)
            if directions is not None:
                self._compiled_step.update(self, directions, self.decoupled_weight_decay)
            return
        fuse = pre.backend == "triton" and pre.config.kl_clip is None
        directions = pre.compute_directions(damping_of, also_check=grads,
                                            fused=self._fusable if fuse else None)
        if directions is None:
            return

        direction_of: dict[Tensor, Tensor] = {}
        fused_layers = [layer for layer, matrix in directions if matrix is None]
        fused_params = {p for layer in fused_layers for p in layer.adapter.params}
        for layer, matrix in directions:
            if matrix is None:
                continue
            for p, part in zip(layer.adapter.params, layer.adapter.split(matrix)):
                direction_of[p] = part
        scale = None
        kl_clip = self._preconditioner.config.kl_clip
        if kl_clip is not None:
            scale = kl_clip_scale(((m, layer.adapter.grad_matrix(), group_of[layer.adapter.weight]["lr"])
                                   for layer, m in directions), kl_clip)

        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p not in fused_params]
            if not params:
                continue
            buffers = [self._momentum_buffer(p) for p in params] if group["momentum"] != 0 else [None] * len(params)
            weight_decay = group["weight_decay"]
            if self.decoupled_weight_decay and weight_decay != 0:
                torch._foreach_mul_(params, 1.0 - group["lr"] * weight_decay)
                weight_decay = 0.0
            ops.moment_update(
                params,
                [direction_of.get(p, p.grad) for p in params],
                buffers,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=weight_decay,
                scales=[scale if p in direction_of else None for p in params],
                backend=self._preconditioner.backend,
            )
        for layer in fused_layers:
            self._fused_update(layer, group_of[layer.adapter.weight])

    @staticmethod
    def _fusable(layer: PreconditionedLayer) -> bool:
        return bool(getattr(layer.curvature, "fusable", False))

    def _fused_update(self, layer: PreconditionedLayer, group: dict[str, Any]) -> None:
        """MAC's preconditioning, weight decay, momentum and update in one kernel launch per block
        of rows with its own vector (one block; an attention layer's value rows are a second)."""
        a, curv = layer.adapter, layer.curvature
        has_m = group["momentum"] != 0
        weight_buffer = self._momentum_buffer(a.weight) if has_m else None
        bias, bias_grad, bias_buffer = a.bias, None, None
        drop_bias = bias is not None and bias.grad is None  # as unfused: a bias without gradient stays
        if drop_bias:
            bias = None
        elif bias is not None:
            bias_grad = bias.grad
            bias_buffer = self._momentum_buffer(bias) if has_m else None

        def rows_of(t: Tensor | None, rows: slice) -> Tensor | None:
            return None if t is None else t[rows]  # contiguous row blocks: views, updated in place

        for rows, mean, sq_norm in curv.row_blocks():
            ops.mac_update(a.weight[rows], a.weight.grad[rows], rows_of(weight_buffer, rows), rows_of(bias, rows),
                           rows_of(bias_grad, rows), rows_of(bias_buffer, rows),
                           mean[: a.d_in] if drop_bias else mean, sq_norm, damping=group["damping"],
                           lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                           decoupled=self.decoupled_weight_decay, backend=self._preconditioner.backend)

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
        super().load_state_dict(state_dict)
        self._preconditioner.load_state_dict(preconditioner)


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
