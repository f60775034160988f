"""Kernel family 2: projection of gradients into the Kronecker-factored eigenbasis.

For one layer with gradient matrix ``Ḡ = [∇W | ∇b]`` (d_out x d_in̄), output-side basis Q_out
(Q_G, or Q_Ψ for TEKFAC) and input-side basis Q_in (Q_A, or Q_Φ):

* ``precondition``: ``Q_out [ (Q_outᵀ Ḡ Q_in) / (S + λ) ] Q_inᵀ`` (George et al. 2018, Alg. 1;
  with S = λ_G λ_Aᵀ it is K-FAC's eigenbasis form, Martens & Grosse 2015 §6.3). In ``batch``
  scaling mode S is first updated from the projected gradient itself:
  ``S <- beta*S + alpha * n * P²``.
* ``per-example scaling``: ``S <- beta*S + alpha * Σ_n (Σ_s (Q_outᵀ ĝ_ns)(Q_inᵀ ā_ns)ᵀ)²``
  (EKFAC's exact diagonal, with positions s summed before squaring, K-FAC-expand). With one
  position per example it is the product form ``(Ĝ Q_out)²ᵀ (Ā Q_in)²`` and no per-example
  d_out x d_in tensor exists; with several positions the per-example projections are formed in
  chunks whose size is bounded by ``max_chunk_elements``, never for the whole batch at once.

The Triton path is one strided GEMM kernel (transposes are strides, never copies) with three
epilogues, launched as a short chain:

* ``precondition``: ``T = Q_outᵀ Ḡ``; ``P = T Q_in`` whose epilogue does the ``batch`` S update
  and the division by ``S + λ`` (λ a float or a 0-dim device tensor: no host sync); then the
  back-projection ``Q_out P`` and ``(·) Q_inᵀ``. Four launches, no elementwise pass.
* ``per_example_scaling`` with one position per example (R = 1): ``Ĝ Q_out``, ``Ā Q_in`` (the
  bias column of ones generated in registers), then ``S <- beta*S + alpha*(ĜQ_out)²ᵀ(ĀQ_in)²``
  with both squares taken on the loaded operand tiles and the EMA in the epilogue.
  R > 1 (weight sharing: conv, sequences) stays on the reference path, which forms chunked
  per-example projections with torch matmuls: that needs a batched, square-after-sum kernel not
  written yet.

The kernels need float32 bases and S on CUDA (or CPU under ``TRITON_INTERPRET=1``); float64
(float64 models) uses the reference. Products of fp32 operands use ``precision`` ("tf32" or
"ieee"; None follows ``torch.get_float32_matmul_precision()``, "highest" -> "ieee").
Half-precision g/a are upcast to fp32 on load. Not yet done: the fused single-pass kernel for
N < d that accumulates P and S from the same operand tiles (with one position per example,
``Q_outᵀ Ḡ Q_in = (ĜQ_out)ᵀ(ĀQ_in) / N``; ARCHITECTURE.md, "Kernel families"), and grouping
layers in one launch.

The pure-torch references are the CPU implementation and the oracle of the Triton kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import autotune_pinned, resolve_precision, triton_path

__all__ = [
    "precondition",
    "per_example_scaling",
    "precondition_reference",
    "per_example_scaling_reference",
    "MAX_CHUNK_ELEMENTS",
]

# Epilogues of the GEMM kernel.
_STORE, _EMA, _DIVIDE = 0, 1, 2


# -- autotune configurations ---------------------------------------------------------------------
def _configs() -> list[triton.Config]:
    """Output tile BLOCK_M x BLOCK_N, reduction step BLOCK_K; pinned by EKFAC_TRITON_AUTOTUNE=0
    and under the interpreter."""
    if autotune_pinned():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ]


# -- kernel --------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(), key=["M", "N", "K", "EPILOGUE", "SQUARE", "UPDATE_S"], restore_value=["S"])
@triton.jit
def _gemm_kernel(A, B, OUT, M, N, K, sam, sak, sbk, sbn, som, son,
                 S, ssm, ssn, a_cols, ones_k, damping_ptr, damping, alpha, beta,
                 EPILOGUE: tl.constexpr, SQUARE: tl.constexpr, UPDATE_S: tl.constexpr, DAMP_TENSOR: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc = op(A) @ op(B)`` over strided fp32/bf16/fp16 operands (op squares when SQUARE);
    A has ``a_cols`` stored columns and, if ``ones_k >= 0``, an implicit column of ones at k =
    ones_k. Epilogues:

    * STORE: ``OUT = acc``;
    * EMA: ``S <- beta*S + alpha*acc`` (OUT unused; beta == 0 never reads S);
    * DIVIDE: if UPDATE_S, ``S <- beta*S + alpha*acc²`` first; then ``OUT = acc / (S + λ)``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = offs_m < M
    in_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(A + offs_m[:, None].to(tl.int64) * sam + offs_k[None, :].to(tl.int64) * sak,
                    mask=in_m[:, None] & (offs_k[None, :] < a_cols), other=0.0).to(tl.float32)
        a = tl.where(in_m[:, None] & (offs_k[None, :] == ones_k), 1.0, a)
        b = tl.load(B + offs_k[:, None].to(tl.int64) * sbk + offs_n[None, :].to(tl.int64) * sbn,
                    mask=(offs_k[:, None] < K) & in_n[None, :], other=0.0).to(tl.float32)
        if SQUARE:
            a = a * a
            b = b * b
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    mask = in_m[:, None] & in_n[None, :]
    s_ptrs = S + offs_m[:, None].to(tl.int64) * ssm + offs_n[None, :].to(tl.int64) * ssn
    if EPILOGUE == 1:  # EMA of S
        s = alpha * acc
        if beta != 0.0:
            s += beta * tl.load(s_ptrs, mask=mask, other=0.0)
        tl.store(s_ptrs, s, mask=mask)
    else:
        out = acc
        if EPILOGUE == 2:  # divide by S + λ, after the batch-mode update of S
            if UPDATE_S:
                s = alpha * acc * acc
                if beta != 0.0:
                    s += beta * tl.load(s_ptrs, mask=mask, other=0.0)
                tl.store(s_ptrs, s, mask=mask)
            else:
                s = tl.load(s_ptrs, mask=mask, other=1.0)
            if DAMP_TENSOR:
                lam = tl.load(damping_ptr).to(tl.float32)
            else:
                lam = damping
            out = acc / (s + lam)
        tl.store(OUT + offs_m[:, None].to(tl.int64) * som + offs_n[None, :].to(tl.int64) * son, out, mask=mask)


# -- launchers and torch.library ops ---------------------------------------------------------------
def _gemm(a: Tensor, b: Tensor, out: Tensor | None, *, S: Tensor | None = None, epilogue: int = _STORE,
          square: bool = False, update_s: bool = False, damping: float | Tensor = 0.0, alpha: float = 1.0,
          beta: float = 0.0, ones_col: bool = False, precision: str) -> None:
    """Launch ``_gemm_kernel`` for ``a @ b`` (2-D views, any strides); with ``ones_col`` a has an
    implicit trailing column of ones (so K = a.shape[1] + 1 = b.shape[0])."""
    M, K = a.shape[0], b.shape[0]
    N = b.shape[1]
    a_cols = a.shape[1]
    dummy = out if out is not None else S
    S_ = S if S is not None else dummy
    out_ = out if out is not None else dummy
    damp_tensor = isinstance(damping, Tensor)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    wrap_triton(_gemm_kernel)[grid](
        a, b, out_, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out_.stride(0), out_.stride(1),
        S_, S_.stride(0), S_.stride(1), a_cols, a_cols if ones_col else -1,
        damping if damp_tensor else dummy, 0.0 if damp_tensor else float(damping), float(alpha), float(beta),
        EPILOGUE=epilogue, SQUARE=square, UPDATE_S=update_s, DAMP_TENSOR=damp_tensor, PRECISION=precision)


def _check_precondition_args(grad: Tensor, q_out: Tensor, q_in: Tensor, scaling: Tensor) -> None:
    if grad.shape != (q_out.shape[0], q_in.shape[0]) or scaling.shape != grad.shape:
        raise ValueError(f"shape mismatch: grad {tuple(grad.shape)}, q_out {tuple(q_out.shape)}, "
                         f"q_in {tuple(q_in.shape)}, scaling {tuple(scaling.shape)}")


@triton_op("ekfac_triton::precondition", mutates_args={"scaling"})
def _precondition_op(grad: Tensor, q_out: Tensor, q_in: Tensor, scaling: Tensor, damping: float,
                     damping_tensor: Tensor | None, update_scaling: bool, beta: float, alpha_n: float,
                     precision: str) -> Tensor:
    damp = damping if damping_tensor is None else damping_tensor
    kernel = (q_out.dtype == q_in.dtype == scaling.dtype == torch.float32
              and triton_path(grad, q_out, q_in, scaling, damping_tensor))
    if not kernel:
        # alpha_n = alpha * n with n = 1 is the same update as (beta, alpha, n)
        return precondition_reference(grad.to(q_in.dtype), q_out, q_in, scaling, damp,
                                      batch_update=(beta, alpha_n, 1) if update_scaling else None)
    if damping_tensor is not None:
        damp = damping_tensor.to(torch.float32)
    d_out, d_in = grad.shape
    t = grad.new_empty((d_out, d_in), dtype=torch.float32)
    p = torch.empty_like(t)
    out = torch.empty_like(t)
    _gemm(q_out.T, grad, t, precision=precision)                               # T = Q_outᵀ Ḡ
    _gemm(t, q_in, p, S=scaling, epilogue=_DIVIDE, update_s=update_scaling, damping=damp,
          alpha=alpha_n, beta=beta, precision=precision)                      # P / (S + λ)
    _gemm(q_out, p, t, precision=precision)                                   # Q_out P
    _gemm(t, q_in.T, out, precision=precision)                                # (Q_out P) Q_inᵀ
    return out


def precondition(grad: Tensor, q_out: Tensor, q_in: Tensor, scaling: Tensor, damping: float | Tensor, *,
                 batch_update: tuple[float, float, int] | None = None, precision: str | None = None) -> Tensor:
    """:func:`precondition_reference`'s contract, with the Triton kernels where they apply."""
    _check_precondition_args(grad, q_out, q_in, scaling)
    update = batch_update is not None
    beta, alpha, n = batch_update if update else (0.0, 0.0, 1)
    damp_t = damping if isinstance(damping, Tensor) else None
    return torch.ops.ekfac_triton.precondition(grad, q_out, q_in, scaling, 0.0 if damp_t is not None else float(damping),
                                               damp_t, update, float(beta), float(alpha) * n,
                                               resolve_precision(precision))


