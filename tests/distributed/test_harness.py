import pytest

from torchrec_compress.testing.multiprocess import all_reduce_rank, run_multiprocess


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on purpose")


def test_all_reduce_over_two_processes() -> None:
    assert run_multiprocess(all_reduce_rank, world_size=2) == [1.0, 1.0]


def test_failure_names_rank_and_traceback() -> None:
    with pytest.raises(RuntimeError, match=r"rank 1 failed:[\s\S]*boom on purpose"):
        run_multiprocess(_fail_on_rank_one, world_size=2, timeout_s=60)
