import os
import signal
import time

import pytest

from torchrec_compress.testing.multiprocess import all_reduce_rank, run_multiprocess


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on purpose")


def _die(rank: int, world_size: int) -> None:
    os._exit(3)  # no traceback, no report: like a kill or a native crash


def _freeze_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # a frozen peer: alive, never answers
    all_reduce_rank(rank, world_size)


def test_all_reduce_over_two_processes() -> None:
    assert run_multiprocess(all_reduce_rank, world_size=2) == [1.0, 1.0]


def test_failure_names_rank_and_traceback() -> None:
    with pytest.raises(RuntimeError, match=r"rank 1 failed:[\s\S]*boom on purpose"):
        run_multiprocess(_fail_on_rank_one, world_size=2, timeout_s=60)


def test_a_process_that_dies_without_reporting_fails_the_run_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 0 exited with code 3 before reporting"):
        run_multiprocess(_die, world_size=1, timeout_s=300)
    assert time.monotonic() - start < 120  # not the 300 s timeout


def test_a_frozen_peer_ends_the_run_with_a_timeout_error() -> None:
    """SIGSTOP on one of 2 processes: the other's collective raises after the process group's
    timeout (it blocked for torch's 30-minute default), and the harness reports it."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 0 failed:[\s\S]*[Tt]imed out"):
        run_multiprocess(_freeze_rank_one, world_size=2, timeout_s=240, pg_timeout_s=10)
    assert time.monotonic() - start < 90