@triton_op("ekfac_triton::per_example_scaling", mutates_args={"S"})
def _per_example_scaling_op(S: Tensor, g: Tensor, a: Tensor, q_out: Tensor, q_in: Tensor, alpha: float, beta: float,
                            bias: bool, precision: str) -> None:
    kernel = (g.shape[1] == 1 and S.dtype == q_out.dtype == q_in.dtype == torch.float32
              and triton_path(S, g, a, q_out, q_in))
    if not kernel:  # R > 1 (weight sharing), float64, or CPU tensors
        per_example_scaling_reference(S, g, a, q_out, q_in, alpha=alpha, beta=beta, bias=bias)
        return
    if g.shape[0] == 0:
        S.mul_(beta) if beta != 0.0 else S.zero_()
        return
    g2, a2 = g[:, 0], a[:, 0]
    gq = S.new_empty((g.shape[0], q_out.shape[1]))
    aq = S.new_empty((a.shape[0], q_in.shape[1]))
    _gemm(g2, q_out, gq, precision=precision)                                 # Ĝ Q_out
    _gemm(a2, q_in, aq, ones_col=bias, precision=precision)                   # Ā Q_in
    _gemm(gq.T, aq, None, S=S, epilogue=_EMA, square=True, alpha=alpha, beta=beta,
          precision=precision)                                                # β S + α (ĜQ)²ᵀ(ĀQ)²


