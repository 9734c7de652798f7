"""TorchRec 1.8: a MEAN table sharded row-wise makes every other table's pooled output wrong.

Stock TorchRec only (no torchrec_compress code): ``EmbeddingBagCollectionSharder`` widened to offer
row-wise sharding on CPU (the synchronous path TorchRec runs on CUDA), one gloo process.  Each
plan puts a MEAN-pooled table row-wise next to tables sharded another way; the sharded output is
compared with the unsharded ``EmbeddingBagCollection`` holding the same weights.

Run::

    python docs/upstream/mean_pooling_repro.py

Cause (``torchrec/distributed/embeddingbag.py``): ``ShardedEmbeddingBagCollection`` registers the
mean-pooling callback as soon as one MEAN table is sharded row-wise or table-row-wise, and
``_create_mean_pooling_divisor`` builds a divisor for every output key, resetting it to 1 only for
the row-wise SUM features (``pooling_type_to_rs_features["sum"]``).  Features of tables sharded
table-, column-wise or data-parallel keep their bag lengths as divisor, although their kernels
already pooled them as MEAN (or SUM): their outputs are divided by the bag lengths once more.
A feature shared by a row-wise MEAN table and another table cannot get two divisors either (the
divisor is looked up per feature, not per output key).
"""

import os

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import PoolingType


class RowWiseOnCPU(EmbeddingBagCollectionSharder):
    """TorchRec's sharder, offering its CUDA sharding types (row-wise included) on CPU."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return super().sharding_types("cuda")


def max_error(plan: list[tuple[PoolingType, str]]) -> float:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=8, num_embeddings=50, feature_names=[f"f{i}"], pooling=p
        )
        for i, (p, _) in enumerate(plan)
    ]
    reference = EmbeddingBagCollection(tables=tables)
    lengths = torch.randint(0, 4, (len(tables) * 4,))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{i}" for i in range(len(tables))],
        values=torch.randint(0, 50, (int(lengths.sum()),)),
        lengths=lengths,
    )
    sharder = RowWiseOnCPU()
    model = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    constraints = {
        t.name: ParameterConstraints(sharding_types=[s])
        for t, (_, s) in zip(tables, plan, strict=True)
    }
    sharding_plan = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints
    ).plan(model, [sharder])
    dmp = DistributedModelParallel(
        model, device=torch.device("cpu"), plan=sharding_plan, sharders=[sharder]
    )
    # on CPU, DMP does not copy the source weights: load them into the shards
    for key, value in dmp.state_dict().items():
        for shard in value.local_shards():
            rows, cols = shard.metadata.shard_offsets
            n, m = shard.tensor.shape
            source = reference.state_dict()[key.removeprefix("_dmp_wrapped_module.")]
            shard.tensor.copy_(source[rows : rows + n, cols : cols + m])
    with torch.no_grad():
        return float((dmp(kjt).wait().values() - reference(kjt).values()).abs().max())


if __name__ == "__main__":
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    MEAN, SUM = PoolingType.MEAN, PoolingType.SUM
    for plan in (
        [(MEAN, "row_wise"), (SUM, "table_wise")],
        [(MEAN, "row_wise"), (MEAN, "table_wise")],
        [(MEAN, "row_wise"), (MEAN, "column_wise")],
        [(SUM, "row_wise"), (MEAN, "table_wise")],  # control: no row-wise MEAN, no callback
    ):
        text = ", ".join(f"{p.value} {s}" for p, s in plan)
        print(f"{text:<40} max |sharded - unsharded| = {max_error(plan):.3g}")
    dist.destroy_process_group()
