"""When and where the eigendecompositions run, so that no step pays for all of them.

* **Staggered schedule.** ``torch.linalg.eigh`` is latency-bound and costs roughly n³ per factor:
  refreshing every layer on the same step makes that step tens of times slower than
  the others. Each layer computes its first basis on its first statistics step (step 0 for all
  layers used from the start: that warm-up step pays for all of them), keeps it for at least
  ``eigen_every`` steps, and then refreshes on the steps ``k = j·eigen_every + o_l`` (j ≥ 1) with
  its own offset o_l in [0, eigen_every). Offsets come from longest-processing-time-first
  assignment of the layers' estimated costs ``d_in̄³ + d_out³`` to the least-loaded slot (ties
  to the lowest slot; deterministic). With ``eigen_every=1`` every layer refreshes every step;
  ``stagger=False`` gives offset 0 to all (every layer on the same steps). Timings:
  ARCHITECTURE.md, "Measured facts".
* **Precision.** :func:`~ekfac_triton.eigen.eigh_dtype`: float64 up to ``float64_max_dim``.
* **Warm starts** (``warm_starts=k``): after each full eigh, a layer's next k refreshes are one
  step of subspace iteration from its current basis (:func:`~ekfac_triton.eigen.subspace_iteration`),
  then a full eigh again.
* **Off the critical path** (``synchronous=False``): a due refresh snapshots the two factors and
  hands them to one worker thread; the step goes on with the current basis, and the new basis is
  installed at the start of the first step after the worker has finished. On CUDA the worker runs
  the decomposition on a side stream, and the main stream waits on an event instead of the host
  (no host-device sync on ordinary steps). A layer's first basis is always computed synchronously.
  Results depend on timing: use ``synchronous=True`` (the default on CPU, and with
  ``eigen_every=1``) for reproducible runs.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .eigen import Eigh, eigh_dtype, subspace_iteration, symmetric_eigh

#: float64 eigh is at least as fast as float32 up to about this size on the H100 (measured: 2 vs
#: 5 ms at n = 256, 5 vs 16 ms at 512, 12 vs 11 ms at 1024; ARCHITECTURE.md, "Measured facts")
CUDA_FLOAT64_MAX_DIM = 1024


def stagger_offsets(costs: Sequence[float], period: int) -> list[int]:
    """Offsets in [0, period) spreading ``costs`` evenly (longest processing time first)."""
    slots = [(0.0, slot) for slot in range(period)]
    heapq.heapify(slots)
    offsets = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, slot = heapq.heappop(slots)
        offsets[i] = slot
        heapq.heappush(slots, (load + costs[i], slot))
    return offsets


@dataclass(frozen=True)
class Decomposition:
    """Eigendecompositions of one layer's two factors (None where it failed) and what went wrong."""

    new_in: Eigh | None
    new_out: Eigh | None
    note: str | None


