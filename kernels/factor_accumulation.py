"""Kernel family 1: Kronecker factor accumulation ``C <- beta*C + alpha * X̄ᵀ diag(w) X̄``.

X̄ is X with an implicit trailing column of ones when ``bias=True`` (the bias input, the 1 of
ā = [a; 1]), never concatenated in memory. ``X`` is (N, d) or (B, T, d) with any strides; its
leading dimensions are rows. ``weights`` (optional, same leading shape as X) weights each row:
TEKFAC's trace-weighted factors (Gao et al. 2020) are ``Σ ‖ĝ‖² ā āᵀ``.

The Triton kernel (reading order: configs, kernels, launchers/ops, reference):

* symmetric: only the lower triangle of BLOCK x BLOCK output tiles is computed, one program per
  tile (a flat triangular schedule), and each off-diagonal tile is stored twice (mirrored) in
  the epilogue: half the flops of a GEMM. C is assumed symmetric on entry (it always is when it
  is only ever written by this update);
* the EMA is fused in the epilogue (``beta == 0`` never reads C, so NaN garbage is ignored);
* the bias column is generated in registers; rows are addressed through X's strides (a 3-D
  (B, T, d) view is read in place, no ``.contiguous()``);
* fp32 / bf16 / fp16 X with fp32 accumulation into an fp32 C. fp32 inputs multiply in TF32 or
  exactly (``precision="tf32" | "ieee"``; the default None follows
  ``torch.get_float32_matmul_precision()``: "highest", torch's default, gives "ieee"). Weighted
  rows of half-precision X are rounded back to X's dtype before the product;
* a float64 C (float64 models) takes the torch reference, as do CPU tensors (except under
  ``TRITON_INTERPRET=1``, where the kernels run on CPU for the tests);
* grouped: :func:`factor_update_grouped` updates a list of (C_i, X_i) pairs of any sizes in one
  launch per (X dtype, weighted?) class, with one flat tile schedule over all pairs.

The pure-torch :func:`factor_update_reference` is the CPU implementation and the test oracle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import autotune_pinned, interpreter_upcast, pointer_table, resolve_precision, triton_path

__all__ = ["factor_update", "factor_update_grouped", "factor_update_reference", "check_factor_update_args"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# -- autotune configurations ---------------------------------------------------------------------
def _configs() -> list[triton.Config]:
    """Square output tiles (BLOCK x BLOCK, mirrored across the diagonal) and a row step BLOCK_K.
    Small tiles keep enough programs alive when d̄ is a few hundred (a 785-wide factor has only
    28 lower tiles of 128). ``EKFAC_TRITON_AUTOTUNE=0`` / the interpreter pin one config."""
    if autotune_pinned():
        return [triton.Config({"BLOCK": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ]


def _grouped_config(max_d_bar: int) -> dict:
    """The grouped kernel writes through raw pointers, which autotune cannot restore between
    trials, so it takes a fixed config sized by the largest factor of the group."""
    if autotune_pinned():
        return dict(BLOCK=32, BLOCK_K=32, num_warps=4, num_stages=2)
    if max_d_bar <= 256:
        return dict(BLOCK=32, BLOCK_K=64, num_warps=4, num_stages=3)
    return dict(BLOCK=64, BLOCK_K=32, num_warps=4, num_stages=4)


def _num_tiles(d_bar: int, block: int) -> int:
    nt = triton.cdiv(d_bar, block)
    return nt * (nt + 1) // 2


# -- kernels -------------------------------------------------------------------------------------
@triton.jit
def _symmetric_tile(C, sc0, sc1, X, W, d, d_bar, ones_col, n_rows, T, sxb, sxt, sxd, swb, swt,
                    alpha, beta, tile, HAS_W: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """One lower-triangle tile (ti >= tj) of ``C <- beta*C + alpha * X̄ᵀ diag(w) X̄``, mirrored.

    Row r of X is ``X + (r // T)*sxb + (r % T)*sxt``; column ``ones_col`` of X̄ is the implicit
    ones column (``ones_col = -1`` without bias).
    """
    # Triangular index -> (ti, tj): ti = floor((sqrt(8 tile + 1) - 1) / 2), corrected by one
    # either way against fp32 rounding of the square root.
    ti = ((tl.sqrt((8 * tile + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    ti = tl.where((ti + 1) * (ti + 2) // 2 <= tile, ti + 1, ti)
    ti = tl.where(ti * (ti + 1) // 2 > tile, ti - 1, ti)
    tj = tile - ti * (ti + 1) // 2

    offs_m = ti * BLOCK + tl.arange(0, BLOCK)
    offs_n = tj * BLOCK + tl.arange(0, BLOCK)
    col_m = offs_m.to(tl.int64) * sxd
    col_n = offs_n.to(tl.int64) * sxd
    in_m = offs_m < d
    in_n = offs_n < d
    dtype = X.dtype.element_ty
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, n_rows, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        live = rows < n_rows
        b = rows // T
        row = b.to(tl.int64) * sxb + (rows - b * T).to(tl.int64) * sxt
        # a: X̄[rows, offs_m]ᵀ (BLOCK, BLOCK_K);  bt: X̄[rows, offs_n] (BLOCK_K, BLOCK)
        a = tl.load(X + col_m[:, None] + row[None, :], mask=in_m[:, None] & live[None, :], other=0.0)
        a = tl.where((offs_m[:, None] == ones_col) & live[None, :], 1.0, a).to(dtype)
        bt = tl.load(X + row[:, None] + col_n[None, :], mask=live[:, None] & in_n[None, :], other=0.0)
        bt = tl.where(live[:, None] & (offs_n[None, :] == ones_col), 1.0, bt).to(dtype)
        if HAS_W:
            w = tl.load(W + b.to(tl.int64) * swb + (rows - b * T).to(tl.int64) * swt, mask=live, other=0.0)
            a = (a.to(tl.float32) * w[None, :].to(tl.float32)).to(dtype)
        if UPCAST:  # see interpreter_upcast()
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)

    out = acc * alpha
    mask = (offs_m[:, None] < d_bar) & (offs_n[None, :] < d_bar)
    lower = C + offs_m[:, None].to(tl.int64) * sc0 + offs_n[None, :].to(tl.int64) * sc1
    if beta != 0.0:  # beta == 0 must not read C (it may hold garbage)
        out += beta * tl.load(lower, mask=mask, other=0.0)
    tl.store(lower, out, mask=mask)
    if ti != tj:
        upper = C + offs_n[None, :].to(tl.int64) * sc0 + offs_m[:, None].to(tl.int64) * sc1
        tl.store(upper, out, mask=mask)


@triton.autotune(configs=_configs(), key=["d_bar", "n_rows", "HAS_W", "PRECISION"], restore_value=["C"])
@triton.jit
def _factor_update_kernel(C, sc0, sc1, X, W, d, d_bar, ones_col, n_rows, T, sxb, sxt, sxd, swb, swt,
                          alpha, beta, HAS_W: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    _symmetric_tile(C, sc0, sc1, X, W, d, d_bar, ones_col, n_rows, T, sxb, sxt, sxd, swb, swt,
                    alpha, beta, tl.program_id(0), HAS_W, PRECISION, UPCAST, BLOCK, BLOCK_K)


# Columns of the grouped kernel's per-pair table (int64) and scalar table (fp32).
_META = ("C", "sc0", "sc1", "X", "W", "d", "d_bar", "ones_col", "n_rows", "T", "sxb", "sxt", "sxd", "swb", "swt")
_NMETA: tl.constexpr = tl.constexpr(len(_META))


@triton.jit
def _factor_update_grouped_kernel(meta, scalars, num_pairs, X0, HAS_W: tl.constexpr, PRECISION: tl.constexpr,
                                  UPCAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per lower tile of any pair: the flat schedule lists the pairs' triangles one
    after another; a scan over the (few) pairs finds this program's pair and local tile."""
    pid = tl.program_id(0).to(tl.int64)
    start = pid * 0
    pair = pid * 0
    tile = pid * 0
    for k in range(num_pairs):
        nt = tl.cdiv(tl.load(meta + k * _NMETA + 6), BLOCK)
        count = nt * (nt + 1) // 2
        mine = (pid >= start) & (pid < start + count)
        pair = tl.where(mine, k + start * 0, pair)
        tile = tl.where(mine, pid - start, tile)
        start += count
    row = meta + pair * _NMETA
    C = tl.load(row + 0).to(tl.pointer_type(tl.float32))
    X = tl.load(row + 3).to(tl.pointer_type(X0.dtype.element_ty))
    W = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    _symmetric_tile(C, tl.load(row + 1), tl.load(row + 2), X, W, tl.load(row + 5), tl.load(row + 6),
                    tl.load(row + 7), tl.load(row + 8), tl.load(row + 9), tl.load(row + 10), tl.load(row + 11),
                    tl.load(row + 12), tl.load(row + 13), tl.load(row + 14),
                    tl.load(scalars + 2 * pair), tl.load(scalars + 2 * pair + 1), tile.to(tl.int32),
                    HAS_W, PRECISION, UPCAST, BLOCK, BLOCK_K)


# -- launchers and torch.library ops ---------------------------------------------------------------
def _geometry(X: Tensor, weights: Tensor | None, bias: bool) -> dict[str, int]:
    """Sizes and strides of X (and the weights) as (B, T, d) with rows r = b*T + t."""
    d = X.shape[-1]
    if X.dim() == 2:
        geo = dict(n_rows=X.shape[0], T=1, sxb=X.stride(0), sxt=0, sxd=X.stride(1))
        w_strides = (0, 0) if weights is None else (weights.stride(0), 0)
    else:
        geo = dict(n_rows=X.shape[0] * X.shape[1], T=max(X.shape[1], 1), sxb=X.stride(0), sxt=X.stride(1),
                   sxd=X.stride(2))
        w_strides = (0, 0) if weights is None else (weights.stride(0), weights.stride(1))
    geo.update(d=d, d_bar=d + int(bias), ones_col=d if bias else -1, swb=w_strides[0], swt=w_strides[1])
    return geo


def _kernel_path(C: Tensor, X: Tensor, weights: Tensor | None) -> bool:
    return C.dtype == torch.float32 and X.dtype in _KERNEL_DTYPES and triton_path(C, X, weights)


def _dot_precision(precision: str, dtype: torch.dtype) -> str:
    """``precision`` matters for fp32 operands only; 16-bit operands get Triton's default
    ("tf32"), the path every bf16/fp16 ``tl.dot`` takes."""
    return precision if dtype == torch.float32 else "tf32"


def _row_weights(weights: Tensor | None) -> Tensor | None:
    return None if weights is None else weights.to(torch.float32)


@triton_op("ekfac_triton::factor_update", mutates_args={"C"})
def _factor_update_op(C: Tensor, X: Tensor, weights: Tensor | None, alpha: float, beta: float, bias: bool,
                      precision: str) -> None:
    if not _kernel_path(C, X, weights):
        factor_update_reference(C, X, alpha=alpha, beta=beta, bias=bias, weights=weights)
        return
    w = _row_weights(weights)
    geo = _geometry(X, w, bias)
    if geo["n_rows"] == 0:  # an empty batch: only the EMA scale
        C.mul_(beta) if beta != 0.0 else C.zero_()
        return

    def grid(meta):
        return (_num_tiles(geo["d_bar"], meta["BLOCK"]),)

    wrap_triton(_factor_update_kernel)[grid](
        C, C.stride(0), C.stride(1), X, X if w is None else w, geo["d"], geo["d_bar"], geo["ones_col"],
        geo["n_rows"], geo["T"], geo["sxb"], geo["sxt"], geo["sxd"], geo["swb"], geo["swt"],
        float(alpha), float(beta), HAS_W=w is not None, PRECISION=_dot_precision(precision, X.dtype),
        UPCAST=interpreter_upcast(X.dtype))


def factor_update(C: Tensor, X: Tensor, *, alpha: float, beta: float, bias: bool, weights: Tensor | None = None,
                  precision: str | None = None) -> Tensor:
    """In place ``C <- beta*C + alpha * X̄ᵀ diag(weights) X̄`` with the Triton kernel where it
    applies (fp32 C and CUDA tensors), else the reference; returns C.

    Args:
        C: (d̄, d̄) symmetric factor, float32 (float64 takes the reference).
        X: (N, d) or (B, T, d), any strides; float32, bfloat16 or float16.
        alpha, beta: the update's weights (``beta == 0`` ignores C's old contents).
        bias: append the implicit column of ones (d̄ = d + 1).
        weights: optional row weights of shape ``X.shape[:-1]``.
        precision: ``"tf32"`` or ``"ieee"`` for fp32 X; None follows
            ``torch.get_float32_matmul_precision()`` ("highest", torch's default -> "ieee").
    """
    check_factor_update_args(C, X, bias, weights)
    torch.ops.ekfac_triton.factor_update(C, X, weights, float(alpha), float(beta), bool(bias),
                                         resolve_precision(precision))
    return C


@torch.library.custom_op("ekfac_triton::factor_update_grouped", mutates_args={"Cs"})
def _factor_update_grouped_op(Cs: list[Tensor], Xs: list[Tensor], weights: list[Tensor | None], alphas: list[float],
                              betas: list[float], biases: list[bool], precision: str) -> None:
    # An opaque custom op (not triton_op): the kernel reaches C_i through a pointer table, which
    # torch.compile's mutation analysis of a traced kernel could not see.
    classes: dict[tuple, list[int]] = {}
    for i, (C, X, w) in enumerate(zip(Cs, Xs, weights)):
        if not _kernel_path(C, X, w):
            factor_update_reference(C, X, alpha=alphas[i], beta=betas[i], bias=biases[i], weights=w)
            continue
        n_rows = X.shape[:-1].numel()
        if n_rows == 0:
            C.mul_(betas[i]) if betas[i] != 0.0 else C.zero_()
            continue
        classes.setdefault((X.dtype, w is not None, C.device), []).append(i)
    for (_, has_w, device), members in classes.items():
        rows, scalars, keep = [], [], []
        for i in members:
            C, X, w = Cs[i], Xs[i], _row_weights(weights[i])
            keep.append(w)
            geo = _geometry(X, w, biases[i])
            geo.update(C=C.data_ptr(), sc0=C.stride(0), sc1=C.stride(1), X=X.data_ptr(),
                       W=0 if w is None else w.data_ptr())
            rows.append([geo[k] for k in _META])
            scalars.append([alphas[i], betas[i]])
        cfg = _grouped_config(max(r[_META.index("d_bar")] for r in rows))
        total = sum(_num_tiles(r[_META.index("d_bar")], cfg["BLOCK"]) for r in rows)
        meta = pointer_table(rows, device)
        scal = pointer_table(scalars, device, torch.float32)
        _factor_update_grouped_kernel[(total,)](meta, scal, len(rows), Xs[members[0]], HAS_W=has_w,
                                                PRECISION=_dot_precision(precision, Xs[members[0]].dtype), UPCAST=interpreter_upcast(Xs[members[0]].dtype),
                                                **cfg)
        del keep  # the fp32 weights stay alive until the launch is queued (stream order does the rest)


@_factor_update_grouped_op.register_fake
def _(Cs, Xs, weights, alphas, betas, biases, precision) -> None:
    return None


def factor_update_grouped(Cs: Sequence[Tensor], Xs: Sequence[Tensor], *, alphas: Sequence[float],
                          betas: Sequence[float], biases: Sequence[bool],
                          weights: Sequence[Tensor | None] | None = None, precision: str | None = None) -> None:
    """:func:`factor_update` for every pair ``(Cs[i], Xs[i])`` — one launch per class of
    (X dtype, weighted or not), usually one for a whole model. Arguments as there, one per pair."""
    n = len(Cs)
    weights = [None] * n if weights is None else list(weights)
    if not (len(Xs) == len(alphas) == len(betas) == len(biases) == len(weights) == n):
        raise ValueError("Cs, Xs, alphas, betas, biases and weights must have equal lengths")
    for C, X, b, w in zip(Cs, Xs, biases, weights):
        check_factor_update_args(C, X, b, w)
    if n == 0:
        return
    torch.ops.ekfac_triton.factor_update_grouped(list(Cs), list(Xs), weights, [float(a) for a in alphas],
                                                 [float(b) for b in betas], [bool(b) for b in biases],
                                                 resolve_precision(precision))


# -- torch reference -----------------------------------------------------------------------------


def check_factor_update_args(C: Tensor, X: Tensor, bias: bool, weights: Tensor | None) -> None:
    """Raise a clear error when the arguments of a factor update do not fit together."""
    if X.dim() not in (2, 3):
        raise ValueError(f"X must be (N, d) or (B, T, d), got shape {tuple(X.shape)}")
    d = X.shape[-1] + int(bias)
    if C.shape != (d, d):
        raise ValueError(f"C must be ({d}, {d}) for X of shape {tuple(X.shape)} and bias={bias}, "
                         f"got {tuple(C.shape)}")
    if not C.dtype.is_floating_point or C.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"C must be float32 or float64 (it accumulates), got {C.dtype}")
    if weights is not None and weights.shape != X.shape[:-1]:
        raise ValueError(f"weights must have shape {tuple(X.shape[:-1])}, got {tuple(weights.shape)}")


@torch.no_grad()
def factor_update_reference(C: Tensor, X: Tensor, *, alpha: float, beta: float, bias: bool,
                            weights: Tensor | None = None) -> Tensor:
    """In place ``C <- beta*C + alpha * X̄ᵀ diag(weights) X̄``; returns C.

    Accumulates in C's dtype. With ``beta == 0`` the old contents of C are ignored (even NaN),
    as an EMA's first update must.
    """
    check_factor_update_args(C, X, bias, weights)
    x = X.reshape(-1, X.shape[-1]).to(C.dtype)
    w = None if weights is None else weights.reshape(-1, 1).to(C.dtype)
    xw = x if w is None else x * w
    d = x.shape[1]
    update = torch.empty_like(C)
    update[:d, :d] = xw.T @ x
    if bias:
        # Blocks of X̄ᵀX̄ that involve the implicit column of ones: Σ w x, and Σ w.
        col = xw.sum(0)
        update[:d, d] = col
        update[d, :d] = col
        update[d, d] = x.shape[0] if w is None else w.sum()
    if beta == 0.0:
        C.copy_(update.mul_(alpha))
    else:
        C.mul_(beta).add_(update, alpha=alpha)
    return C
