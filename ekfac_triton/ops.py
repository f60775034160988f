"""The kernel families as the step calls them, with one calling convention for the eager and the
compiled step.

Each function takes its step-varying numbers (EMA weights, lr, damping) either as Python floats
or as 0-dim tensors, and an optional device flag ``finite``:

* floats and ``finite=None`` (the eager step): the Triton launcher when the resolved backend is
  ``"triton"``, else the torch reference, with the EMA fused into the kernel's epilogue and every
  update in place;
* tensors or a ``finite`` flag (the compiled step, :mod:`ekfac_triton.step.execution`): the
  kernel computes the batch term with the constant weights ``(alpha=1, beta=0)`` into a fresh
  tensor, and the EMA and the commit ``where(finite, new, old)`` are plain tensor code that
  inductor fuses. A state update whose ``finite`` flag is False leaves the state bit for bit.

The Triton launchers themselves fall back to the reference for what their kernels do not cover
(float64 state, tensors off CUDA, R > 1 per-example scalings), so ``backend="triton"`` is always
correct; ``backend="torch"`` never touches Triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import kernels

__all__ = ["Scalar", "commit", "ema", "factor_update", "precondition", "per_example_scaling", "moment_update",
           "adamw_update", "mac_update", "example_projections", "per_example_scaling_rows", "projected_gradient",
           "precondition_projected"]

#: a step-varying number: a Python float (eager) or a 0-dim tensor (compiled)
Scalar = float | Tensor


def _fused(finite: Tensor | None, *scalars: object) -> bool:
    """Whether the in-place, EMA-in-the-epilogue form applies (floats, no device mask)."""
    return finite is None and not any(isinstance(s, Tensor) for s in scalars)


def commit(state: Tensor, new: Tensor, finite: Tensor | None) -> None:
    """``state <- new``, or where ``finite`` (a 0-dim bool tensor) is False leave it bit for bit."""
    state.copy_(new if finite is None else torch.where(finite, new, state))


def ema(state: Tensor, update: Tensor, beta: Scalar, alpha: Scalar, finite: Tensor | None = None) -> Tensor:
    """``state <- beta*state + alpha*update`` (``update`` is a temporary and may be overwritten).

    In place with float weights: ``beta == 0`` (an EMA's first update) ignores the old state even
    when it is not finite. With tensor weights the old state is multiplied by beta; the engine
    decides such first updates on the host, so the state is finite there.
    """
    if _fused(finite, beta, alpha):
        if beta == 0.0:
            state.copy_(update.mul_(alpha))
        else:
            state.mul_(beta).add_(update, alpha=alpha)
        return state
    commit(state, state * beta + update * alpha, finite)
    return state


def factor_update(C: Tensor, X: Tensor, *, alpha: Scalar, beta: Scalar, bias: bool, weights: Tensor | None = None,
                  finite: Tensor | None = None, backend: str) -> Tensor:
    """``C <- beta*C + alpha * X̄ᵀ diag(weights) X̄`` (:mod:`ekfac_triton.kernels.factor_accumulation`)."""
    fn = kernels.factor_update if backend == "triton" else kernels.factor_update_reference
    if _fused(finite, alpha, beta):
        return fn(C, X, alpha=alpha, beta=beta, bias=bias, weights=weights)
    batch = fn(torch.empty_like(C), X, alpha=1.0, beta=0.0, bias=bias, weights=weights)
    return ema(C, batch, beta, alpha, finite)


def per_example_scaling(S: Tensor, g: Tensor, a: Tensor, q_out: Tensor, q_in: Tensor, *, alpha: Scalar,
                        beta: Scalar, bias: bool, finite: Tensor | None = None, backend: str) -> Tensor:
    """``S <- beta*S + alpha * Σ_n (Σ_s (Q_outᵀ ĝ_ns)(Q_inᵀ ā_ns)ᵀ)²``, EKFAC's per-example scaling
    (:mod:`ekfac_triton.kernels.eigenbasis_projection`)."""
    fn = kernels.per_example_scaling if backend == "triton" else kernels.per_example_scaling_reference
    if _fused(finite, alpha, beta):
        return fn(S, g, a, q_out, q_in, alpha=alpha, beta=beta, bias=bias)
    batch = fn(torch.empty_like(S), g, a, q_out, q_in, alpha=1.0, beta=0.0, bias=bias)
    return ema(S, batch, beta, alpha, finite)


def precondition(grad: Tensor, q_out: Tensor, q_in: Tensor, scaling: Tensor, damping: Scalar, *,
                 batch_update: tuple[Scalar, Scalar] | None = None, finite: Tensor | None = None,
                 backend: str) -> Tensor:
    """``Q_out [(Q_outᵀ grad Q_in) / (S + λ)] Q_inᵀ`` (:mod:`ekfac_triton.kernels.eigenbasis_projection`).

    ``batch_update = (beta, alpha_n)``: EKFAC's ``batch`` scaling, ``S <- beta*S + alpha_n * P²``
    with P the projected gradient, before dividing by S (alpha_n is the EMA weight times N).
    """
    fn = kernels.precondition if backend == "triton" else kernels.precondition_reference
    if batch_update is None:
        return fn(grad, q_out, q_in, scaling, damping)
    beta, alpha_n = batch_update
    if _fused(finite, beta, alpha_n):
        return fn(grad, q_out, q_in, scaling, damping, batch_update=(beta, alpha_n, 1))
    # the kernel's epilogue takes its EMA weights as constants: the reference on a copy of S,
    # committed where finite
    updated = scaling.clone()
    direction = kernels.precondition_reference(grad, q_out, q_in, updated, damping, batch_update=(beta, alpha_n, 1))
    commit(scaling, updated, finite)
    return direction


def example_projections(g: Tensor, a: Tensor, q_out: Tensor, q_in: Tensor, *, bias: bool) -> tuple[Tensor, Tensor]:
    """``(Ĝ Q_out, Ā Q_in)``: the (N, d_out) and (N, d_in̄) per-example projections of one
    position per example (``g``: (N, d_out) rows ĝ, ``a``: (N, d_in) rows without the bias
    column), in the bases' dtype; the factors of EKFAC's per-example scaling (George et al. 2018,
    Eq. 9) and, divided by N, of the projected gradient (:func:`projected_gradient`)."""
    dtype = q_out.dtype
    a = a.to(dtype)
    if bias:
        a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
    return g.to(dtype) @ q_out, a @ q_in


def per_example_scaling_rows(S: Tensor, gq: Tensor, aq: Tensor, *, alpha: Scalar, beta: Scalar,
                             finite: Tensor | None = None) -> Tensor:
    """``S <- beta*S + alpha * (ĜQ_out)²ᵀ (ĀQ_in)²``: :func:`per_example_scaling` for one position
    per example from projections already formed (:func:`example_projections`); the reference's
    formula, in plain torch whatever the backend."""
    return ema(S, gq.square().T @ aq.square(), beta, alpha, finite)


def projected_gradient(gq: Tensor, aq: Tensor, out: Tensor | None = None) -> Tensor:
    """``Q_outᵀ ∇W̄ Q_in = (Ĝ Q_out)ᵀ (Ā Q_in) / N`` when ``∇W̄ = Ĝᵀ Ā / N`` exactly (one position
    per example, ĝ = N times the mean loss's output-gradient): one (d_out × N)(N × d_in̄) GEMM,
    ``2·N·d_out·d_in̄`` flops instead of the gradient form's ``2·d_out·d_in̄·(d_in̄ + d_out)``
    (``out``: written there)."""
    return torch.mm(gq.T, aq, out=out).div_(gq.shape[0])


def precondition_projected(projected: Tensor, q_out: Tensor, q_in: Tensor, scaling: Tensor, damping: Scalar, *,
                           batch_update: tuple[Scalar, Scalar] | None = None, finite: Tensor | None = None
                           ) -> Tensor:
    """``Q_out [P / (S + λ)] Q_inᵀ`` from an already projected gradient ``P = Q_outᵀ ∇W̄ Q_in``
    (overwritten): the back half of :func:`precondition`, with the same ``batch_update``
    semantics (``S <- beta*S + alpha_n * P²`` first). Plain torch whatever the backend."""
    if batch_update is not None:
        beta, alpha_n = batch_update
        ema(scaling, projected.square(), beta, alpha_n, finite)
    projected.div_(scaling + damping)
    return q_out @ projected @ q_in.T


def moment_update(params: Sequence[Tensor], directions: Sequence[Tensor], buffers: Sequence[Tensor | None], *,
                  lr: Scalar, momentum: float, weight_decay: float, scales: Sequence[Tensor | None],
                  decoupled: bool = False, finite: Tensor | None = None, backend: str) -> None:
    """Weight decay, momentum, KL-clip scale and the update (:mod:`ekfac_triton.kernels.moment_update`).

    ``decoupled``: ``p <- p·(1 − lr·weight_decay)`` first and no L2 term (Loshchilov & Hutter).
    """
    if decoupled and weight_decay != 0.0:
        shrink = 1.0 - lr * weight_decay
        if finite is None:
            torch._foreach_mul_(list(params), shrink)
        else:
            for p in params:
                commit(p, p * shrink, finite)
        weight_decay = 0.0
    fn = kernels.moment_update if backend == "triton" else kernels.moment_update_reference
    if finite is None:
        fn(params, directions, buffers, lr=lr, momentum=momentum, weight_decay=weight_decay, scales=scales)
        return
    # masked (compiled step): the reference's formula on copies, each state committed where finite
    new_params = [p.clone() for p in params]
    new_buffers = [None if m is None or momentum == 0.0 else m.clone() for m in buffers]
    kernels.moment_update_reference(new_params, directions, new_buffers, lr=lr, momentum=momentum,
                                    weight_decay=weight_decay, scales=scales)
    for state, new in zip([*params, *buffers], [*new_params, *new_buffers]):
        if new is not None:
            commit(state, new, finite)


def adamw_update(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 exp_avg_sqs: Sequence[Tensor], *, lr: Scalar, step_sizes: Sequence[Scalar],
                 bias2_sqrts: Sequence[Scalar], beta1: float, beta2: float, eps: float, weight_decay: float,
                 finite: Tensor | None = None) -> None:
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2) in ``torch.optim.AdamW``'s arithmetic, the
    order of its operations included: ``p <- p·(1 − lr·wd)``, ``m <- lerp(m, g, 1 − β1)``,
    ``v <- β2·v + (1 − β2)·g²``, ``p <- p − step_size · m / (√v / √(1 − β2ᵗ) + eps)`` with
    ``step_size = lr / (1 − β1ᵗ)``; per parameter its ``step_sizes[i]`` and ``bias2_sqrts[i] =
    √(1 − β2ᵗ)`` (t its own step count). Plain torch (no kernel family: these are the few, small
    parameters without curvature). With a ``finite`` flag every state update is committed where
    it is True."""
    shrink = 1 - lr * weight_decay
    for p, g, m, v, step_size, bias2_sqrt in zip(params, grads, exp_avgs, exp_avg_sqs, step_sizes, bias2_sqrts):
        if finite is None and not isinstance(step_size, Tensor):
            p.mul_(shrink)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            p.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(eps), value=-step_size)
            continue
        new_m = m.lerp(g, 1 - beta1)
        new_v = (v * beta2).addcmul_(g, g, value=1 - beta2)
        new_p = p * shrink - step_size * (new_m / (new_v.sqrt() / bias2_sqrt + eps))
        for state, new in ((p, new_p), (m, new_m), (v, new_v)):
            commit(state, new.to(state.dtype), finite)


def mac_update(weight: Tensor, weight_grad: Tensor, weight_buffer: Tensor | None, bias: Tensor | None,
               bias_grad: Tensor | None, bias_buffer: Tensor | None, mean: Tensor, sq_norm: Tensor, *,
               damping: float, lr: float, momentum: float, weight_decay: float, decoupled: bool,
               backend: str) -> None:
    """MAC's preconditioning fused with the moment update (:mod:`ekfac_triton.kernels.mac_update`)."""
    fn = kernels.mac_update if backend == "triton" else kernels.mac_update_reference
    fn(weight, weight_grad, weight_buffer, bias, bias_grad, bias_buffer, mean, sq_norm, damping=damping, lr=lr,
       momentum=momentum, weight_decay=weight_decay, decoupled=decoupled)
