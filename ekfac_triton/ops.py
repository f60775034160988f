"""The kernel families as the optimizer calls them: the Triton launchers when the resolved
backend is ``"triton"``, the torch references otherwise (see :mod:`ekfac_triton.backend`).

The Triton launchers themselves fall back to the reference for what their kernels do not cover
(float64 state, tensors off CUDA, R > 1 per-example scalings), so ``backend="triton"`` is always
correct; ``backend="torch"`` never touches Triton.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from . import kernels

__all__ = ["factor_update", "precondition", "per_example_scaling", "moment_update", "mac_update"]


def factor_update(C: Tensor, X: Tensor, *, alpha: float, beta: float, bias: bool, weights: Tensor | None = None,
                  backend: str) -> Tensor:
    """``C <- beta*C + alpha * X̄ᵀ diag(weights) X̄`` (:mod:`ekfac_triton.kernels.factor_accumulation`)."""
    fn = kernels.factor_update if backend == "triton" else kernels.factor_update_reference
    return fn(C, X, alpha=alpha, beta=beta, bias=bias, weights=weights)


def precondition(grad: Tensor, q_out: Tensor, q_in: Tensor, scaling: Tensor, damping: float | Tensor, *,
                 batch_update: tuple[float, float, int] | None = None, backend: str) -> Tensor:
    """``Q_out [(Q_outᵀ grad Q_in) / (S + λ)] Q_inᵀ`` (:mod:`ekfac_triton.kernels.eigenbasis_projection`)."""
    fn = kernels.precondition if backend == "triton" else kernels.precondition_reference
    return fn(grad, q_out, q_in, scaling, damping, batch_update=batch_update)


def per_example_scaling(S: Tensor, g: Tensor, a: Tensor, q_out: Tensor, q_in: Tensor, *, alpha: float, beta: float,
                        bias: bool, backend: str) -> Tensor:
    """EKFAC's per-example scaling update (:mod:`ekfac_triton.kernels.eigenbasis_projection`)."""
    fn = kernels.per_example_scaling if backend == "triton" else kernels.per_example_scaling_reference
    return fn(S, g, a, q_out, q_in, alpha=alpha, beta=beta, bias=bias)


def moment_update(params: Sequence[Tensor], directions: Sequence[Tensor], buffers: Sequence[Tensor | None], *,
                  lr: float | Tensor, momentum: float, weight_decay: float, scales: Sequence[Tensor | None],
                  backend: str) -> None:
    """Weight decay, momentum, KL-clip scale and the update (:mod:`ekfac_triton.kernels.moment_update`)."""
    fn = kernels.moment_update if backend == "triton" else kernels.moment_update_reference
    fn(params, directions, buffers, lr=lr, momentum=momentum, weight_decay=weight_decay, scales=scales)


def mac_update(weight: Tensor, weight_grad: Tensor, weight_buffer: Tensor | None, bias: Tensor | None,
               bias_grad: Tensor | None, bias_buffer: Tensor | None, mean: Tensor, sq_norm: Tensor, *,
               damping: float, lr: float, momentum: float, weight_decay: float, decoupled: bool,
               backend: str) -> None:
    """MAC's preconditioning fused with the moment update (:mod:`ekfac_triton.kernels.mac_update`)."""
    fn = kernels.mac_update if backend == "triton" else kernels.mac_update_reference
    fn(weight, weight_grad, weight_buffer, bias, bias_grad, bias_buffer, mean, sq_norm, damping=damping, lr=lr,
       momentum=momentum, weight_decay=weight_decay, decoupled=decoupled)
