"""Suite-wide test settings."""

import os

import pytest
import torch

# The CLI's default thread count samples how busy the cores are; tests pin one thread instead
# (see one_thread below), and the CLI respects OMP_NUM_THREADS when it is set.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (thread start-up costs more than their ops),
    and test machines are often shared; every test runs with one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