def per_example_scaling(S: Tensor, g: Tensor, a: Tensor, q_out: Tensor, q_in: Tensor, *, alpha: float, beta: float,
                        bias: bool, precision: str | None = None) -> Tensor:
    """:func:`per_example_scaling_reference`'s contract (in place on S, returned), with the
    Triton kernels where they apply (R = 1, float32, CUDA)."""
    _check_scaling_args(S, g, a, q_out, q_in, bias)
    torch.ops.ekfac_triton.per_example_scaling(S, g, a, q_out, q_in, float(alpha), float(beta), bool(bias),
                                               resolve_precision(precision))
    return S


# -- torch references ----------------------------------------------------------------------------
# Upper bound on the elements of the per-example projections held at once (weight sharing).
MAX_CHUNK_ELEMENTS = 1 << 24


def _check_scaling_args(S: Tensor, g: Tensor, a: Tensor, q_out: Tensor, q_in: Tensor, bias: bool) -> None:
    if g.dim() != 3 or a.dim() != 3 or g.shape[:2] != a.shape[:2]:
        raise ValueError(f"g and a must be (N, R, d) with equal N, R: got {tuple(g.shape)}, {tuple(a.shape)}")
    if S.shape != (q_out.shape[0], q_in.shape[0]) or S.shape != (g.shape[2], a.shape[2] + int(bias)):
        raise ValueError(f"S {tuple(S.shape)} does not fit g {tuple(g.shape)}, a {tuple(a.shape)}, bias={bias}")


