"""Which implementation runs the kernel families: the torch references, or Triton on CUDA."""

from __future__ import annotations

import importlib.util

import torch

from .config import BACKENDS


#: whether backend="auto" picks the Triton kernels on CUDA (False until verified on a GPU)
AUTO_USES_TRITON = False


def triton_usable(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device``: a CUDA device and an importable triton."""
    return device.type == "cuda" and torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``.

    ``"auto"`` resolves to ``"torch"`` for now: the Triton kernels pass their tests against the
    references in Triton's CPU interpreter but have not yet run on a GPU, and a default must not
    be unverified. ``"triton"`` opts in on a CUDA device with triton importable (set
    ``AUTO_USES_TRITON`` once the ``cuda`` tests pass on the H100); it raises a clear error wherever
    it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend={backend!r}: must be one of {BACKENDS}")
    if backend == "triton":
        if not triton_usable(device):
            raise ValueError(f"Invalid backend='triton': the model's parameters are on {device}, and Triton "
                             "kernels need a CUDA device with triton installed; use backend='torch' or 'auto'")
        return "triton"
    if backend == "auto" and AUTO_USES_TRITON and triton_usable(device):
        return "triton"
    return "torch"
