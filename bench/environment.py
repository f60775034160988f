"""What ran where: the one environment record of every benchmark's log (``bench.train``,
``bench.demo``, ``bench.step_time``, ``bench.compile_step``, ``bench.pinn_poisson``,
``bench.mac_attention``, ``bench.cost_model``, ``bench.peers``, ``bench.scaling``), and the
device's name and folder name."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = ["command_line", "device_name", "device_slug", "environment", "git_commit"]

ROOT = Path(__file__).resolve().parent.parent


def device_name(device: torch.device) -> str:
    """The GPU's name (``NVIDIA H100 80GB HBM3``), or ``CPU <processor>`` (the thread count is a
    separate field of :func:`environment`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine() or 'unknown'}"


def device_slug(device: torch.device) -> str:
    """A folder name for the device: ``cpu``, or the GPU's name (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def git_commit() -> str:
    """The checkout's commit, marked when tracked files have uncommitted changes; ``unknown``
    outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}{' (uncommitted changes)' if dirty else ''}" if commit else "unknown"


def command_line(module: str, argv: Sequence[str]) -> str:
    """The command that reruns a benchmark from the repository root: ``python -m MODULE ARGV...``."""
    return shlex.join(["python", "-m", module, *argv])


def environment(device: torch.device | str, command: str, **extra: Any) -> dict[str, Any]:
    """The command, date, device, threads and versions of a run, plus ``extra`` fields (e.g. how
    steps were synchronised). Call it while the run's thread setting is in force."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton absent or broken: the record says so instead of failing the run
        triton_version = "not installed"
    import ekfac_triton
    return dict(command=command, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                device=str(device), device_name=device_name(device), threads=torch.get_num_threads(),
                cpus=os.cpu_count(), load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
                torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
                ekfac_triton=ekfac_triton.__version__, python=platform.python_version(),
                platform=platform.platform(), git_commit=git_commit(),
                tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                **extra)
