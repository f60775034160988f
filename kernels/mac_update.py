"""MAC's fused update: Sherman–Morrison preconditioning, weight decay, momentum and the parameter
update of one layer in one pass over its gradient (Seung, Lee & Ko, ICDM 2025;
ARCHITECTURE.md, "MAC").

For a layer with weight W (d_out x d_in, any trailing shape flattened), optional bias b, gradient
rows g_i = [∇W_i | ∇b_i] (length d_in̄), snapshot mean m̂ (length d_in̄), ‖m̂‖² and damping ρ:

    s_i = g_i · m̂;   d_i = g_i − s_i / (ρ + ‖m̂‖²) · m̂                    (R never formed)
    coupled:    u = d + ω·p;  m <- μ·m + u;  p <- p − η·m
    decoupled:  u = d;        m <- μ·m + u;  p <- p·(1 − η·ω) − η·m          (μ = 0: m = u)

The Triton kernel runs one program per row: it loads the row of ∇W (and ∇b_i) once when d_in̄
fits one block (``BLOCK_D`` up to 8192 columns), keeps it in registers for the dot product and
the update, and streams W, the momentum buffer and m̂ once; wider rows take two passes over the
gradient row (the second from cache). ‖m̂‖² is read from its device tensor (no host sync).
Arithmetic is fp32. Float64 tensors, non-contiguous ones and tensors off CUDA (outside the
interpreter) take the torch reference, which is also the CPU implementation and the oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import interpreting, triton_path

__all__ = ["mac_update", "mac_update_reference"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BLOCK_D = 8192


def _config(d_in_bar: int) -> dict:
    """Columns per chunk (the whole row when it fits) and warps."""
    cap = 16 if interpreting() else _MAX_BLOCK_D  # small chunks under the interpreter: exercise both paths
    block = min(triton.next_power_of_2(max(d_in_bar, 1)), cap)
    return dict(BLOCK_D=block, ONE_PASS=d_in_bar <= block, num_warps=4 if block <= 1024 else 8)


# -- kernel --------------------------------------------------------------------------------------
@triton.jit
def _mac_update_kernel(w_ptr, gw_ptr, mw_ptr, b_ptr, gb_ptr, mb_ptr, mean_ptr, sq_ptr,
                       d_in, damping, lr, momentum, weight_decay,
                       HAS_BIAS: tl.constexpr, HAS_M: tl.constexpr, DECOUPLED: tl.constexpr,
                       ONE_PASS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * d_in
    coef = 1.0 / (damping + tl.load(sq_ptr).to(tl.float32))
    cols = tl.arange(0, BLOCK_D)
    if HAS_BIAS:
        gb = tl.load(gb_ptr + row).to(tl.float32)
        m_bias = tl.load(mean_ptr + d_in).to(tl.float32)
        s = gb * m_bias
    else:
        s = 0.0
    # s = g_i · m̂ (the bias column included)
    if ONE_PASS:
        mask = cols < d_in
        g = tl.load(gw_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        mv = tl.load(mean_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        s += tl.sum(g * mv, axis=0)
    else:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, d_in, BLOCK_D):
            c = start + cols
            mask = c < d_in
            gc = tl.load(gw_ptr + base + c, mask=mask, other=0.0).to(tl.float32)
            mc = tl.load(mean_ptr + c, mask=mask, other=0.0).to(tl.float32)
            acc += gc * mc
        s += tl.sum(acc, axis=0)
    k = s * coef
    # d = g − k·m̂, then the moment update, chunk by chunk
    for start in range(0, d_in, BLOCK_D):
        c = start + cols
        mask = c < d_in
        if ONE_PASS:
            d = g - k * mv
        else:
            gc = tl.load(gw_ptr + base + c, mask=mask, other=0.0).to(tl.float32)
            mc = tl.load(mean_ptr + c, mask=mask, other=0.0).to(tl.float32)
            d = gc - k * mc
        p = tl.load(w_ptr + base + c, mask=mask, other=0.0).to(tl.float32)
        if not DECOUPLED:
            d = d + weight_decay * p
        if HAS_M:
            mom = momentum * tl.load(mw_ptr + base + c, mask=mask, other=0.0).to(tl.float32) + d
            tl.store(mw_ptr + base + c, mom.to(mw_ptr.dtype.element_ty), mask=mask)
            d = mom
        if DECOUPLED:
            p = p * (1.0 - lr * weight_decay)
        tl.store(w_ptr + base + c, (p - lr * d).to(w_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        db = gb - k * m_bias
        pb = tl.load(b_ptr + row).to(tl.float32)
        if not DECOUPLED:
            db = db + weight_decay * pb
        if HAS_M:
            mb = momentum * tl.load(mb_ptr + row).to(tl.float32) + db
            tl.store(mb_ptr + row, mb.to(mb_ptr.dtype.element_ty))
            db = mb
        if DECOUPLED:
            pb = pb * (1.0 - lr * weight_decay)
        tl.store(b_ptr + row, (pb - lr * db).to(b_ptr.dtype.element_ty))


# -- launcher and torch.library op -----------------------------------------------------------------
@torch.library.custom_op("ekfac_triton::mac_update", mutates_args={"weight", "weight_buffer", "bias", "bias_buffer"})
def _mac_update_op(weight: Tensor, weight_grad: Tensor, weight_buffer: Tensor | None, bias: Tensor | None,
                   bias_grad: Tensor | None, bias_buffer: Tensor | None, mean: Tensor, sq_norm: Tensor,
                   damping: float, lr: float, momentum: float, weight_decay: float, decoupled: bool) -> None:
    if not _kernel_ok(weight, weight_grad, weight_buffer, bias, bias_grad, bias_buffer, mean, sq_norm):
        mac_update_reference(weight, weight_grad, weight_buffer, bias, bias_grad, bias_buffer, mean, sq_norm,
                             damping=damping, lr=lr, momentum=momentum, weight_decay=weight_decay,
                             decoupled=decoupled)
        return
    d_out = weight.shape[0]
    d_in = weight[0].numel()
    has_bias = bias is not None
    has_m = momentum != 0.0
    cfg = _config(d_in + int(has_bias))
    dummy = weight
    _mac_update_kernel[(d_out,)](
        weight, weight_grad, weight_buffer if has_m else dummy,
        bias if has_bias else dummy, bias_grad if has_bias else dummy,
        bias_buffer if has_bias and has_m else dummy,
        mean.to(torch.float32), sq_norm.to(torch.float32).reshape(1),
        d_in, float(damping), float(lr), float(momentum), float(weight_decay),
        HAS_BIAS=has_bias, HAS_M=has_m, DECOUPLED=decoupled, **cfg)


@_mac_update_op.register_fake
def _(weight, weight_grad, weight_buffer, bias, bias_grad, bias_buffer, mean, sq_norm, damping, lr, momentum,
      weight_decay, decoupled) -> None:
    return None


def _kernel_ok(*tensors: Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    return (all(t.dtype in _KERNEL_DTYPES and t.is_contiguous() for t in present) and triton_path(*present))


def mac_update(weight: Tensor, weight_grad: Tensor, weight_buffer: Tensor | None, bias: Tensor | None,
               bias_grad: Tensor | None, bias_buffer: Tensor | None, mean: Tensor, sq_norm: Tensor, *,
               damping: float, lr: float, momentum: float, weight_decay: float, decoupled: bool = False) -> None:
    """:func:`mac_update_reference`'s contract in one Triton launch (CUDA, or CPU under the
    interpreter; contiguous fp32/bf16/fp16 tensors), the reference otherwise."""
    _check(weight, weight_grad, weight_buffer, bias, bias_grad, bias_buffer, mean, momentum)
    if weight.numel() == 0:
        return
    torch.ops.ekfac_triton.mac_update(weight, weight_grad, weight_buffer if momentum != 0.0 else None, bias,
                                      bias_grad, bias_buffer if momentum != 0.0 else None, mean, sq_norm,
                                      float(damping), float(lr), float(momentum), float(weight_decay),
                                      bool(decoupled))


def _check(weight, weight_grad, weight_buffer, bias, bias_grad, bias_buffer, mean, momentum) -> None:
    d_out, d_in = weight.shape[0], weight[0].numel() if weight.shape[0] else 0
    if weight_grad.shape != weight.shape:
        raise ValueError(f"weight_grad shape {tuple(weight_grad.shape)} != weight shape {tuple(weight.shape)}")
    if (bias is None) != (bias_grad is None):
        raise ValueError("bias and bias_grad must both be given or both be None")
    if bias is not None and (bias.shape != (d_out,) or bias_grad.shape != (d_out,)):
        raise ValueError(f"bias and bias_grad must have shape ({d_out},)")
    if mean.shape != (d_in + int(bias is not None),):
        raise ValueError(f"mean must have shape ({d_in + int(bias is not None)},), got {tuple(mean.shape)}")
    if momentum != 0.0 and (weight_buffer is None or (bias is not None and bias_buffer is None)):
        raise ValueError("momentum buffers are required when momentum != 0")


# -- torch reference -----------------------------------------------------------------------------
@torch.no_grad()
def mac_update_reference(weight: Tensor, weight_grad: Tensor, weight_buffer: Tensor | None, bias: Tensor | None,
                         bias_grad: Tensor | None, bias_buffer: Tensor | None, mean: Tensor, sq_norm: Tensor, *,
                         damping: float, lr: float, momentum: float, weight_decay: float,
                         decoupled: bool = False) -> None:
    """Apply the update above in place to ``weight`` and ``bias`` (and the buffers when
    momentum != 0; they may be None when momentum == 0).

    Args:
        weight, weight_grad, weight_buffer: the weight (d_out, ...), its gradient and momentum buffer.
        bias, bias_grad, bias_buffer: the bias (d_out,) with its gradient and buffer, or None.
        mean: m̂ (d_in̄,), the bias entry last; sq_norm: ‖m̂‖² (0-dim tensor).
        damping, lr, momentum, weight_decay: ρ, η, μ, ω; ``decoupled``: ω shrinks p directly.
    """
    _check(weight, weight_grad, weight_buffer, bias, bias_grad, bias_buffer, mean, momentum)
    d_out = weight.shape[0]
    g = weight_grad.reshape(d_out, -1)
    if bias is not None:
        g = torch.cat([g, bias_grad.reshape(-1, 1)], dim=1)
    dtype = mean.dtype
    g = g.to(dtype)
    d = torch.addr(g, (g @ mean) / (damping + sq_norm.to(dtype)), mean, alpha=-1)
    d_in = weight[0].numel()
    parts = [(weight, d[:, :d_in].reshape(weight.shape), weight_buffer)]
    if bias is not None:
        parts.append((bias, d[:, d_in], bias_buffer))
    for p, u, m in parts:
        u = u.to(p.dtype)
        if weight_decay != 0.0 and not decoupled:
            u = u.add(p, alpha=weight_decay)
        if momentum != 0.0:
            m.mul_(momentum).add_(u)
            u = m
        if weight_decay != 0.0 and decoupled:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(u, alpha=-lr)
