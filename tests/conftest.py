"""Fixtures shared by the test modules.

One applies to every test: the whole run uses a single torch (intra-op) thread, see
:func:`torch_threads`. The others are opt-in.
"""

import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def torch_threads():
    """One torch thread for the whole run (``EKFAC_TEST_THREADS=N`` for N threads, ``0`` for
    torch's default). The tests' tensors are small: with several threads torch's OpenMP workers
    spin-wait, and on a shared CPU with a busy core the same tests ran 60 times slower (1.7 s
    against 104 s for tests/curvature/test_mac*.py on 2 cores next to a benchmark). The previous
    thread count is restored at the end."""
    threads = torch.get_num_threads()
    wanted = int(os.environ.get("EKFAC_TEST_THREADS", "1"))
    if wanted > 0:
        torch.set_num_threads(wanted)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test, whatever ``EKFAC_TEST_THREADS`` says: multi-threaded small
    ops can be tens of times slower on a shared CPU. The previous thread count is restored
    afterwards."""
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
