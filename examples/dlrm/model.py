"""DLRM / DLRM-DCN construction from a dataset schema."""

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.mlp import MLP

from torchrec_compress.data import CTRSchema

ARCHS = ("dlrm", "dcn", "dense_only")


@dataclass
class ModelConfig:
    """Architecture of the CTR model.

    Args:
        arch: ``"dlrm"``, ``"dcn"`` (``DLRM_DCN``) or ``"dense_only"`` (an MLP on the dense
            features that ignores the sparse ones: the control showing that the tables matter).
        embedding_dim: dimension of every table.
        dense_arch: hidden sizes of the bottom MLP (``embedding_dim`` is appended).
        over_arch: hidden sizes of the top MLP (the final ``1`` is appended).
        dcn_layers / dcn_low_rank_dim: cross network of ``DLRM_DCN``.
    """

    arch: str = "dlrm"
    embedding_dim: int = 64
    dense_arch: list[int] = field(default_factory=lambda: [128])
    over_arch: list[int] = field(default_factory=lambda: [400, 400, 400])
    dcn_layers: int = 3
    dcn_low_rank_dim: int = 64

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")


class DenseOnly(nn.Module):
    """An MLP over the dense features alone; ``forward(dense, sparse)`` ignores ``sparse``."""

    def __init__(self, dense_in_features: int, layer_sizes: list[int]) -> None:
        super().__init__()
        self.mlp = MLP(dense_in_features, layer_sizes[:-1], bias=True, activation="relu")
        self.head = nn.Linear(layer_sizes[-2] if len(layer_sizes) > 1 else dense_in_features, 1)

    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> torch.Tensor:
        return self.head(self.mlp(dense_features))


def table_configs(schema: CTRSchema, embedding_dim: int) -> list[EmbeddingBagConfig]:
    """One table ``t_<feature>`` per sparse feature of ``schema``."""
    return [
        EmbeddingBagConfig(
            name=f"t_{feature}",
            embedding_dim=embedding_dim,
            num_embeddings=rows,
            feature_names=[feature],
        )
        for feature, rows in zip(schema.sparse_features, schema.num_embeddings, strict=False)
    ]


def build_model(schema: CTRSchema, config: ModelConfig, device: torch.device) -> DLRMTrain:
    """A ``DLRMTrain`` (loss + logits) for ``schema``; tables are built on ``device``.

    Build on ``torch.device("meta")`` to plan or shard without allocating the tables.
    """
    over_arch = [*config.over_arch, 1]
    if config.arch == "dense_only":
        return DLRMTrain(DenseOnly(schema.dense_in_features, over_arch))  # type: ignore[arg-type]
    ebc = EmbeddingBagCollection(tables=table_configs(schema, config.embedding_dim), device=device)
    dense_arch = [*config.dense_arch, config.embedding_dim]
    if config.arch == "dlrm":
        module: DLRM = DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=schema.dense_in_features,
            dense_arch_layer_sizes=dense_arch,
            over_arch_layer_sizes=over_arch,
        )
    else:
        module = DLRM_DCN(
            embedding_bag_collection=ebc,
            dense_in_features=schema.dense_in_features,
            dense_arch_layer_sizes=dense_arch,
            over_arch_layer_sizes=over_arch,
            dcn_num_layers=config.dcn_layers,
            dcn_low_rank_dim=config.dcn_low_rank_dim,
        )
    return DLRMTrain(module)
