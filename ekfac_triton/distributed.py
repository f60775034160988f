"""Data-parallel training: statistics averaged across ranks, eigendecompositions split among them.

Every collective of the package lives here; the engine (:mod:`ekfac_triton.preconditioner`) calls
four of them per step at most, and none when it is not distributed.

**Which process group.** ``process_group=None`` (the default) means *not distributed*, unless the
model is wrapped in ``DistributedDataParallel``: then DDP's own group is used. An explicit
``process_group`` (e.g. ``torch.distributed.group.WORLD``) makes the engine distributed over that
group, with or without DDP, and at any world size (1 included). A DDP-wrapped model is unwrapped:
its ``.module`` is the model that is preconditioned, so layer names and state_dicts are the same
with and without DDP.

**Contract.** At ``step()`` the gradients are identical on all ranks: DDP averages them during
the backward; without DDP, call :func:`average_gradients` before stepping. Each rank's loss is
the mean over its local examples, so ĝ = N_local · grad_output is each example's own gradient
(as the layer adapters already compute). Every preconditioned layer runs forward and backward on
every rank at every step (else :class:`RuntimeError` on all ranks). The engine never touches the
gradients.

**Per step** (one statistics step; the other steps have only the first collective):

1. *Agreement* (one tiny all_reduce): the non-finite flag, whether each layer has a gradient, and
   each layer's local batch size N_r. A non-finite value on any rank makes every rank skip;
   the global N = Σ N_r is what the ``batch`` scaling multiplies the (averaged) gradient's P² by.
2. *Factors* (one all_reduce per dtype, all layers flattened into one buffer): every rank applies
   the same EMA update with its local batch estimate, then the ranks' factors are averaged with
   weights N_r / N. The EMA is linear and the factors were identical before the update, so this is
   the EMA of the batch estimate over the union of the ranks' examples — exactly what one process
   would compute on the concatenated batch, for any split of the batch across ranks.
3. *Bases* (one broadcast per owner rank and dtype): the layers whose refresh is due on this step
   (the engine's staggered schedule decides which) are split among the ranks by their estimated
   cost ``d_in̄³ + d_out³`` (:func:`assign_owners`: longest processing time first within the
   step, the heaviest share to the rank with the least work so far; deterministic, so every rank
   computes the same owners); each owner decomposes its layers and broadcasts their eigenvalues
   and eigenvectors in one flattened buffer. Asynchronous refreshes (``synchronous=False``) run on the
   owner's worker thread and are shared at the start of the next step (the owner waits for its
   worker there if needed), so all ranks install a basis on the same step.
4. *Scalings* (``per_example``/``per_position`` EKFAC and TEKFAC; one all_reduce per dtype): as
   the factors, weighted by N_r / N. The ``batch`` scaling needs no collective: it is computed from
   the averaged gradient, identical on all ranks, with the global N.

After each step every state tensor is bitwise identical on all ranks (all_reduce and broadcast
deliver the same bits everywhere), so a state_dict saved on rank 0 and loaded on every rank
resumes exactly. DDP averages the parameter gradients without weights: that equals the gradient of
the mean loss over the concatenated batch only when the local batch sizes are equal (DDP's own
assumption); the statistics are exact either way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .curvature import RefreshRequest
from .eigen import Eigh
from .eigen_engine import Decomposition, EigenEngine, stagger_offsets

__all__ = ["DataParallel", "SingleProcess", "average_gradients", "resolve_process_group", "unwrap_model", "assign_owners"]


def _ddp_class():
    return torch.nn.parallel.DistributedDataParallel


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model itself when ``model`` is wrapped in DistributedDataParallel."""
    return model.module if isinstance(model, _ddp_class()) else model


def resolve_process_group(model: nn.Module, process_group: object | None) -> object | None:
    """The process group the engine averages over, or None when it is not distributed (the rule
    in this module's docstring)."""
    if process_group is None:
        if isinstance(model, _ddp_class()):
            return model.process_group
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"Invalid process_group={process_group!r}: torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(f"Invalid process_group={process_group!r}: must be a torch.distributed.ProcessGroup "
                         "(e.g. torch.distributed.group.WORLD) or None")
    return process_group


def assign_owners(costs: Sequence[float], loads: Sequence[float]) -> list[int]:
    """The rank that computes each of the decompositions due on one step.

    The step's layers are split into ``len(loads)`` bins by longest processing time first (the
    rule of the stagger offsets: the step's slowest rank does as little as possible); then the
    heaviest bin goes to the rank with the least work so far (``loads``, cumulative cost per
    rank; ties to the lowest rank), so that steps with a single due layer alternate between
    ranks. Deterministic: every rank computes the same owners from the same history.
    """
    world = len(loads)
    bins = stagger_offsets(costs, world)
    bin_load = [sum(c for c, b in zip(costs, bins) if b == k) for k in range(world)]
    heaviest_first = sorted(range(world), key=lambda k: (-bin_load[k], k))
    least_loaded_first = sorted(range(world), key=lambda r: (loads[r], r))
    rank_of_bin = dict(zip(heaviest_first, least_loaded_first))
    return [rank_of_bin[b] for b in bins]


