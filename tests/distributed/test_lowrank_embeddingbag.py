"""A low-rank collection sharded as one TorchRec module, on TorchRec's own models and recipes.

One spawn per world size runs every check (1 and 2 gloo processes):

* ``TrainPipelineSparseDist`` on a DLRM compressed with AFM trains to the same weights as a
  plain training loop over the same sharded model.
* The planner sees one low-rank module (plan entry at its own path, factor tables rows x k),
  and the sharded forward equals the unsharded one, table-, row- and column-wise.
* TorchRec's ``RowWiseAdagrad`` recipe on ``sparse_arch.parameters()`` trains under DMP.
* A ``FeatureProcessedEmbeddingBagCollection`` (position-weighted) compressed with AFM plans,
  shards and matches the unsharded forward (2 processes).
"""

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.feature_processor_ import PositionWeightedModuleCollection
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_compress.api import compress_
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.methods.lowrank.config import AFMConfig, LowRankOverride
from torchrec_compress.methods.lowrank.sharded import ShardedLowRankEmbeddingBagCollection
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import DENSE_IN, tiny_batch, tiny_tables

CPU, META = torch.device("cpu"), torch.device("meta")
DIM, RANK = 16, 8
EBC = "model.sparse_arch.embedding_bag_collection"
STEPS = 3
# t_f2 stays uncompressed: the collection mixes a low-rank and a full-width table
CONFIG = AFMConfig(rank=RANK, table_overrides={"t_f2": LowRankOverride(skip=True)})
# exact rank 2 (packed), one table at rank 4 (not packed), the mean-pooled one kept
PACKED = AFMConfig(
    rank=2,
    rank_multiple=1,
    table_overrides={"t_f0": LowRankOverride(rank=4), "t_f1": LowRankOverride(skip=True)},
)


def _dlrm(device: torch.device) -> DLRMTrain:
    torch.manual_seed(3)
    return DLRMTrain(
        DLRM(
            embedding_bag_collection=EmbeddingBagCollection(tiny_tables(DIM), device=device),
            dense_in_features=DENSE_IN,
            dense_arch_layer_sizes=[32, DIM],
            over_arch_layer_sizes=[32, 1],
            dense_device=device,
        )
    )


def _forward(model: nn.Module, batch: Batch) -> object:
    return model(batch)


def _compressed_state(config: AFMConfig = CONFIG) -> dict[str, torch.Tensor]:
    """The AFM-compressed DLRM's weights (identical on every process)."""
    model = _dlrm(CPU)
    compress_(model, config, [tiny_batch(16, seed=i) for i in range(4)], forward_fn=_forward)
    return model.state_dict()


def _compressed_model(state: dict[str, torch.Tensor], config: AFMConfig = CONFIG) -> DLRMTrain:
    model = _dlrm(CPU)
    compress_(model, config, [tiny_batch(16, seed=i) for i in range(4)], forward_fn=_forward)
    model.load_state_dict(state)
    return model


def _sharded(
    state: dict[str, torch.Tensor], sharding_type: str, config: AFMConfig = CONFIG
) -> nn.Module:
    """The compressed DLRM under DMP, factor tables trained by SGD in backward."""
    model = _compressed_model(state, config)
    factor_ebc = model.model.sparse_arch.embedding_bag_collection.factor_ebc
    apply_optimizer_in_backward(torch.optim.SGD, factor_ebc.parameters(), {"lr": 0.1})
    dmp = shard_model(model, CPU, sharding_type=sharding_type)
    load_full_state_dict_(dmp, state)
    return dmp


def _dense_optimizer(model: nn.Module) -> KeyedOptimizerWrapper:
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    return KeyedOptimizerWrapper(dense, lambda params: torch.optim.SGD(params, lr=0.1))


def _local(state: dict[str, object]) -> dict[str, torch.Tensor]:
    """Each tensor of a (sharded) state dict as this process's local data."""
    out = {}
    for key, value in state.items():
        if hasattr(value, "local_shards"):
            shards = value.local_shards()
            out[key] = torch.cat([s.tensor.flatten() for s in shards]) if shards else None
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().clone()
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(
        float((a[k] - b[k]).abs().max()) if a[k] is not None and a[k].numel() else 0.0 for k in a
    )


