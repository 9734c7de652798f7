"""Fixtures shared by the test modules."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests, restored afterwards.

    Training and compression run many small ops: on a loaded 2-core machine a second intra-op
    thread makes them up to 10x slower.  Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
