"""Crash-safe checkpoints: model, optimizer and RNG state saved together, atomically.

``torch.save(opt.state_dict(), "opt.pt")`` over a good checkpoint is not safe: a crash (kill -9,
power loss) while writing leaves a truncated file, and the only good checkpoint is gone.
:func:`save_checkpoint` writes to a temporary file in the same folder, flushes and fsyncs it,
then renames it over the target (``os.replace`` is atomic on POSIX and Windows) and fsyncs the
folder, so the path always holds either the old or the new checkpoint, whole.
:func:`load_checkpoint` reads one back; a truncated or foreign file gives a clear error, and a
failed load leaves the model and optimizer as they were::

    save_checkpoint("run.pt", model=model, optimizer=opt, extra={"epoch": epoch})
    ...
    extra = load_checkpoint("run.pt", model=model, optimizer=opt)["extra"]
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint"]

FORMAT = "ekfac_triton.checkpoint/1"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, extra: Any = None, rng: bool = True) -> Path:
    """Write model, optimizer, RNG state and ``extra`` to ``path`` atomically; returns the path.

    Args:
        path: the checkpoint file (its folder must exist); replaced only once the new file is
            complete on disk.
        model: its ``state_dict()`` is saved (None: not saved).
        optimizer: its ``state_dict()`` is saved (an :class:`~ekfac_triton.EKFAC` includes the
            curvature state).
        extra: anything else to keep with it (epoch, data-loader position, ...), picklable.
        rng: save torch's (CPU and initialised CUDA) and Python's RNG states, so a resumed run draws
            the same random numbers.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"Invalid path={str(path)!r}: folder {str(path.parent)!r} does not exist")
    state = {"format": FORMAT, "model": None if model is None else model.state_dict(),
             "optimizer": None if optimizer is None else optimizer.state_dict(),
             "rng": _rng_state() if rng else None, "extra": extra}
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms
        return path
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of earlier writers of ``path`` that died mid-write (kill -9)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            pid = int(tmp.name[len(path.name) + 2:-len(".tmp")])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue  # not ours, or a live writer


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True,
                    map_location: Any = None) -> dict[str, Any]:
    """Read a checkpoint of :func:`save_checkpoint`, load it into ``model`` and ``optimizer``
    (those given), restore the RNG states, and return the whole checkpoint dict (``"extra"``
    holds what was saved as ``extra``). If anything fails, the model and optimizer keep their
    state.

    Args:
        path: the checkpoint file.
        model, optimizer: loaded from the checkpoint's entries (an entry missing from the file is
            an error).
        restore_rng: restore the saved RNG states (if the file has them).
        map_location: as for ``torch.load``.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"Invalid checkpoint {str(path)!r}: truncated or not a checkpoint ({err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"Invalid checkpoint {str(path)!r}: not written by ekfac_triton.save_checkpoint")
    for name, target in (("model", model), ("optimizer", optimizer)):
        if target is not None and state[name] is None:
            raise ValueError(f"Invalid checkpoint {str(path)!r}: it holds no {name} state")
    model_backup = None if model is None else {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_backup = None if optimizer is None else _deep_clone(optimizer.state_dict())
    try:
        if model is not None:
            model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except BaseException:
        if model_backup is not None:
            model.load_state_dict(model_backup)
        if optimizer_backup is not None:
            optimizer.load_state_dict(optimizer_backup)
        raise
    if restore_rng and state.get("rng") is not None:
        _set_rng_state(state["rng"])
    return state


def _deep_clone(value: Any) -> Any:
    """A copy of a state_dict whose tensors do not alias the live state."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _deep_clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_deep_clone(v) for v in value)
    return value
