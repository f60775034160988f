"""The curvature engine of a model: :class:`Preconditioner` builds it (configuration, layer
discovery, captures, curvatures, strategies) and runs its phased step
(:class:`~ekfac_triton.step.engine.StepEngine`). It is also public, for users who keep their own
torch optimizer: its :meth:`~Preconditioner.step` rewrites ``.grad`` in place and that optimizer
steps."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .backend import resolve_backend
from .capture import LayerCapture, forget_compiled_calls
from .config import PreconditionerConfig, argument_docs, check_damping, check_lr
from .curvature import CURVATURES, Curvature, LayerShape, RefreshRequest, curvature_class
from .discovery import Coverage, coverage, discover, plain_update_warning
from .distributed import DataParallel, SingleProcess, resolve_process_group, unwrap_model
from .eigen_engine import EigenEngine
from .fisher import curvature_backward, training_backward
from .layers import weight_and_bias
from .step import maths
from .step.engine import PreconditionedLayer, StepEngine

__all__ = ["PreconditionedLayer", "Preconditioner"]


def _factor_dtype(weight: Tensor) -> torch.dtype:
    # Statistics of half-precision layers accumulate in float32; float64 models stay float64.
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class Preconditioner(StepEngine):
    """Kronecker-factored eigenbasis preconditioner for the Linear, Conv2d and Embedding layers
    of a model.

    Used on its own, call :meth:`step` after ``loss.backward()``: it replaces each preconditioned
    layer's ``.grad`` by ``(F̂ + λI)⁻¹ ∇L`` (times the KL-clip factor when ``kl_clip`` is set), and
    your optimizer then steps (plain SGD on top gives natural-gradient descent)::

        pre = Preconditioner(model, curvature="ekfac", lr=0.1)   # lr: the KL clip's trust region
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss.backward(); pre.step(); opt.step(); opt.zero_grad()

    With ``fisher="mc"`` or ``"type-2"`` the statistics come from extra backward passes of the
    model output (:mod:`ekfac_triton.fisher`), run by :meth:`backward` (or
    :meth:`curvature_backward` before your own ``loss.backward()``)::

        pre = Preconditioner(model, fisher="type-2", loss=nn.CrossEntropyLoss())
        pre.backward(model(x), y); pre.step(); opt.step(); opt.zero_grad()

    Args:
        model: the module whose ``nn.Linear``, transformers ``Conv1D``, ``nn.Conv2d`` (groups=1,
            zero padding) and ``nn.Embedding`` (no max_norm, not sparse; not with
            ``curvature="mac"``) submodules (subclasses included; more kinds with
            :func:`ekfac_triton.register_adapter`; a tied weight by one owner, see
            :mod:`ekfac_triton.discovery`) are
            preconditioned (with ``curvature="mac"`` also depthwise convolutions and
            self-attention ``nn.MultiheadAttention``); hooks are registered on them
            (:meth:`remove_hooks`). May be wrapped in DistributedDataParallel.
        damping: λ added to the scaling, > 0 (MAC: ρ).
        curvature: ``"ekfac"``, ``"kfac"``, ``"tekfac"``, ``"mac"`` (:mod:`ekfac_triton.curvature`)
            or a :class:`~ekfac_triton.curvature.Curvature` subclass.
        lr: learning rate the KL clip assumes (required with a ``kl_clip`` number; without it the
            default ``kl_clip="auto"`` clips nothing, with it it is the curvature's default).
        modules: restrict preconditioning to these submodules (default: all supported ones).
        process_group: data-parallel training (:mod:`ekfac_triton.distributed`): None (default)
            is not distributed unless ``model`` is wrapped in DistributedDataParallel (then DDP's
            group); a ``torch.distributed`` process group averages the statistics over its ranks
            and splits the eigendecompositions among them.
{arguments}
    """

    def __init__(self, model: nn.Module, *, damping: float = 1e-2, curvature: str | type[Curvature] = "ekfac",
                 lr: float | None = None, modules: Sequence[nn.Module] | None = None,
                 process_group: object | None = None, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model={type(model).__name__}: must be a torch.nn.Module")
        if options.get("kl_clip", "auto") == "auto":  # the curvature's trust region; it needs the lr
            options = {**options, "kl_clip": curvature_class(curvature).default_kl_clip if lr is not None else None}
        self.config = config = PreconditionerConfig.from_arguments(curvature, options)
        curvature_cls = config.curvature_class
        if config.fisher.fisher != "empirical" and curvature_cls.inputs_only:
            raise ValueError(f"Invalid fisher={config.fisher.fisher!r} with curvature={config.curvature!r}: this "
                             "curvature reads only the layer inputs, so it has no Fisher type (use fisher='empirical')")
        group = resolve_process_group(model, process_group)
        model = unwrap_model(model)
        check_damping(damping)
        if config.kl_clip is not None:
            if lr is None:
                raise ValueError("Invalid lr=None: kl_clip needs the learning rate (pass lr=...)")
            check_lr(lr)
        self.damping, self.lr = damping, lr
        self._init_counts()
        found = discover(model, inputs_only=curvature_cls.inputs_only, modules=modules)
        self.unsupported, self.plain, self.tied = found.unsupported, found.plain, found.tied
        self._named_parameters = list(model.named_parameters())
        named = dict(model.named_modules())
        weights = [(name, weight_and_bias(named[name])[0]) for name in found.unsupported if name in named]
        self.frozen = [(name, w) for name, w in weights if isinstance(w, Tensor) and not w.requires_grad]
        if group is not None and any(adapter.one_hot_inputs for _, adapter in found.layers):
            embeddings = [name for name, adapter in found.layers if adapter.one_hot_inputs]
            raise ValueError(f"Invalid process_group: data-parallel training does not support nn.Embedding layers "
                             f"yet ({embeddings}); exclude them with modules=... or params=...")
        if not found.layers:
            detail = f" (unsupported: {self.unsupported})" if self.unsupported else ""
            raise ValueError("Invalid model: it has no supported layer to precondition "
                             f"(nn.Linear, nn.Conv2d with groups=1, nn.Embedding){detail}")
        stats = config.statistics
        self.layers = []
        for name, adapter in found.layers:  # hooks last: a refused model keeps none
            shape = LayerShape(d_out=adapter.d_out, d_in=adapter.d_in, bias=adapter.has_bias,
                               one_hot=adapter.one_hot_inputs, value_rows=adapter.value_rows)
            curv = curvature_cls(shape, stats.factor_dtype or _factor_dtype(adapter.weight), adapter.weight.device,
                                 config.options)
            curv.basis_dtype = stats.basis_dtype
            capture = LayerCapture(adapter.hooked_module, adapter.read_call, adapter.num_examples)
            self.layers.append(PreconditionedLayer(name, adapter, capture, curv))
        self.device = self.layers[0].adapter.weight.device
        # MC targets are drawn with this generator (on the model's device; saved in state_dict).
        # Only fisher="mc" seeds it from the global RNG: constructing any other preconditioner
        # must not advance torch's RNG (a user's data order would silently change).
        self.generator = torch.Generator(device=self.device)
        if config.fisher.fisher == "mc":
            seed = config.fisher.seed
            self.generator.manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
        self.backend = resolve_backend(stats.backend, self.device)
        costs = [layer.curvature.refresh_cost() for layer in self.layers]
        eigen = config.eigen
        self.eigen = EigenEngine(costs, self.device, period=eigen.eigen_every, stagger=eigen.stagger,
                                 synchronous=eigen.synchronous, float64_max_dim=eigen.float64_max_dim,
                                 warm_starts=eigen.warm_starts)
        self.distribution = SingleProcess() if group is None else DataParallel(group, costs, self.device)
        message = plain_update_warning(found)
        if message is not None:
            warnings.warn(message, stacklevel=2)
        self.watch_backward([p for layer in self.layers for p in layer.adapter.params])
        forget_compiled_calls(model)  # a compiled forward that already ran is retraced with the hooks
        self._arm_capture()

    # -- attributes ----------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The resolved kernel backend (``"torch"`` or ``"triton"``) of every layer."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = value
        for layer in getattr(self, "layers", []):
            layer.curvature.backend = value

    @property
    def fisher(self) -> str:
        return self.config.fisher.fisher

    @property
    def distributed(self) -> DataParallel | None:
        """The collectives when distributed (None: a single process, no collective at all)."""
        return self.distribution if isinstance(self.distribution, DataParallel) else None

    # -- introspection ----------------------------------------------------------------------------
    def preconditioned_modules(self) -> list[str]:
        """Names of the preconditioned modules, in model order."""
        return [layer.name for layer in self.layers]

    def plain_update_report(self) -> dict[str, str]:
        """Every module with a weight that is left to the plain update, with its reason."""
        return dict(self.plain)

    def coverage(self) -> Coverage:
        """The fraction of the model's trainable elements that are preconditioned
        (:class:`~ekfac_triton.discovery.Coverage`; a tied weight counts as its owner's)."""
        return coverage(self._named_parameters, [layer.adapter for layer in self.layers])

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}(curvature={self.config.curvature!r}, scaling={self.config.scaling!r}, "
                 f"backend={self.backend!r}, steps={self.steps}) preconditioning:"]
        lines += [f"  {layer.name}: {layer.adapter.describe()}" for layer in self.layers]
        lines += [f"  tied {name}: its weight is preconditioned by {owner}" for name, owner in self.tied.items()]
        lines += [f"  not preconditioned {name}: {reason}" for name, reason in self.plain.items()]
        return "\n".join(lines)

    def remove_hooks(self) -> None:
        """Remove every hook this preconditioner registered on the model (and stop the eigen
        worker thread, if any)."""
        for layer in self.layers:
            layer.capture.remove()
        self.unwatch_backward()
        self.eigen.shutdown()

    # -- the backward ---------------------------------------------------------------------------
    def curvature_backward(self, output: Tensor) -> None:
        """The curvature backward passes of ``fisher="mc"`` / ``"type-2"`` on the model output
        of this step's forward (a no-op for ``"empirical"`` and on steps without statistics).
        Call it after the forward and before ``loss.backward()`` frees the graph (it retains
        it); it touches no ``.grad``. Works for eager and ``torch.compile``d models
        (:func:`ekfac_triton.fisher.curvature_backward`).

        Args:
            output: the model output the loss is applied to (logits for the CE and BCE losses).
        """
        curvature_backward(self, output)

    def backward(self, output: Tensor, target: Tensor) -> Tensor:
        """``loss_scale · loss(output, target)``, the curvature backward (mc/type-2, on
        statistics steps), then ``loss.backward()`` (``grad_scaler.scale(loss).backward()`` with
        an enabled ``grad_scaler``); returns the loss (detached, unscaled). Needs ``loss``.

        Args:
            output: the model output of this step's forward.
            target: the targets, as the loss module takes them.
        """
        return training_backward(self, output, target)

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> bool:
        """Precondition every layer's ``.grad`` in place; returns False if the step was skipped
        (non-finite values, or no backward since the last step, with a warning: the gradients
        are then left untouched). Runs outside any autocast region (its arithmetic is in the
        factor and basis dtypes)."""
        if self.backward_missing():
            return False
        self.warn_unfrozen()
        with torch.autocast(self.device.type, enabled=False):
            plan = self.advance(lambda layer: self.damping)
        if plan is None:
            return False
        kl_clip = self.config.kl_clip
        lr_at = ()
        if kl_clip is not None:
            lr_at = (len(plan.scalars),) * len(plan.jobs)
            plan.scalars.append(self.lr)
        with torch.no_grad():
            try:
                directions, scale = maths.directions(plan.jobs, plan.scalars, None, self.backend, kl_clip, lr_at)
            except BaseException:
                self.abort(plan.transaction)
                raise
            if not self.check(plan, directions):
                return False
            for layer, d in zip(plan.layers, directions):
                if scale is not None:
                    d = d * scale
                for p, part in zip(layer.adapter.params, layer.adapter.split(d)):
                    if p.grad is None:
                        p.grad = part.to(p.dtype).clone()
                    else:
                        p.grad.copy_(part)
            self.finish(plan)
        return True

    # -- serialisation ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step counts and every layer's curvature state (references, as torch optimizers do),
        and the eigen engine's: asynchronous refreshes in flight are waited for and saved with
        their results (data-parallel ones by owner and warm start: a resumed run recomputes them
        from the saved factors on their owners)."""
        return {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "layers": [{"name": layer.name, **layer.curvature.state_dict()} for layer in self.layers],
            "fisher": self.fisher,
            "generator": self.generator.get_state(),
            # data-parallel refreshes in flight live on their owner rank only: recomputed on resume
            "eigen": self.eigen.state_dict(pending=self.distributed is None),
            **({"distributed": self.distributed.state_dict()} if self.distributed and self.distributed.in_flight
               else {}),
        }

    def _in_flight_request(self, index: int, warm: bool) -> Any:
        """The refresh request of layer ``index`` as it was submitted (its counts already taken)."""
        curv = self.layers[index].curvature
        return RefreshRequest(index, curv.in_factor, curv.out_factor, (curv.q_in, curv.q_out) if warm else None, False)

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` (naming the layer and the field) unless :meth:`load_state_dict`
        accepts ``state`` whole; nothing is changed."""
        if not isinstance(state, dict) or not isinstance(state.get("layers"), list):
            raise ValueError("Invalid state_dict: not a Preconditioner state_dict (no 'layers' list)")
        missing = [k for k in ("steps", "skipped_steps") if k not in state]
        if missing:
            raise ValueError(f"Invalid state_dict: it lacks {missing}")
        names = [entry.get("name") for entry in state["layers"]]
        if names != self.preconditioned_modules():
            raise ValueError(f"state_dict is for layers {names}, this preconditioner has {self.preconditioned_modules()}")
        if state.get("fisher", "empirical") != self.fisher:
            raise ValueError(f"state_dict is for fisher={state.get('fisher', 'empirical')!r}, this preconditioner "
                             f"uses fisher={self.fisher!r}")
        for layer, entry in zip(self.layers, state["layers"]):
            layer.curvature.check_state(entry, layer.name)
        if "eigen" in state and len(state["eigen"].get("refreshes", ())) != len(self.layers):
            raise ValueError("Invalid state_dict: its eigen refresh counts are for another number of layers")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` of a preconditioner of the same model and settings: checked
        whole first (:meth:`check_state_dict`), so a refused state changes nothing."""
        self.check_state_dict(state)
        self.distribution.cancel(self.eigen)  # refreshes in flight belong to the state being replaced
        for layer, entry in zip(self.layers, state["layers"]):
            layer.curvature.load_state_dict(entry)
        self.steps = int(state["steps"])
        self._host_skipped_steps = int(state["skipped_steps"])
        if "generator" in state:  # resume draws the same MC targets
            self.generator.set_state(state["generator"])
        if "eigen" in state:  # warm-start counts and refreshes in flight (saved since the step redesign)
            self.eigen.load_state_dict(state["eigen"], self.device)
        if self.distributed is not None and "distributed" in state:
            self.distributed.resubmit(state["distributed"], self.eigen, self._in_flight_request)
        self.execution.reset_device_skips()  # the loaded count includes the device-counted skips
        self._arm_capture()


Preconditioner.__doc__ = Preconditioner.__doc__.replace(
    "{arguments}", argument_docs(curvatures=tuple(CURVATURES.values())))