def _pipeline_vs_plain_loop(
    rank: int, state: dict[str, torch.Tensor], config: AFMConfig = CONFIG
) -> dict[str, float]:
    batches = [tiny_batch(8, seed=300 + 10 * rank + i) for i in range(STEPS)]
    plain = _sharded(state, "table_wise", config)
    initial = _local(plain.state_dict())
    optimizer = _dense_optimizer(plain)
    for batch in batches:
        optimizer.zero_grad()
        loss, _ = plain(batch)
        loss.backward()
        optimizer.step()
    pipelined = _sharded(state, "table_wise", config)
    assert isinstance(
        pipelined.module.model.sparse_arch.embedding_bag_collection,
        ShardedLowRankEmbeddingBagCollection,
    )
    pipeline = TrainPipelineSparseDist(pipelined, _dense_optimizer(pipelined), CPU)
    iterator: Iterator[Batch] = iter(batches)
    for _ in range(STEPS):
        pipeline.progress(iterator)
    with pytest.raises(StopIteration):
        pipeline.progress(iterator)
    # the pipeline really pipelined the low-rank module (input dist ahead of the forward)
    assert pipeline._pipelined_modules, "TrainPipelineSparseDist found no module to pipeline"
    trained = _local(plain.state_dict())
    assert _max_diff(trained, initial) > 1e-4, "training changed nothing"
    return {"pipeline": _max_diff(_local(pipelined.state_dict()), trained)}


def _planned_as_one_module_and_exact(
    rank: int,
    state: dict[str, torch.Tensor],
    config: AFMConfig = CONFIG,
    sharding_types: tuple[str, ...] = ("table_wise", "row_wise", "column_wise"),
) -> dict:
    reference = _compressed_model(state, config)
    batch = tiny_batch(16, seed=500 + rank)
    with torch.no_grad():
        expected = reference(batch)[1][1]
    out: dict[str, float] = {}
    for sharding_type in sharding_types:
        dmp = _sharded(state, sharding_type, config)
        plan = dmp.plan.plan
        assert EBC in plan and f"{EBC}.factor_ebc" not in plan, sorted(plan)
        assert {p.sharding_type for p in plan[EBC].values()} == {sharding_type}
        with torch.no_grad():
            out[f"forward/{sharding_type}"] = float((dmp(batch)[1][1] - expected).abs().max())
    return out


def _rowwise_adagrad_recipe(rank: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """TorchRec's recipe: RowWiseAdagrad in backward on every sparse-arch parameter, then DMP."""
    model = _compressed_model(state)
    apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": 0.01})
    dmp = shard_model(model, CPU, sharding_type="row_wise")
    load_full_state_dict_(dmp, state)
    before = _local(dmp.state_dict())
    for i in range(2):
        loss, _ = dmp(tiny_batch(8, seed=700 + 10 * rank + i))
        loss.backward()
    after = _local(dmp.state_dict())
    changed = {
        kind: min(
            float((after[k] - before[k]).abs().max())
            for k in after
            if f".{kind}." in k and "sparse_arch" in k and after[k] is not None
        )
        for kind in ("factor_ebc", "projection", "mean")
    }
    return {f"rowwise_adagrad/{k}": v for k, v in changed.items()}


def _fp_tables() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name=f"fp_t{i}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f"f{i}"]
        )
        for i, rows in enumerate((97, 64))
    ]


def _fp_model(device: torch.device) -> nn.Module:
    torch.manual_seed(11)
    fpebc = FeatureProcessedEmbeddingBagCollection(
        EmbeddingBagCollection(_fp_tables(), is_weighted=True, device=device),
        PositionWeightedModuleCollection({"f0": 4, "f1": 4}, device=device),
    )
    with torch.no_grad():
        for weights in fpebc._feature_processors.position_weights.values():
            weights.uniform_(0.5, 2.0)  # positions must matter
    return nn.Sequential(fpebc)