@torch.no_grad()
def average_gradients(params: Iterable[Tensor], process_group: object | None = None) -> None:
    """Average the ``.grad`` of ``params`` across the ranks of ``process_group`` (default: the
    world) in place, one all_reduce per dtype: what DDP does, for training without DDP."""
    grads = [p.grad for p in params if p.grad is not None]
    world = dist.get_world_size(process_group)
    for bucket in _by_dtype(grads).values():
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=process_group)
        flat.div_(world)
        _unflatten(flat, bucket)


def _by_dtype(tensors: Iterable[Tensor]) -> dict[torch.dtype, list[Tensor]]:
    buckets: dict[torch.dtype, list[Tensor]] = defaultdict(list)
    for t in tensors:
        buckets[t.dtype].append(t)
    return buckets


def _unflatten(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


@dataclass(frozen=True)
class Agreement:
    """What all ranks agree on at the start of a step."""

    #: whether every checked value was finite (a device tensor for a single process: no sync yet)
    finite: bool | Tensor
    #: per layer, the number of examples over all ranks (0 for layers without a gradient)
    examples: list[int]


class SingleProcess:
    """The default distribution strategy: one process, no collective. :class:`DataParallel` has
    the same interface (the step's phases call it the same way)."""

    rank, world_size = 0, 1

    def agree(self, local_finite: Tensor, examples: Sequence[int]) -> Agreement:
        return Agreement(finite=local_finite, examples=list(examples))

    def average(self, tensors: Sequence[Tensor], weights: Sequence[float]) -> None:
        pass

    def agree_flag(self, flag: Tensor) -> bool:
        """A device flag decided on the host (the step's one sync)."""
        return bool(flag)

    def refresh(self, requests: Sequence[RefreshRequest], eigen: EigenEngine,
                ) -> dict[int, Decomposition]:
        """Run the due decompositions: the synchronous ones now (returned for installing), the
        others on the engine's worker."""
        results = {r.index: _run(r, eigen) for r in requests}
        return {index: result for index, result in results.items() if result is not None}

    def finished(self, eigen: EigenEngine, factors_of: Callable[[int], tuple[Tensor, Tensor]],
                 ) -> dict[int, Decomposition]:
        """Asynchronous refreshes to install now: whatever the worker has finished."""
        return eigen.collect()

    def cancel(self, eigen: EigenEngine) -> None:
        """Drop the refreshes in flight (a state_dict is being loaded)."""
        eigen.cancel()

    def snapshot(self) -> None:
        """What a step may change here (nothing: :mod:`ekfac_triton.step.transaction`)."""

    def restore(self, snapshot: None) -> None:
        pass


def _run(request: RefreshRequest, eigen: EigenEngine) -> Decomposition | None:
    """Decompose ``request`` now (synchronous: the result) or hand it to the worker (None)."""
    if request.synchronous:
        return eigen.decompose(request.in_factor, request.out_factor, request.warm)
    eigen.submit(request.index, request.in_factor, request.out_factor, request.warm)
    return None


class DataParallel:
    """The collectives of one distributed preconditioner.

    Args:
        process_group: the group to average over (None: the default world group).
        costs: estimated decomposition cost of each layer (the eigen engine's).
        device: where the layers' state lives (NCCL needs CUDA tensors in its collectives).
    """

    def __init__(self, process_group: object | None, costs: Sequence[float], device: torch.device) -> None:
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.costs = list(costs)
        self.device = device
        #: cumulative estimated cost of the decompositions each rank has been given (saved, so a
        #: resumed run assigns the same owners; it decides which rank computes a basis, never its value)
        self.loads = [0.0] * self.world_size
        #: asynchronous refreshes submitted on the last step: layer index -> owner rank
        self.in_flight: dict[int, int] = {}
        #: of those, the ones that warm-start from the layer's basis (for a resumed run's resubmit)
        self.in_flight_warm: dict[int, bool] = {}

    def _global_rank(self, rank: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return rank
        return dist.get_global_rank(self.group, rank)

    # -- 1. agreement ------------------------------------------------------------------------------
    def agree(self, local_finite: Tensor, examples: Sequence[int]) -> Agreement:
        """One small all_reduce (and the step's one host sync): the non-finite flag, which layers
        have gradients, and their local batch sizes (``examples[i] = 0``: no gradient here)."""
        present = [float(n > 0) for n in examples]
        flags = torch.tensor([0.0] + present + [float(n) for n in examples], dtype=torch.float64, device=self.device)
        flags[0] = (~local_finite).to(torch.float64)
        dist.all_reduce(flags, group=self.group)
        values = flags.tolist()
        count = len(examples)
        counts, totals = values[1:1 + count], values[1 + count:]
        uneven = [i for i, c in enumerate(counts) if c not in (0.0, float(self.world_size))]
        if uneven:
            raise RuntimeError(f"ekfac_triton: preconditioned layers {uneven} have a gradient on only some ranks; "
                               "every preconditioned layer must run forward and backward on every rank at every step")
        return Agreement(finite=values[0] == 0.0, examples=[int(n) for n in totals])

    def agree_flag(self, flag: Tensor) -> bool:
        """True only if ``flag`` is True on every rank (one tiny all_reduce and a host sync)."""
        failed = (~flag).to(torch.float64).reshape(1).to(self.device)
        dist.all_reduce(failed, group=self.group)
        return failed.item() == 0.0

    # -- 2. and 4. weighted averages -----------------------------------------------------------------
    def average(self, tensors: Sequence[Tensor], weights: Sequence[float]) -> None:
        """In place ``t <- Σ_r w_r t_r`` over the ranks (each rank passes its own ``w_r``; the
        weights of one tensor sum to 1 over the ranks), one all_reduce per dtype."""
        if not tensors:
            return
        grouped: dict[torch.dtype, list[tuple[Tensor, float]]] = defaultdict(list)
        for t, w in zip(tensors, weights):
            grouped[t.dtype].append((t, w))
        for pairs in grouped.values():
            flat = torch.cat([(t * w).reshape(-1) for t, w in pairs])
            dist.all_reduce(flat, group=self.group)
            _unflatten(flat, [t for t, _ in pairs])

    # -- 3. eigendecompositions ------------------------------------------------------------------------
    def owners(self, due: Sequence[int]) -> dict[int, int]:
        """Owner rank of each layer refreshed on this step (:func:`assign_owners`)."""
        costs = [self.costs[i] for i in due]
        owners = assign_owners(costs, self.loads)
        for rank, cost in zip(owners, costs):
            self.loads[rank] += cost
        return dict(zip(due, owners))

    def share(self, owners: dict[int, int], results: dict[int, Decomposition],
              factors: dict[int, tuple[Tensor, Tensor]]) -> dict[int, Decomposition]:
        """Broadcast each owner's decompositions to all ranks: one flattened broadcast per owner
        (and dtype). ``results`` holds this rank's own ones (every owned layer must have one); ``factors`` gives, per layer, the two
        factors (for the shapes and dtype). Returns every layer's decomposition."""
        shared: dict[int, Decomposition] = {}
        by_owner: dict[int, list[int]] = defaultdict(list)
        for index in sorted(owners):
            by_owner[owners[index]].append(index)
        for owner in sorted(by_owner):
            for dtype, indices in _by_dtype_index(by_owner[owner], factors).items():
                sizes = [_packed_size(*factors[i]) for i in indices]
                if owner == self.rank:
                    flat = torch.cat([_pack(results[i], *factors[i]) for i in indices])
                else:
                    flat = torch.empty(sum(sizes), dtype=dtype, device=self.device)
                dist.broadcast(flat, src=self._global_rank(owner), group=self.group)
                # The owner unpacks the buffer too: the same bits *and* the same memory layout on
                # every rank (eigh returns column-major vectors; a GEMM's rounding depends on the
                # layout), so the directions computed from them are bitwise identical as well.
                chunks = flat.split(sizes)
                oks = torch.stack([chunk[:2] for chunk in chunks]).tolist()  # one host sync
                for i, chunk, ok in zip(indices, chunks, oks):
                    unpacked = _unpack(chunk, *factors[i], ok, owner)
                    if owner == self.rank:  # keep the owner's own note (a retry, a failure)
                        unpacked = Decomposition(unpacked.new_in, unpacked.new_out, results[i].note)
                    shared[i] = unpacked
        return shared


    # -- the refresh strategy (the interface of SingleProcess) ----------------------------------------
    def refresh(self, requests: Sequence[RefreshRequest], eigen: EigenEngine) -> dict[int, Decomposition]:
        """Each due decomposition on its owner rank only: the synchronous ones broadcast now (and
        returned on every rank), the others submitted to the owner's worker and shared at the start
        of the next step (:meth:`finished`)."""
        if not requests:
            return {}
        owners = self.owners([r.index for r in requests])
        results: dict[int, Decomposition] = {}
        shared_now: dict[int, int] = {}  # synchronous refreshes to broadcast: layer -> owner
        for r in requests:
            (shared_now if r.synchronous else self.in_flight)[r.index] = owners[r.index]
            if not r.synchronous:
                self.in_flight_warm[r.index] = r.warm is not None
            result = _run(r, eigen) if owners[r.index] == self.rank else None
            if result is not None:
                results[r.index] = result
        if not shared_now:
            return {}
        return self.share(shared_now, results, {r.index: (r.in_factor, r.out_factor) for r in requests
                                                if r.index in shared_now})

    def finished(self, eigen: EigenEngine, factors_of: Callable[[int], tuple[Tensor, Tensor]],
                 ) -> dict[int, Decomposition]:
        """The refreshes submitted on the last step, waited for and broadcast by their owners."""
        if not self.in_flight:
            return {}
        eigen.wait()
        shared = self.share(self.in_flight, eigen.collect(), {i: factors_of(i) for i in self.in_flight})
        self.in_flight, self.in_flight_warm = {}, {}
        return shared

    def cancel(self, eigen: EigenEngine) -> None:
        eigen.cancel()
        self.in_flight, self.in_flight_warm = {}, {}

    def snapshot(self) -> tuple[dict[int, int], dict[int, bool]]:
        """What a step may change here: the refreshes in flight (for the step's transaction)."""
        return dict(self.in_flight), dict(self.in_flight_warm)

    def restore(self, snapshot: tuple[dict[int, int], dict[int, bool]]) -> None:
        self.in_flight, self.in_flight_warm = dict(snapshot[0]), dict(snapshot[1])

    # -- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict[int, object]]:
        """The refreshes in flight (owner and warm start per layer): their results live on the
        owner ranks only, so a resumed run recomputes them (:meth:`resubmit`)."""
        return {"in_flight": dict(self.in_flight), "warm": dict(self.in_flight_warm), "loads": list(self.loads)}

    def resubmit(self, state: dict[str, dict[int, object]], eigen: EigenEngine,
                 request_of: Callable[[int, bool], RefreshRequest]) -> None:
        """After a load: submit again, on their owners, the refreshes that were in flight at the
        save, from the loaded factors (unchanged since they were submitted) and bases, so they
        are shared at the next step exactly as in the run that saved."""
        if len(state.get("loads", self.loads)) == self.world_size:
            self.loads = [float(x) for x in state.get("loads", self.loads)]
        self.in_flight = {int(i): int(owner) for i, owner in state["in_flight"].items()}
        self.in_flight_warm = {int(i): bool(w) for i, w in state["warm"].items()}
        for index, owner in self.in_flight.items():
            if owner == self.rank:
                _run(request_of(index, self.in_flight_warm.get(index, False)), eigen)


def _by_dtype_index(indices: Sequence[int], factors: dict[int, tuple[Tensor, Tensor]]) -> dict[torch.dtype, list[int]]:
    grouped: dict[torch.dtype, list[int]] = defaultdict(list)
    for i in indices:
        grouped[factors[i][0].dtype].append(i)
    return grouped


def _packed_size(in_factor: Tensor, out_factor: Tensor) -> int:
    n, m = in_factor.shape[0], out_factor.shape[0]
    return 2 + n + n * n + m + m * m


def _pack(result: Decomposition, in_factor: Tensor, out_factor: Tensor) -> Tensor:
    """``[ok_in, ok_out, λ_in, Q_in, λ_out, Q_out]`` (zeros for a failed side)."""
    parts = [torch.tensor([float(result.new_in is not None), float(result.new_out is not None)],
                          dtype=in_factor.dtype, device=in_factor.device)]
    for e, factor in ((result.new_in, in_factor), (result.new_out, out_factor)):
        n = factor.shape[0]
        if e is None:
            parts.append(factor.new_zeros(n + n * n))
        else:
            parts += [e.values.reshape(-1), e.vectors.reshape(-1)]
    return torch.cat(parts)


def _unpack(flat: Tensor, in_factor: Tensor, out_factor: Tensor, ok: Sequence[float], owner: int) -> Decomposition:
    ok_in, ok_out = (v != 0.0 for v in ok)
    offset, sides = 2, []
    for ok, factor in ((ok_in, in_factor), (ok_out, out_factor)):
        n = factor.shape[0]
        values, vectors = flat[offset:offset + n], flat[offset + n:offset + n + n * n].view(n, n)
        offset += n + n * n
        sides.append(Eigh(values.clone(), vectors.clone()) if ok else None)
    note = None if ok_in and ok_out else f"the eigendecomposition failed on rank {owner}"
    return Decomposition(sides[0], sides[1], note)
