"""How the step's tensor work runs: eagerly, or compiled (``EKFAC(..., compile_step=...)``).

Both strategies run the same functions (:mod:`ekfac_triton.step.maths`) over the same jobs;
they differ in three things only:

* **scalars**: :class:`Eager` passes the step-varying numbers as a list of Python floats (the
  kernels fuse them into their epilogues); :class:`Compiled` as one float64 device vector per
  phase, rewritten only when its values change, by a non-blocking copy from pinned memory;
* **the non-finite skip**: :class:`Eager` decides it on the host before any update (one host
  sync per step). :class:`Compiled` decides on the host only on a step that refreshes or installs
  a basis (which syncs anyway) or makes a layer's first EMA update (which replaces the state: a
  device skip would still count it); on every other step the decision stays on the device: each
  state update is ``where(finite, new, old)``, so a non-finite step leaves parameters, momentum,
  factors and scalings bit for bit, and a device counter counts it. Unlike the host skip, the
  step and EMA counts then still advance and no warning is issued. Ordinary steps are so free of
  host syncs, and capturable as CUDA graphs (``compile_step={"mode": "reduce-overhead"}``: the
  tensors the graphs read or mutate are then marked as static addresses and new bases are copied
  into the existing tensors);
* **compilation**: :class:`Compiled` wraps each phase function in ``torch.compile`` once. Its
  graphs depend only on the shapes and constant settings, so there is no recompilation after
  the first few steps. With ``backend="triton"`` the kernels enter the graphs as their
  ``torch.library`` ops, single nodes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import maths
from .jobs import state_tensors

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
        known = set(inspect.signature(torch.compile).parameters) - {"model"}
        unknown = sorted(set(compile_step) - known)
        if unknown:
            raise ValueError(f"Invalid compile_step={compile_step!r}: {unknown} are not torch.compile arguments "
                             f"(those are {sorted(known)})")
        return {"fullgraph": True, **compile_step}
    raise ValueError(f"Invalid compile_step={compile_step!r}: must be a bool or a dict of torch.compile arguments")


class Eager:
    """The tensor work runs as plain torch calls; non-finite steps are skipped on the host."""

    compiled = False
    cudagraphs = False

    def scalars(self, name: str, values: list[float]) -> list[float]:
        return values

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def all_finite(self, tensors: Sequence[Tensor], device: torch.device) -> Tensor:
        return self.run(maths.all_finite, list(tensors)) if tensors else torch.ones((), dtype=torch.bool, device=device)

    def finite_flag(self, finite: Tensor) -> Tensor | None:
        """The flag the state updates are masked with (None: unmasked, decided on the host)."""
        return None

    def checks_early(self, special_step: bool) -> bool:
        """Whether the input check is decided on the host before the statistics phases (else
        at the step's check). A special step refreshes or installs a basis, or (compiled)
        makes a first EMA update."""
        return special_step

    def checks_at_end(self, special_step: bool) -> bool:
        """Whether the step's final check (inputs, produced values) is decided on the host."""
        return True

    def mark_static(self, *tensors: Tensor | None) -> None:
        pass

    def apply_update(self, engine: Any, plan: Any, jobs: list[Any], layouts: tuple[Any, ...], groups: list[Any],
                     kl_clip: float | None, lr_at: tuple[int, ...], decoupled: bool) -> bool:
        """The directions and update phases of an optimizer step: the directions, the step's
        check (:meth:`~ekfac_triton.step.engine.StepEngine.check`: nothing is updated unless it
        passes), then the parameters. Returns whether the step passed."""
        dirs, scale = maths.directions(jobs, plan.scalars, None, engine.backend, kl_clip, lr_at)
        if not engine.check(plan, dirs):
            return False
        maths.update_parameters(dirs, scale, layouts, groups, plan.scalars, None, None, decoupled, engine.backend)
        return True

    def device_skips(self) -> int:
        return 0

    def reset_device_skips(self) -> None:
        pass

    def count_host_skip(self) -> None:
        """A skip decided on the host (the compiled step adds it to its device run counter)."""

    def skips_in_a_row(self, host_run: int, steps: int, period: int, host_decided: bool) -> int | None:
        """The current run of consecutive skipped steps, or None when it is not read on this step.
        Eager: ``host_run``, the engine's own count (no sync)."""
        return host_run


class _ScalarVectors:
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


class Compiled(Eager):
    """The phase functions run compiled (see the module docstring).

    Args:
        options: ``torch.compile`` keyword arguments (:func:`compile_options`).
        device: where the optimizer's state lives.
    """

    compiled = True

    def __init__(self, options: dict[str, Any], device: torch.device) -> None:
        self.options = dict(options)
        self.cudagraphs = self.options.get("mode") in CUDAGRAPH_MODES
        self._vectors = _ScalarVectors(device, self.cudagraphs)
        # [skipped in all, skipped in a row] (maths.update_parameters)
        self._skips = torch.zeros(2, dtype=torch.int64, device=device)
        self.mark_static(self._skips)
        self._functions: dict[Callable[..., Any], Callable[..., Any]] = {}

    def scalars(self, name: str, values: list[float]) -> Tensor:
        return self._vectors.load(name, values)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        compiled = self._functions.get(fn)
        if compiled is None:
            compiled = self._functions[fn] = torch.compile(fn, **self.options)
        return compiled(*args)

    def finite_flag(self, finite: Tensor) -> Tensor:
        return finite

    def checks_at_end(self, special_step: bool) -> bool:
        return special_step

    def mark_static(self, *tensors: Tensor | None) -> None:
        """CUDA graphs: tensors the graphs mutate or read every step keep their address."""
        if self.cudagraphs:
            for t in tensors:
                if t is not None:
                    torch._dynamo.mark_static_address(t)

    def apply_update(self, engine: Any, plan: Any, jobs: list[Any], layouts: tuple[Any, ...], groups: list[Any],
                     kl_clip: float | None, lr_at: tuple[int, ...], decoupled: bool) -> bool:
        """The check first (on the host only on special steps), then directions and update in
        one graph, masked by the inputs' and the directions' finiteness."""
        if not engine.check(plan):
            return False
        self.mark_static(*[t for g in groups for t in g.tensors()],
                         *[t for job in jobs for t in state_tensors(job)])
        self.run(maths.precondition_and_update, jobs, layouts, groups, self.scalars("update", plan.scalars),
                 plan.finite, self._skips, kl_clip, lr_at, decoupled, engine.backend)
        return True

    def device_skips(self) -> int:
        """Steps skipped on the device so far (reads the counter: one host sync)."""
        return int(self._skips[0].item())

    def reset_device_skips(self) -> None:
        self._skips.zero_()

    def count_host_skip(self) -> None:
        # a device op, no sync: the run counter then spans host and device skips alike
        self._skips[1].add_(1)

    def skips_in_a_row(self, host_run: int, steps: int, period: int, host_decided: bool) -> int | None:
        """The device run counter, read (one host sync) only where the step synced anyway
        (``host_decided``: a host skip) or once every ``period`` steps: ordinary steps stay free
        of host syncs, and a dead run is caught at most ``period`` steps late."""
        if not host_decided and steps % period != 0:
            return None
        return int(self._skips[1].item())
