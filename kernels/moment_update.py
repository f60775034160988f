"""Kernel family 3: the multi-tensor moment update applied after preconditioning.

For every parameter p with preconditioned direction d (the raw gradient for parameters without
curvature), momentum buffer m, learning rate η, momentum μ, weight decay ω and a global scale ν
(the KL-clip factor of the preconditioned layers, Ba et al. 2017 / kfac-pytorch; 1 elsewhere):

    u = ν·d + ω·p;   m <- μ·m + u;   p <- p - η·m          (μ = 0: p <- p - η·u)

Buffers start at zero, so the first step gives m = u exactly, as torch.optim.SGD's clone does.

The Triton kernel updates all tensors of a parameter group in one launch per (param dtype,
direction dtype) class: a table of raw pointers (p, d, m, ν) and sizes per tensor, and a cached
block -> tensor map, so each program streams one BLOCK of one tensor. Parameters and buffers
must be contiguous (others take the reference); strided directions (a weight's slice of a
[∇W | ∇b] matrix) are copied contiguous first. ν is read from its device
tensor inside the kernel (no host sync); η may be a float or a 0-dim device tensor. The
arithmetic is fp32 whatever the parameters' dtype (the reference rounds bf16/fp16
intermediates). The kernel writes through the pointer table, which autotune could not restore
between trials, so BLOCK and warps are fixed (a memory-bound stream is insensitive to them).

Pure-torch reference: the CPU implementation and the oracle of the Triton kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import interpreting, pointer_table, triton_path

__all__ = ["moment_update", "moment_update_reference"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_COLUMNS = ("p", "d", "m", "scale", "numel", "first_block")
_NCOL: tl.constexpr = tl.constexpr(len(_COLUMNS))


# -- configuration -------------------------------------------------------------------------------
def _config() -> dict:
    """Elements per program and warps (small blocks under the interpreter, so that the tests'
    small tensors still span several blocks)."""
    if interpreting():
        return dict(BLOCK=64, num_warps=4)
    return dict(BLOCK=4096, num_warps=8)


# -- kernel --------------------------------------------------------------------------------------
@triton.jit
def _moment_update_kernel(table, owner, P0, D0, lr_ptr, lr, momentum, weight_decay,
                          HAS_M: tl.constexpr, LR_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = table + tl.load(owner + pid).to(tl.int64) * _NCOL
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P0.dtype.element_ty))
    d_ptr = tl.load(row + 1).to(tl.pointer_type(D0.dtype.element_ty))
    scale = tl.load(row + 3)
    numel = tl.load(row + 4)
    offs = (pid - tl.load(row + 5)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if scale != 0:  # a KL-clip factor: a 0-dim fp32 device tensor
        u = u * tl.load(scale.to(tl.pointer_type(tl.float32)))
    u = u + weight_decay * p
    if HAS_M:
        m_ptr = tl.load(row + 2).to(tl.pointer_type(P0.dtype.element_ty))
        m = momentum * tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32) + u
        tl.store(m_ptr + offs, m.to(P0.dtype.element_ty), mask=mask)
        u = m
    if LR_TENSOR:
        step = tl.load(lr_ptr).to(tl.float32)
    else:
        step = lr
    tl.store(p_ptr + offs, (p - step * u).to(P0.dtype.element_ty), mask=mask)


# -- launcher and torch.library op -----------------------------------------------------------------
_OWNER_CACHE: dict[tuple, Tensor] = {}


def _block_owner(numels: tuple[int, ...], block: int, device: torch.device) -> tuple[Tensor, list[int]]:
    """Map program -> tensor index (cached per sizes), and each tensor's first block."""
    blocks = [triton.cdiv(n, block) for n in numels]
    first = [0]
    for b in blocks[:-1]:
        first.append(first[-1] + b)
    key = (numels, block, str(device))
    owner = _OWNER_CACHE.get(key)
    if owner is None:
        owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32),
                                        torch.tensor(blocks, dtype=torch.int64)).to(device)
        if len(_OWNER_CACHE) > 64:
            _OWNER_CACHE.clear()
        _OWNER_CACHE[key] = owner
    return owner, first


