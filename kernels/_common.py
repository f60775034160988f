"""Helpers shared by the three kernel families: when the Triton path runs, autotune pinning,
the fp32 matmul precision, and tables of raw device pointers for multi-tensor launches.

Environment variables (read at call time, never changed here):

* ``TRITON_INTERPRET=1``: Triton's CPU interpreter. The Triton paths then also run on CPU
  tensors, which is how the tests exercise the kernels without a GPU.
* ``EKFAC_TRITON_AUTOTUNE=0``: pin each kernel to one configuration (CI, reproducible timings).
  Under the interpreter the configuration is always pinned.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["interpreting", "interpreter_upcast", "autotune_pinned", "triton_path", "resolve_precision", "pointer_table",
           "PRECISIONS"]

#: ``precision`` values of fp32 inputs: TF32 tensor cores, or exact fp32 products.
PRECISIONS = ("tf32", "ieee")


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_pinned() -> bool:
    """Whether every kernel uses one fixed configuration instead of autotuning."""
    return interpreting() or os.environ.get("EKFAC_TRITON_AUTOTUNE", "1") == "0"


def interpreter_upcast(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands of ``dtype`` must be upcast to fp32 first: Triton 3.9's CPU
    interpreter returns garbage for bfloat16 ``tl.dot`` (fp16 is fine). Never on a GPU."""
    return interpreting() and dtype == torch.bfloat16


def triton_path(*tensors: Tensor | None) -> bool:
    """Whether the Triton kernels can take these tensors: all on CUDA (or all on CPU while
    interpreting). Other cases use the torch reference."""
    present = [t for t in tensors if t is not None]
    if interpreting():
        return all(t.device.type == "cpu" for t in present)
    return all(t.is_cuda for t in present)


@torch.compiler.assume_constant_result
def _matmul_precision() -> str:
    # a constant to torch.compile (which cannot trace the getter): the compiled optimizer step
    # keeps the setting it was compiled under
    return torch.get_float32_matmul_precision()


def resolve_precision(precision: str | None) -> str:
    """``precision`` of fp32 products: ``"tf32"`` or ``"ieee"``; None follows torch's own setting
    (``torch.get_float32_matmul_precision()``: ``"highest"`` -> ``"ieee"``, else ``"tf32"``),
    so that a kernel and the torch matmul it replaces use the same arithmetic."""
    if precision is None:
        return "ieee" if _matmul_precision() == "highest" else "tf32"
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid precision={precision!r}: must be one of {PRECISIONS} or None")
    return precision


def pointer_table(rows: Sequence[Sequence[int]], device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """A (len(rows), k) table on ``device`` of raw pointers, sizes and strides for a multi-tensor
    launch. The host copy is pinned and sent without blocking the host (no device sync)."""
    host = torch.tensor(rows, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
