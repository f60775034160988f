"""The protocol of a job (what a curvature hands the step for one layer and phase): a
``NamedTuple`` of tensors, constants and an offset into the phase's scalars, with
``run(scalars, finite, backend)`` doing its tensor work and, optionally, ``mutated()`` naming
the tensors it updates in place (:mod:`ekfac_triton.curvature.base`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

#: fields holding the batch's own tensors (new every step), not state; ``sums``: the running
#: sums of gradient accumulation (new every step too)
BATCH_FIELDS = frozenset({"a", "g", "grad", "token_weights", "sums"})


def state_tensors(job: Any) -> list[Tensor]:
    """The state tensors a job updates or reads every step (CUDA graphs keep their addresses):
    its tensor fields (or tuples of tensors) other than the batch's own."""
    out = []
    for name in job._fields:
        value = getattr(job, name)
        if name in BATCH_FIELDS:
            continue
        if isinstance(value, Tensor):
            out.append(value)
        elif isinstance(value, tuple):
            out += [t for t in value if isinstance(t, Tensor)]
    return out


def mutated(job: Any) -> tuple[Tensor, ...]:
    """The tensors a job updates in place (its ``mutated()``; none if it has no such method)."""
    names = getattr(job, "mutated", None)
    return () if names is None else tuple(t for t in names() if t is not None)