def _augment(a: Tensor, bias: bool) -> Tensor:
    """Append the bias input (a column of ones) to the last dimension."""
    if not bias:
        return a
    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)


@torch.no_grad()
def precondition_reference(grad: Tensor, q_out: Tensor, q_in: Tensor, scaling: Tensor,
                           damping: float | Tensor, *, batch_update: tuple[float, float, int] | None = None
                           ) -> Tensor:
    """Return ``Q_out [(Q_outᵀ grad Q_in) / (S + damping)] Q_inᵀ``.

    Args:
        grad: gradient matrix (d_out, d_in̄), in the bases' dtype.
        q_out: (d_out, d_out) orthogonal basis of the output side.
        q_in: (d_in̄, d_in̄) orthogonal basis of the input side.
        scaling: S, (d_out, d_in̄); updated in place when ``batch_update`` is given.
        damping: λ, a float or a 0-dim tensor (no host sync needed).
        batch_update: ``(beta, alpha, n)``: first set ``S <- beta*S + alpha*n*P²`` (EKFAC's
            ``batch`` scaling estimator), then divide by the updated S; beta and alpha may be
            0-dim tensors (the compiled step's scalars).
    """
    _check_precondition_args(grad, q_out, q_in, scaling)
    projected = q_out.T @ grad @ q_in
    if batch_update is not None:
        beta, alpha, n = batch_update
        update = projected.square().mul_(alpha * n)
        if not isinstance(beta, Tensor) and beta == 0.0:  # a tensor beta (compiled step) is applied as is
            scaling.copy_(update)
        else:
            scaling.mul_(beta).add_(update)
    projected.div_(scaling + damping)
    return q_out @ projected @ q_in.T


@torch.no_grad()
def per_example_scaling_reference(S: Tensor, g: Tensor, a: Tensor, q_out: Tensor, q_in: Tensor, *,
                                  alpha: float, beta: float, bias: bool,
                                  max_chunk_elements: int = MAX_CHUNK_ELEMENTS) -> Tensor:
    """In place ``S <- beta*S + alpha * Σ_n (Σ_s (Q_outᵀ ĝ_ns)(Q_inᵀ ā_ns)ᵀ)²``; returns S.

    Args:
        S: (d_out, d_in̄) scaling, float32/float64.
        g: (N, R, d_out) per-example output gradients ĝ (of ℓ_n, not of the mean loss).
        a: (N, R, d_in) layer inputs, without the bias column.
        q_out, q_in: the bases; alpha, beta: EMA weights; bias: append the implicit ones column.
        max_chunk_elements: bound on N_chunk * d_out * d_in̄ when R > 1.
    """
    _check_scaling_args(S, g, a, q_out, q_in, bias)
    n, r = g.shape[:2]
    dtype = S.dtype
    gq = g.to(dtype) @ q_out                       # (N, R, d_out): Q_outᵀ ĝ per position
    aq = _augment(a.to(dtype), bias) @ q_in        # (N, R, d_in̄): Q_inᵀ ā per position
    if r == 1:
        update = gq[:, 0].square().T @ aq[:, 0].square()
    else:
        update = torch.zeros_like(S)
        chunk = max(1, max_chunk_elements // (S.numel()))
        for start in range(0, n, chunk):
            per_example = gq[start:start + chunk].transpose(1, 2) @ aq[start:start + chunk]
            update += per_example.square_().sum(0)
    if beta == 0.0:
        S.copy_(update.mul_(alpha))
    else:
        S.mul_(beta).add_(update, alpha=alpha)
    return S
