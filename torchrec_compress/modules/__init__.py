"""Unsharded compressed modules: drop-in replacements for TorchRec/PyTorch modules."""

from torchrec_compress.modules.lowrank_embedding_bag import LowRankEmbeddingBagCollection
from torchrec_compress.modules.lowrank_linear import LowRankLinear

__all__ = ["LowRankEmbeddingBagCollection", "LowRankLinear"]
