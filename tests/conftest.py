"""Shared fixtures."""

import os

import pytest
import torch


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread
    pool's synchronisation makes every step many times slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("single_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Triton kernels are checked against the torch path on CPU through Triton's interpreter; it must be
# switched on before Triton is first imported (the kernels are decorated at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
