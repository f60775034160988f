"""The guard of the projected gradient's row form: when may the step form ``Q_outᵀ ∇W̄ Q_in`` as
``(ĜQ_out)ᵀ(ĀQ_in)/N`` from the captured rows instead of from the gradient matrix?

The identity ``∇W̄ = ĜᵀĀ/N`` (ĝ_n = N times the mean loss's output-gradient, ``ā_n = [a_n; 1]``)
holds for a layer with one position per example *when the gradient is exactly that of the
captured statistics*. The user may break it after the backward; the guard must establish it,
not assume it (ARCHITECTURE.md, "The projected gradient from the rows"). Two checks, and what
each can and cannot see:

* :class:`GradientWitness`, exact: a ``register_post_accumulate_grad_hook`` on each parameter
  of the layer records the gradient tensor and its version counter right after autograd has
  accumulated into it, and how often that happened since the last step. At the step the
  gradient must be the same tensor, at the same version, accumulated exactly once. This detects
  every in-place change made through the tensor itself (``clip_grad_norm_``, a GradScaler's
  ``unscale_``, ``p.grad.mul_(...)``, weight decay added to ``.grad``), a replaced or hand-set
  ``.grad``, and gradient accumulation over several backward calls. It cannot see a change made
  through ``p.grad.data`` (a separate version counter), nor contributions that autograd itself
  accumulates in the same backward (a tied weight used elsewhere, a penalty on the weight in the
  loss, gradients not zeroed before the backward).
* :func:`rows_match`, a probe: for one fresh random vector u (float64, the guard's own
  generator) ``∇W̄ u`` against ``Ĝᵀ(Ā u)/N``, elementwise within a rounding-level tolerance
  ``4·N·eps·sqrt((Ĝ/N)²ᵀ (Ā²)(u²))`` (eps of the gradient's dtype): the rounding of N-term float
  sums with a margin (about ``N·eps/6`` times the root-sum-square of the terms when the partial
  sums grow linearly, ``sqrt(N)·eps/5`` for random signs; errors of different columns
  independent), not a worst-case bound, which would be ``sqrt(N·d_in̄)`` times looser: a false
  alarm costs only speed. This sees whatever the witness cannot, of any origin (a tied weight, a
  penalty in the loss, a change through ``.data``, gradients not zeroed), once it exceeds the
  tolerance along u: about ``4·N·eps`` relative (float32, N = 128: 6e-5; float64: 1e-13). What
  it cannot see is a contribution below that: the row form then differs from the gradient form
  by about the rounding with which ∇W̄ itself was accumulated.

Everything else is decided from the configuration, exactly: the empirical Fisher only (mc and
type-2 output-gradients are not the loss's), a single process (data-parallel gradients are
averaged over the ranks, the rows are the rank's own), the eager step, one captured micro-batch,
one position per example, dense inputs, float32/float64 weights (in half precision the probe's
tolerance would exceed what it must detect). When any check fails the step uses the gradient form:
the same direction up to rounding, only slower.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..layers import LayerBatch

#: the ``projected_gradient`` settings: the choice by cost, never, or wherever the guard holds
PROJECTED_GRADIENT = ("auto", "gradient", "rows")


class GradientWitness:
    """Watches the gradients of parameters (see the module docstring): for each, the ``.grad``
    tensor and its version right after autograd last accumulated into it, and how often that
    happened since :meth:`reset`. The engine keeps one over every parameter it holds; it also
    tells which parameters a backward reached (a step without a backward, a layer whose gradient
    arrived without its capture).

    Args:
        params: parameters to watch now (more with :meth:`watch`).
    """

    def __init__(self, params: Sequence[nn.Parameter] = ()) -> None:
        self._seen: dict[int, tuple[weakref.ref, int, int]] = {}
        self._params: list[nn.Parameter] = []
        self._handles: list = []
        self.watch(params)

    def watch(self, params: Sequence[nn.Parameter]) -> None:
        """Watch ``params`` too (those that require a gradient)."""
        seen = self._seen  # the hooks hold the record, not the witness: no reference cycle

        def record(p: Tensor) -> None:
            prior = seen.get(id(p))
            seen[id(p)] = (weakref.ref(p.grad), p.grad._version, 1 if prior is None else prior[2] + 1)

        for p in params:
            if p.requires_grad:
                self._params.append(p)
                self._handles.append(p.register_post_accumulate_grad_hook(record))

    def reset(self) -> None:
        """Forget what was seen (at each step boundary)."""
        self._seen.clear()

    def reached(self, p: Tensor | None = None) -> bool:
        """Whether a backward accumulated into ``p`` (None: into any watched parameter) since
        :meth:`reset`."""
        return bool(self._seen) if p is None else id(p) in self._seen

    def untouched(self, params: Sequence[Tensor] | None = None) -> bool:
        """Whether each of ``params`` (None: the watched ones) has as ``.grad`` the tensor autograd
        accumulated into exactly once since :meth:`reset`, unchanged in place since (False for no
        parameter: nothing was witnessed)."""
        params = self._params if params is None else list(params)
        if not params:
            return False
        for p in params:
            seen = self._seen.get(id(p))
            if seen is None or p.grad is None:
                return False
            ref, version, count = seen
            if count != 1 or ref() is not p.grad or p.grad._version != version:
                return False
        return True

    def remove(self) -> None:
        """Remove the hooks (it sees nothing from then on)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._params = [], []
        self._seen.clear()


def rows_match(grad: Tensor, batch: LayerBatch, bias: bool, generator: torch.Generator) -> Tensor:
    """A 0-dim bool tensor: whether ``grad u`` equals ``Ĝᵀ(Ā u)/N`` within the rounding-level
    tolerance of the module docstring, for one random u from ``generator`` (float64 throughout).

    Args:
        grad: the (d_out, d_in̄) gradient matrix ``[∇W | ∇b]``.
        batch: the captured batch, one position per example (``a``: (N, 1, d_in), ``g``: (N, 1, d_out)).
        bias: whether the last column of ``grad`` is the bias's.
        generator: the probe's generator, on ``grad``'s device.
    """
    f64 = torch.float64
    a, g = batch.a[:, 0].to(f64), batch.g[:, 0].to(f64)
    n, d_in = a.shape
    u = torch.randn(grad.shape[1], generator=generator, dtype=f64, device=grad.device)
    au, au_sq = a @ u[:d_in], a.square() @ u[:d_in].square()
    if bias:
        au, au_sq = au + u[d_in], au_sq + u[d_in].square()
    rows = (g.T @ au) / n
    spread = ((g / n).square().T @ au_sq).sqrt()     # root-sum-square of the terms of (∇W̄ u)_i
    direct = grad.to(f64) @ u
    # ∇W̄'s own accumulation, then the probe's float64 arithmetic on the same magnitudes
    tol = (4 * n * torch.finfo(grad.dtype).eps + 4 * (grad.shape[1] + n) * torch.finfo(f64).eps) * spread
    return ((direct - rows).abs() <= tol).all()
