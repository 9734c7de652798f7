"""DMP-sharded forward equals the unsharded forward with the same weights (2 gloo processes)."""

import pytest
import torch

from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import tiny_batch, tiny_dlrm

SHARDING_TYPES = ("table_wise", "column_wise", "row_wise", "data_parallel")
BATCH = 16


def _compare(rank: int, world_size: int) -> dict[str, float]:
    reference = tiny_dlrm(torch.device("cpu"), seed=7)
    full_state = reference.state_dict()
    batch = tiny_batch(BATCH, seed=100 + rank)  # each rank feeds different rows
    with torch.no_grad():
        _, (_, expected, _) = reference(batch)
    errors: dict[str, float] = {}
    for sharding_type in SHARDING_TYPES:
        sharded = shard_model(
            tiny_dlrm(torch.device("meta")), torch.device("cpu"), sharding_type=sharding_type
        )
        kinds = {
            p.sharding_type
            for p in sharded.plan.plan["model.sparse_arch.embedding_bag_collection"].values()
        }
        assert kinds == {sharding_type}, f"planner chose {kinds} instead of {sharding_type}"
        load_full_state_dict_(sharded, full_state)
        with torch.no_grad():
            _, (_, got, _) = sharded(batch)
        errors[sharding_type] = float((got - expected).abs().max())
    return errors


@pytest.fixture(scope="module")
def errors() -> dict[str, float]:
    per_rank = run_multiprocess(_compare, world_size=2)
    return {k: max(r[k] for r in per_rank) for k in SHARDING_TYPES}


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_sharded_forward_matches_unsharded(errors: dict[str, float], sharding_type: str) -> None:
    assert errors[sharding_type] <= 1e-5, errors
