"""Fixtures shared by several test modules (opt-in: nothing here applies to a test by itself)."""

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
