"""A step is a transaction: it commits for every layer or changes nothing.

:class:`Transaction` records, when a step starts, what it may change: each curvature's
attributes (tensor references, EMA counts: a shallow copy, no tensor copied), the eigen
engine's counters and pending refreshes, and — just before a tensor is updated in place — a
clone of it (a factor, a scaling, MAC's means, the parameters and momentum buffers: the cost of
one copy of the state the step touches, against the GEMMs that produce it). :meth:`Transaction.rollback` puts all of it
back. The engine rolls back when the step's inputs or what it produced (factors, scalings,
installed eigenvalues, directions) are not finite, and on any exception raised inside the step
(a user mistake, a failed worker, ``KeyboardInterrupt``), so the optimizer stays usable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor


class Transaction:
    """The undo record of one step (see the module docstring).

    Args:
        curvatures: every layer's curvature.
        eigen: the eigen engine (its counters and pending refreshes).
        distribution: the distribution strategy (its ``snapshot``: data-parallel refreshes in flight).
    """

    def __init__(self, curvatures: Iterable[Any], eigen: Any, distribution: Any) -> None:
        self._curvatures = [(curv, dict(vars(curv))) for curv in curvatures]
        self._eigen, self._eigen_state = eigen, eigen.snapshot()
        self._distribution, self._distribution_state = distribution, distribution.snapshot()
        self._clones: list[tuple[Tensor, Tensor]] = []
        self._seen: set[int] = set()
        #: tensors the step produced, checked for finiteness before it commits
        self.produced: list[Tensor] = []
        #: device flags of input checks not yet decided on the host
        self.inputs: list[Tensor] = []
        self._undo: list[Callable[[], None]] = []

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Call ``undo`` on rollback (e.g. to drop state entries the step created)."""
        self._undo.append(undo)

    def before_update(self, tensors: Iterable[Tensor | None]) -> None:
        """Keep a clone of each tensor about to be updated in place (once per step)."""
        for t in tensors:
            if t is not None and id(t) not in self._seen:
                self._seen.add(id(t))
                self._clones.append((t, t.clone()))

    def rollback(self) -> None:
        """Undo the step: tensors updated in place get their values back, then every curvature
        its attributes, the engine its counters."""
        for tensor, clone in reversed(self._clones):
            tensor.copy_(clone)
        for undo in reversed(self._undo):
            undo()
        for curv, attributes in self._curvatures:
            vars(curv).clear()
            vars(curv).update(attributes)
        self._eigen.restore(self._eigen_state)
        self._distribution.restore(self._distribution_state)
        self._clones.clear()
