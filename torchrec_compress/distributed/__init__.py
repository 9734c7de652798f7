"""Everything that knows about process groups: sharders, sharded modules, planning helpers.

The unsharded modules in :mod:`torchrec_compress.methods` know nothing of distribution; as in
TorchRec, each sharded module lives next to its sharder in one file of this package.
"""

from torchrec_compress.distributed.compression import (
    ShardedCompressionReport,
    compress_sharded_model,
    load_compressed,
    read_compression_layout,
    save_compressed,
    unsharded_skeleton,
)
from torchrec_compress.distributed.embeddingbag import (
    BoundsCheckedShardedEmbeddingBagCollection,
    CPURowWiseEmbeddingBagCollectionSharder,
)
from torchrec_compress.distributed.planning import (
    PlanStorage,
    TableStorage,
    default_sharders,
    plan_model,
    plan_storage,
    shard_model,
    training_sharders,
)
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.methods.lowrank.sharded import (
    FeatureProcessedLowRankSharder,
    LowRankEmbeddingBagCollectionSharder,
    ShardedLowRankEmbeddingBagCollection,
)
from torchrec_compress.methods.lowrank.sharded_driver import (
    ShardedStatistics,
    SparseLookupCounter,
    compress_sharded,
    lowrank_skeleton_,
    sharded_statistics,
)
from torchrec_compress.methods.pq.sharded import (
    PQEmbeddingBagCollectionSharder,
    PQFeatureProcessedEmbeddingBagCollectionSharder,
    ShardedPQEmbeddingBagCollection,
    encode_sharded_codes_,
)
from torchrec_compress.methods.pq.sharded_driver import compress_sharded_pq

__all__ = [
    "BoundsCheckedShardedEmbeddingBagCollection",
    "CPURowWiseEmbeddingBagCollectionSharder",
    "FeatureProcessedLowRankSharder",
    "LowRankEmbeddingBagCollectionSharder",
    "PQEmbeddingBagCollectionSharder",
    "PQFeatureProcessedEmbeddingBagCollectionSharder",
    "PlanStorage",
    "ShardedLowRankEmbeddingBagCollection",
    "ShardedCompressionReport",
    "ShardedPQEmbeddingBagCollection",
    "ShardedStatistics",
    "SparseLookupCounter",
    "TableStorage",
    "compress_sharded",
    "compress_sharded_model",
    "compress_sharded_pq",
    "default_sharders",
    "encode_sharded_codes_",
    "load_compressed",
    "load_full_state_dict_",
    "lowrank_skeleton_",
    "plan_model",
    "plan_storage",
    "read_compression_layout",
    "save_compressed",
    "shard_model",
    "sharded_statistics",
    "training_sharders",
    "unsharded_skeleton",
]