@torch.library.custom_op("ekfac_triton::moment_update", mutates_args={"params", "buffers"})
def _moment_update_op(params: list[Tensor], directions: list[Tensor], buffers: list[Tensor],
                      scales: list[Tensor | None], lr: float, lr_tensor: Tensor | None, momentum: float,
                      weight_decay: float) -> None:
    # An opaque custom op: the kernel reaches the tensors through a pointer table.
    has_m = momentum != 0.0
    bufs: list[Tensor | None] = list(buffers) if has_m else [None] * len(params)
    lr_arg: float | Tensor = lr if lr_tensor is None else lr_tensor
    classes: dict[tuple, list[int]] = {}
    for i, (p, d, m, nu) in enumerate(zip(params, directions, bufs, scales)):
        if (p.dtype in _KERNEL_DTYPES and d.dtype in _KERNEL_DTYPES and p.is_contiguous()
                and (m is None or m.is_contiguous()) and p.numel() > 0 and triton_path(p, d, m, nu, lr_tensor)):
            classes.setdefault((p.dtype, d.dtype, p.device), []).append(i)
        elif p.numel() > 0:
            moment_update_reference([p], [d], [m], lr=lr_arg, momentum=momentum, weight_decay=weight_decay,
                                    scales=[nu])
    cfg = _config()
    for (_, _, device), members in classes.items():
        keep = []
        rows = []
        owner, first = _block_owner(tuple(params[i].numel() for i in members), cfg["BLOCK"], device)
        for j, i in enumerate(members):
            d = directions[i].contiguous()  # a weight's slice of a [∇W | ∇b] direction is strided
            keep.append(d)
            nu = scales[i]
            if nu is not None:
                nu = nu.to(torch.float32)
                keep.append(nu)
            m = bufs[i]
            rows.append([params[i].data_ptr(), d.data_ptr(), 0 if m is None else m.data_ptr(),
                         0 if nu is None else nu.data_ptr(), params[i].numel(), first[j]])
        table = pointer_table(rows, device)
        lr_t = None if lr_tensor is None else lr_tensor.to(device=device, dtype=torch.float32)
        p0 = params[members[0]]
        _moment_update_kernel[(owner.numel(),)](
            table, owner, p0, directions[members[0]], p0 if lr_t is None else lr_t, float(lr), float(momentum),
            float(weight_decay), HAS_M=has_m, LR_TENSOR=lr_t is not None, **cfg)
        del keep, lr_t  # alive until the launch is queued; stream order does the rest


@_moment_update_op.register_fake
def _(params, directions, buffers, scales, lr, lr_tensor, momentum, weight_decay) -> None:
    return None


def moment_update(params: Sequence[Tensor], directions: Sequence[Tensor], buffers: Sequence[Tensor | None], *,
                  lr: float | Tensor, momentum: float, weight_decay: float,
                  scales: Sequence[Tensor | None]) -> None:
    """:func:`moment_update_reference`'s contract with one Triton launch per dtype class (CUDA,
    contiguous tensors); anything else takes the reference."""
    if not (len(params) == len(directions) == len(buffers) == len(scales)):
        raise ValueError("params, directions, buffers and scales must have equal lengths")
    for p, d in zip(params, directions):
        if p.shape != d.shape:
            raise ValueError(f"direction shape {tuple(d.shape)} != parameter shape {tuple(p.shape)}")
    if momentum != 0.0 and any(m is None for m in buffers):
        raise ValueError("a momentum buffer is required when momentum != 0")
    if not params:
        return
    lr_tensor = lr if isinstance(lr, Tensor) else None
    torch.ops.ekfac_triton.moment_update(list(params), list(directions),
                                         list(buffers) if momentum != 0.0 else [], list(scales),
                                         0.0 if lr_tensor is not None else float(lr), lr_tensor,
                                         float(momentum), float(weight_decay))


# -- torch reference -----------------------------------------------------------------------------
@torch.no_grad()
def moment_update_reference(params: Sequence[Tensor], directions: Sequence[Tensor],
                            buffers: Sequence[Tensor | None], *, lr: float | Tensor, momentum: float,
                            weight_decay: float, scales: Sequence[Tensor | None]) -> None:
    """Apply the update above in place to ``params`` (and ``buffers`` when momentum > 0).

    Args:
        params: parameters, updated in place.
        directions: one direction per parameter, same shape.
        buffers: one momentum buffer per parameter (ignored and may be None when momentum == 0).
        lr, momentum, weight_decay: the parameter group's hyperparameters.
        scales: per parameter a 0-dim tensor ν multiplying its direction, or None for 1.
    """
    if not (len(params) == len(directions) == len(buffers) == len(scales)):
        raise ValueError("params, directions, buffers and scales must have equal lengths")
    for p, d, m, nu in zip(params, directions, buffers, scales):
        if p.shape != d.shape:
            raise ValueError(f"direction shape {tuple(d.shape)} != parameter shape {tuple(p.shape)}")
        u = d.to(p.dtype) if nu is None else d.to(p.dtype) * nu.to(p.dtype)
        if weight_decay != 0.0:
            u = u.add(p, alpha=weight_decay)
        if momentum != 0.0:
            if m is None:
                raise ValueError("a momentum buffer is required when momentum != 0")
            m.mul_(momentum).add_(u)
            u = m
        if isinstance(lr, Tensor):
            p.sub_(u * lr)
        else:
            p.add_(u, alpha=-lr)
