"""Small deterministic models and batches for tests (unsharded reference vs sharded)."""

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import PoolingType

TABLE_ROWS = (97, 64, 300)
DENSE_IN = 5


def tiny_tables(dim: int = 16) -> list[EmbeddingBagConfig]:
    """Three tables; the second mean-pooled, so both pooling modes are exercised."""
    return [
        EmbeddingBagConfig(
            name=f"t_f{i}",
            embedding_dim=dim,
            num_embeddings=rows,
            feature_names=[f"f{i}"],
            pooling=PoolingType.MEAN if i == 1 else PoolingType.SUM,
        )
        for i, rows in enumerate(TABLE_ROWS)
    ]


def tiny_dlrm(device: torch.device, dim: int = 16, seed: int = 0) -> DLRMTrain:
    """A small DLRM whose weights depend only on ``seed`` (when built on CPU)."""
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=tiny_tables(dim), device=device)
    return DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=DENSE_IN,
            dense_arch_layer_sizes=[32, dim],
            over_arch_layer_sizes=[32, 1],
        )
    )


def tiny_batch(batch_size: int, seed: int, max_bag: int = 4) -> Batch:
    """Multi-hot bags of 0..max_bag ids (empty bags included) for every table of ``tiny_tables``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_bag + 1, (len(TABLE_ROWS), batch_size), generator=g)
    values = torch.cat(
        [
            torch.randint(0, rows, (int(lengths[i].sum()),), generator=g)
            for i, rows in enumerate(TABLE_ROWS)
        ]
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{i}" for i in range(len(TABLE_ROWS))],
        values=values,
        lengths=lengths.flatten().int(),
    )
    return Batch(
        dense_features=torch.randn(batch_size, DENSE_IN, generator=g),
        sparse_features=kjt,
        labels=torch.randint(0, 2, (batch_size,), generator=g).float(),
    )
