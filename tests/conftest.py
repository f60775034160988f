"""Fixtures shared by several test modules (opt-in: nothing here applies to a test by itself)."""

import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: multi-threaded small ops can be tens of times slower on a
    shared CPU. The previous thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def interpreter_suite():
    """A function that runs one test file's ``interpret``-marked tests in a subprocess with
    ``TRITON_INTERPRET=1`` (the interpreter must be on before triton is imported, so not in this
    process) and one pinned autotune config, and fails with the tail of their output."""

    def run(path: str) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1", EKFAC_TRITON_AUTOTUNE="0")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "interpret",
                               str(path)], env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"interpreter tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"

    return run