class EigenEngine:
    """Schedules and runs the eigendecompositions of a list of layers.

    Args:
        costs: estimated cost of refreshing each layer (``d_in̄³ + d_out³``).
        device: the layers' device.
        period: ``eigen_every``.
        stagger: spread the refreshes over the period (else all on the same steps).
        synchronous: decompose on the step that is due (else on a worker thread); None picks
            True on CPU and with ``period == 1``, else False on CUDA.
        float64_max_dim: decompose factors up to this dimension in float64; None picks
            ``CUDA_FLOAT64_MAX_DIM`` on CUDA and 0 elsewhere: on the CPU machines float64 eigh
            cost 1.6-2.0x float32 at every size measured (n = 64 ... 1024, torch 2.13, one
            thread), so there is no crossover there.
        warm_starts: cheap subspace-iteration refreshes between two full eighs of a layer.
    """

    def __init__(self, costs: Sequence[float], device: torch.device, *, period: int, stagger: bool = True,
                 synchronous: bool | None = None, float64_max_dim: int | None = None,
                 warm_starts: int = 0) -> None:
        self.period = period
        self.warm_starts = warm_starts
        self._refreshes = [0] * len(costs)
        self.offsets = stagger_offsets(costs, period) if stagger else [0] * len(costs)
        cuda = device.type == "cuda"
        # With eigen_every=1 an asynchronous basis would always lag one step behind its factors
        # (and break the exactness contract, ARCHITECTURE.md, "The update"): the default stays
        # synchronous there.
        self.synchronous = (not cuda or period == 1) if synchronous is None else synchronous
        self.float64_max_dim = (CUDA_FLOAT64_MAX_DIM if cuda else 0) if float64_max_dim is None else float64_max_dim
        self._cuda = cuda
        self._executor: ThreadPoolExecutor | None = None
        self._stream = None
        self._pending: dict[int, Future] = {}
        self.decompositions = 0  # count of layer refreshes computed (sync or async), for tests

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self, pending: bool = True) -> dict[str, Any]:
        """The per-layer refresh counts (they decide which refreshes are warm starts) and, with
        ``pending``, the asynchronous refreshes in flight: waited for and saved with their
        results, so that both this run and one resumed from the state install them at the next
        step."""
        saved: dict[int, Any] = {}
        if pending:
            self.wait()
        for index, future in self._pending.items() if pending else ():
            try:
                result = future.result()[0]
            except Exception:  # a failed worker: collected (and warned about) at the next step
                continue
            saved[index] = {"new_in": None if result.new_in is None else (result.new_in.values, result.new_in.vectors),
                            "new_out": None if result.new_out is None else (result.new_out.values,
                                                                             result.new_out.vectors),
                            "note": result.note}
        return {"refreshes": list(self._refreshes), "pending": saved}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        refreshes = state["refreshes"]
        if len(refreshes) != len(self._refreshes):
            raise ValueError(f"Invalid state_dict: eigen refresh counts for {len(refreshes)} layers, this engine has "
                             f"{len(self._refreshes)}")
        self.cancel()
        self._refreshes = [int(r) for r in refreshes]
        for index, saved in state.get("pending", {}).items():
            sides = [None if side is None else Eigh(*(None if t is None else t.to(device) for t in side))
                     for side in (saved["new_in"], saved["new_out"])]
            future: Future = Future()
            future.set_result((Decomposition(sides[0], sides[1], saved["note"]), None))
            self._pending[int(index)] = future

    def snapshot(self) -> tuple[list[int], int, set[int]]:
        """What a step may change here (for :class:`~ekfac_triton.step.transaction.Transaction`)."""
        return list(self._refreshes), self.decompositions, set(self._pending)

    def restore(self, snapshot: tuple[list[int], int, set[int]]) -> None:
        """Undo a step: its counts, and the refreshes it submitted (their results are dropped)."""
        self._refreshes, self.decompositions, pending = list(snapshot[0]), snapshot[1], snapshot[2]
        for index in [i for i in self._pending if i not in pending]:
            del self._pending[index]

    def in_flight(self, index: int) -> bool:
        """Whether an asynchronous refresh of layer ``index`` is pending (its basis may be
        installed at the start of the next step)."""
        return index in self._pending

    def due(self, index: int, step: int) -> bool:
        """Whether layer ``index`` (which has a basis) refreshes it on ``step``."""
        return step >= self.period and step % self.period == self.offsets[index]

    def warm_basis(self, index: int, q_in: Tensor | None, q_out: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """Count a refresh of layer ``index``; the bases to warm-start it from, or None when this
        refresh is a full eigh (every ``warm_starts + 1``-th one, and the first)."""
        count = self._refreshes[index]
        self._refreshes[index] += 1
        if q_in is None or count % (self.warm_starts + 1) == 0:
            return None
        return q_in, q_out

    def _one(self, factor: Tensor, previous: Tensor | None) -> tuple[Eigh | None, str | None]:
        if factor.dim() == 1:  # a diagonal factor (one-hot inputs): the identity basis, never formed
            return Eigh(factor.clone(), None), None
        dtype = eigh_dtype(factor.shape[0], factor.dtype, self.float64_max_dim)
        return symmetric_eigh(factor, dtype) if previous is None else subspace_iteration(factor, previous, dtype)

    def decompose(self, in_factor: Tensor, out_factor: Tensor,
                  warm: tuple[Tensor, Tensor] | None = None) -> Decomposition:
        """Both factors' eigendecompositions under the precision and failure policies (one step
        of subspace iteration from ``warm = (q_in, q_out)`` when given)."""
        self.decompositions += 1
        new_in, note_in = self._one(in_factor, None if warm is None else warm[0])
        new_out, note_out = self._one(out_factor, None if warm is None else warm[1])
        notes = [f"{side} factor: {note}" for side, note in (("input", note_in), ("output", note_out)) if note]
        return Decomposition(new_in, new_out, "; ".join(notes) or None)

    # -- asynchronous execution ------------------------------------------------------------------
    def submit(self, index: int, in_factor: Tensor, out_factor: Tensor,
               warm: tuple[Tensor, Tensor] | None = None) -> None:
        """Start layer ``index``'s refresh on the worker from snapshots of its factors (a refresh
        still running for that layer is not duplicated)."""
        if index in self._pending:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ekfac-eigh")
            if self._cuda:
                self._stream = torch.cuda.Stream(device=in_factor.device)
        snaps = [in_factor.clone(), out_factor.clone()] + ([] if warm is None else [w.clone() for w in warm])
        ready = None
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record()
            for t in snaps:
                t.record_stream(self._stream)
        warm_snap = None if warm is None else (snaps[2], snaps[3])
        self._pending[index] = self._executor.submit(self._work, snaps[0], snaps[1], warm_snap, ready)

    def _work(self, snap_in: Tensor, snap_out: Tensor, warm: tuple[Tensor, Tensor] | None,
              ready) -> tuple[Decomposition, object]:
        if not self._cuda:
            return self.decompose(snap_in, snap_out, warm), None
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            result = self.decompose(snap_in, snap_out, warm)
            done = torch.cuda.Event()
            done.record(self._stream)
        return result, done

    def ready(self) -> bool:
        """Whether an asynchronous refresh has finished and waits to be collected."""
        return any(future.done() for future in self._pending.values())

    def collect(self) -> dict[int, Decomposition]:
        """Finished asynchronous refreshes, by layer index (never waits)."""
        finished = {}
        for index, future in list(self._pending.items()):
            if not future.done():
                continue
            del self._pending[index]
            try:
                result, done = future.result()
            except Exception as err:  # the worker failed: as a failed decomposition, the basis is kept
                finished[index] = Decomposition(None, None, f"the eigendecomposition worker failed ({err!r})")
                continue
            if done is not None:
                main = torch.cuda.current_stream()
                main.wait_event(done)
                for e in (result.new_in, result.new_out):
                    if e is not None:
                        e.values.record_stream(main)
                        e.vectors.record_stream(main)
            finished[index] = result
        return finished

    def wait(self) -> None:
        """Block until every pending refresh has finished (results are kept for :meth:`collect`)."""
        for future in list(self._pending.values()):
            future.exception()

    def cancel(self) -> None:
        """Forget pending refreshes (their results are dropped)."""
        self.wait()
        self._pending.clear()

    def shutdown(self) -> None:
        self.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