def _fp_batch(seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (2 * 8,), generator=g)
    values = torch.randint(0, 64, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(keys=["f0", "f1"], values=values, lengths=lengths)


def _feature_processed(rank: int) -> dict[str, float]:
    reference = _fp_model(CPU)
    compress_(reference, AFMConfig(rank=RANK), [_fp_batch(i) for i in range(4)])
    state = reference.state_dict()
    batch = _fp_batch(900 + rank)
    with torch.no_grad():
        expected = reference(batch).values()
    out = {}
    for sharding_type in ("table_wise", "row_wise"):
        model = copy.deepcopy(reference)
        dmp = shard_model(model, CPU, sharding_type=sharding_type)
        assert {p.sharding_type for p in dmp.plan.plan["0"].values()} == {sharding_type}
        load_full_state_dict_(dmp, state)
        got = dmp(batch)
        got.values().sum().backward()  # gradients reach the dense replicas
        grads = [p.grad for n, p in dmp.named_parameters() if ".projection." in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        out[f"fpebc/{sharding_type}"] = float((got.values().detach() - expected).abs().max())
    return out


def _packed(rank: int, world_size: int) -> dict[str, float]:
    """Rank 2 of 16-dim tables (the AFM paper's d=16 -> k=2), stored 2 factor rows to a row."""
    state = _compressed_state(PACKED)
    factors = state[f"{EBC}.factor_ebc.embedding_bags.t_f2.weight"]
    assert factors.shape == (150, 4), factors.shape  # 300 rows x k=2, two to a row
    out = {f"packed/{k}": v for k, v in _pipeline_vs_plain_loop(rank, state, PACKED).items()}
    if world_size > 1:
        exact = _planned_as_one_module_and_exact(
            rank, state, PACKED, sharding_types=("table_wise", "row_wise")
        )
        out |= {f"packed/{k}": v for k, v in exact.items()}
    return out


def _run(rank: int, world_size: int) -> dict[str, float]:
    state = _compressed_state()
    out = _pipeline_vs_plain_loop(rank, state)
    out |= _packed(rank, world_size)
    if world_size > 1:
        out |= _planned_as_one_module_and_exact(rank, state)
        out |= _rowwise_adagrad_recipe(rank, state)
        out |= _feature_processed(rank)
    return out


def _results(world_size: int) -> dict[str, float]:
    per_rank = run_multiprocess(_run, world_size=world_size, timeout_s=600)
    return {k: max(r[k] for r in per_rank) for k in per_rank[0]}


@pytest.fixture(scope="module")
def one_process() -> dict[str, float]:
    return _results(1)


@pytest.fixture(scope="module")
def two_processes() -> dict[str, float]:
    return _results(2)


@pytest.mark.parametrize("world", ["one_process", "two_processes"])
def test_train_pipeline_sparse_dist_matches_plain_loop(
    world: str, request: pytest.FixtureRequest
) -> None:
    results = request.getfixturevalue(world)
    assert results["pipeline"] <= 1e-6, results


@pytest.mark.parametrize("world", ["one_process", "two_processes"])
def test_packed_rank_two_trains_in_the_pipeline_and_shards_exactly(
    world: str, request: pytest.FixtureRequest
) -> None:
    """AFM d=16 -> k=2 (refused before: fbgemm needs widths that are multiples of 4): factor
    rows stored two to a row; TrainPipelineSparseDist equals the plain loop, and table- and
    row-wise sharded forwards equal the unsharded model."""
    results = request.getfixturevalue(world)
    assert results["packed/pipeline"] <= 1e-6, results
    if world == "two_processes":
        for sharding_type in ("table_wise", "row_wise"):
            assert results[f"packed/forward/{sharding_type}"] <= 1e-5, results


def test_planned_as_one_module_and_sharded_forward_is_exact(
    two_processes: dict[str, float],
) -> None:
    for sharding_type in ("table_wise", "row_wise", "column_wise"):
        assert two_processes[f"forward/{sharding_type}"] <= 1e-5, two_processes


def test_rowwise_adagrad_recipe_trains_under_dmp(two_processes: dict[str, float]) -> None:
    for kind in ("factor_ebc", "projection", "mean"):
        assert two_processes[f"rowwise_adagrad/{kind}"] > 0, two_processes


def test_feature_processed_collection_plans_shards_and_matches(
    two_processes: dict[str, float],
) -> None:
    for sharding_type in ("table_wise", "row_wise"):
        assert two_processes[f"fpebc/{sharding_type}"] <= 1e-5, two_processes
