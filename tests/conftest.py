"""Shared fixtures."""

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
