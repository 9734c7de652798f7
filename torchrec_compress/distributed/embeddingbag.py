"""An ``EmbeddingBagCollection`` sharder that also offers row-wise sharding on CPU.

TorchRec's ``EmbeddingBagCollectionSharder.sharding_types("cpu")`` leaves out ``row_wise``,
``table_row_wise`` and ``grid_shard`` because gloo has no asynchronous reduce-scatter.  The
synchronous path works on gloo and matches an unsharded reference exactly (see
``tests/distributed/test_dmp_equivalence.py``), and row-wise sharding is what billion-row tables
need, so this sharder offers the CUDA list on every device.
"""

from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder


class CPURowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """``EmbeddingBagCollectionSharder`` that offers the CUDA sharding types on CPU too.

    Example::

        >>> from torchrec.distributed.types import ShardingType
        >>> sharder = CPURowWiseEmbeddingBagCollectionSharder()
        >>> ShardingType.ROW_WISE.value in sharder.sharding_types("cpu")
        True
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        if compute_device_type == "cpu":
            return super().sharding_types("cuda")
        return super().sharding_types(compute_device_type)
