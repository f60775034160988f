"""Memory measurements for the step-time benchmark: what an optimizer keeps between steps, and
the peak memory of training steps on CPU or CUDA.

* :func:`state_bytes`: the bytes of every tensor an optimizer (and, for EKFAC/K-FAC/MAC, its
  preconditioner: factors, bases, scalings, MAC means, captures) holds, found by walking its
  attributes; the model's own parameters, gradients and buffers are excluded, and storages shared
  by several tensors (views) count once.
* :class:`PeakMemory`: the peak of allocated memory over a window of steps, relative to a
  baseline taken when it is created. On CUDA it reads the caching allocator's counters
  (``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``). On CPU it runs the torch
  profiler with ``profile_memory=True`` from the baseline on and replays its allocation events
  (address, size; a free is a negative size) in time order: the running sum of the bytes
  allocated since the baseline and not yet freed, whose maximum inside the window is the peak.
  It counts what goes through torch's CPU allocator (every tensor); memory that BLAS/LAPACK or
  oneDNN allocate for themselves is not seen. The profiler slows the steps it watches, so the
  benchmark never times steps while it runs.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor, nn

_WINDOW = "bench.memory.window"


# -- state bytes ------------------------------------------------------------------------------------
def _storage_key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def model_storage_keys(model: nn.Module) -> set[tuple[str, int]]:
    """Storages of the model's parameters, their gradients and its buffers."""
    keys = set()
    for p in model.parameters():
        keys.add(_storage_key(p))
        if p.grad is not None:
            keys.add(_storage_key(p.grad))
    for b in model.buffers():
        keys.add(_storage_key(b))
    return keys


#: packages whose objects hold optimizer state: ours and the peers' of bench.peers (SINGD keeps its
#: structured preconditioner matrices in its own objects, not in ``state``)
_OWNING_PACKAGES = ("ekfac_triton", "singd", "heavyball")


def _owned_object(obj: Any) -> bool:
    """Objects whose attributes are walked: this library's (curvatures, captures, engines, ...),
    the peers' (:data:`_OWNING_PACKAGES`) and torch optimizers. Modules are the model, never
    state; anything else (threads, hook handles, generators) holds no tensor of the optimizer's."""
    if isinstance(obj, nn.Module):
        return False
    if isinstance(obj, torch.optim.Optimizer):
        return True
    return type(obj).__module__.split(".")[0] in _OWNING_PACKAGES


def state_bytes(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Bytes of the tensors ``optimizer`` holds (momentum buffers, factors, bases, scalings, MAC
    means, ...), each storage once, the model's parameters, gradients and buffers excluded.

    Args:
        optimizer: a torch optimizer (for :class:`~ekfac_triton.EKFAC` its preconditioner is
            reached through its attributes).
        model: the model it trains; its own tensors are not optimizer state.
    """
    excluded = model_storage_keys(model)
    seen_objects: set[int] = set()
    storages: dict[tuple[str, int], int] = {}
    stack: list[Any] = [optimizer]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, Tensor):
            key = _storage_key(obj)
            if key not in excluded:
                storages[key] = obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, Future):  # a pending asynchronous eigendecomposition (CUDA)
            if obj.done() and obj.exception() is None:
                stack.append(obj.result())
        elif _owned_object(obj):
            if dataclasses.is_dataclass(obj):
                stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
            if hasattr(obj, "__dict__"):
                stack.extend(vars(obj).values())
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if hasattr(obj, slot):
                        stack.append(getattr(obj, slot))
    return sum(storages.values())


def tensor_bytes(tensors: Any) -> int:
    """``Σ numel · element_size`` of an iterable of tensors (e.g. ``model.parameters()``)."""
    return sum(t.numel() * t.element_size() for t in tensors)


# -- peak memory ------------------------------------------------------------------------------------
class PeakMemory:
    """Peak allocated bytes over a window of steps, above the allocation at construction.

    Usage: create it before the optimizer (the baseline: model, data), call
    :meth:`start_window` before the first step that counts, :meth:`stop` after the last; then
    :attr:`peak_bytes` is the largest amount allocated since the baseline at any moment of the
    window (what was allocated before the window and is still alive counts: e.g. optimizer state).

    Args:
        device: the device whose memory is measured (cpu or cuda).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None
        self._window: Any = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self._baseline = torch.cuda.memory_allocated(device)
            self._profiler = None
        elif device.type == "cpu":
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True)
            self._profiler.__enter__()
        else:
            raise ValueError(f"Invalid device={device}: peak memory is measured on cpu or cuda")

    def start_window(self) -> None:
        """The steps from now on count."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)  # the peak restarts at what is allocated now
        else:
            self._window = torch.profiler.record_function(_WINDOW)
            self._window.__enter__()

    def stop(self) -> int:
        """End the window; returns (and stores) :attr:`peak_bytes`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._baseline
            return self.peak_bytes
        if self._window is None:
            raise RuntimeError("PeakMemory.stop() before start_window()")
        self._window.__exit__(None, None, None)
        self._profiler.__exit__(None, None, None)
        self.peak_bytes = peak_from_events(self._profiler)
        return self.peak_bytes


def _walk(nodes: list[Any]) -> Any:
    for node in nodes:
        yield node
        yield from _walk(node.children)


def peak_from_events(prof: torch.profiler.profile) -> int:
    """Replay a CPU memory profile: the peak, inside the ``record_function`` window, of the bytes
    allocated since profiling began and not freed. Frees of memory allocated before profiling
    began are ignored (they lower nothing that was counted)."""
    from torch._C._profiler import _EventType

    events = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    windows = [e for e in events if e.tag == _EventType.TorchOp and e.name == _WINDOW]
    if len(windows) != 1:
        raise RuntimeError(f"expected one {_WINDOW!r} range in the profile, found {len(windows)}")
    t0, t1 = windows[0].start_time_ns, windows[0].end_time_ns
    allocations = sorted((e for e in events if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"),
                         key=lambda e: e.start_time_ns)
    live: dict[int, int] = {}
    current = 0
    peak = None
    for e in allocations:
        if e.start_time_ns >= t0 and peak is None:
            peak = current  # what is alive when the window opens
        if e.start_time_ns > t1:
            break
        ptr, size = e.extra_fields.ptr, e.extra_fields.alloc_size
        if size > 0:
            live[ptr] = size
            current += size
        elif ptr in live:
            current -= live.pop(ptr)
        if peak is not None:
            peak = max(peak, current)
    return current if peak is None else peak
