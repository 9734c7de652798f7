"""torchrec-compress: make TorchRec recommendation models smaller and faster.

Low-rank (AFM, SVD) and product-quantized (MEC, PQ) compression of embedding tables and MLP
layers, as drop-in TorchRec modules that shard through ``DistributedModelParallel``.

The public names below are importable from the package itself; each is loaded on first use
(PEP 562), so ``import torchrec_compress.config`` stays light.  Layering: :mod:`torchrec_compress.api`
(the entry point, ``compress_``) sits above :mod:`torchrec_compress.distributed`, which imports only
the lower modules (``report``, ``calibration``, ``discovery``, ``factorization``, ...).

Example::

    >>> from torchrec_compress import AFMConfig, compress_, sharders
    >>> AFMConfig(rank=8).rank, callable(compress_)
    (8, True)
    >>> "PQEmbeddingBagCollectionSharder" in {type(s).__name__ for s in sharders()}
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn
    from torchrec.distributed.types import ModuleSharder

    from torchrec_compress.api import compress_
    from torchrec_compress.distributed import (
        CPURowWiseEmbeddingBagCollectionSharder,
        FeatureProcessedLowRankSharder,
        LowRankEmbeddingBagCollectionSharder,
        PQEmbeddingBagCollectionSharder,
        PQFeatureProcessedEmbeddingBagCollectionSharder,
        ShardedCompressionReport,
        load_compressed,
        save_compressed,
    )
    from torchrec_compress.layout import CompressionLayout, compression_layout, restore_layout_
    from torchrec_compress.methods.lowrank.config import AFMConfig, LowRankOverride, SVDConfig
    from torchrec_compress.methods.lowrank.linear import LowRankLinear
    from torchrec_compress.methods.lowrank.module import LowRankEmbeddingBagCollection
    from torchrec_compress.methods.pq.config import (
        KMeansTraining,
        MECConfig,
        MECOverride,
        MECTraining,
        PQConfig,
    )
    from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
    from torchrec_compress.methods.rowwise_quant.method import (
        RowWiseQuantConfig,
        RowWiseQuantOverride,
    )
    from torchrec_compress.report import CompressionReport
    from torchrec_compress.retrain import reinitialize_dense_

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "compress_": "torchrec_compress.api",
    "CompressionReport": "torchrec_compress.report",
    "AFMConfig": "torchrec_compress.methods.lowrank.config",
    "SVDConfig": "torchrec_compress.methods.lowrank.config",
    "MECConfig": "torchrec_compress.methods.pq.config",
    "PQConfig": "torchrec_compress.methods.pq.config",
    "LowRankOverride": "torchrec_compress.methods.lowrank.config",
    "MECOverride": "torchrec_compress.methods.pq.config",
    "MECTraining": "torchrec_compress.methods.pq.config",
    "KMeansTraining": "torchrec_compress.methods.pq.config",
    "LowRankEmbeddingBagCollection": "torchrec_compress.methods.lowrank.module",
    "LowRankLinear": "torchrec_compress.methods.lowrank.linear",
    "PQEmbeddingBagCollection": "torchrec_compress.methods.pq.module",
    "PQEmbeddingBagCollectionSharder": "torchrec_compress.distributed",
    "CPURowWiseEmbeddingBagCollectionSharder": "torchrec_compress.distributed",
    "LowRankEmbeddingBagCollectionSharder": "torchrec_compress.distributed",
    "PQFeatureProcessedEmbeddingBagCollectionSharder": "torchrec_compress.distributed",
    "FeatureProcessedLowRankSharder": "torchrec_compress.distributed",
    "RowWiseQuantConfig": "torchrec_compress.methods.rowwise_quant.method",
    "RowWiseQuantOverride": "torchrec_compress.methods.rowwise_quant.method",
    "ShardedCompressionReport": "torchrec_compress.distributed",
    "load_compressed": "torchrec_compress.distributed",
    "save_compressed": "torchrec_compress.distributed",
    "CompressionLayout": "torchrec_compress.layout",
    "compression_layout": "torchrec_compress.layout",
    "restore_layout_": "torchrec_compress.layout",
    "reinitialize_dense_": "torchrec_compress.retrain",
}

__all__ = [
    "AFMConfig",
    "CPURowWiseEmbeddingBagCollectionSharder",
    "CompressionLayout",
    "CompressionReport",
    "FeatureProcessedLowRankSharder",
    "KMeansTraining",
    "LowRankEmbeddingBagCollection",
    "LowRankEmbeddingBagCollectionSharder",
    "LowRankLinear",
    "LowRankOverride",
    "MECConfig",
    "MECOverride",
    "MECTraining",
    "PQConfig",
    "PQEmbeddingBagCollection",
    "PQEmbeddingBagCollectionSharder",
    "PQFeatureProcessedEmbeddingBagCollectionSharder",
    "RowWiseQuantConfig",
    "RowWiseQuantOverride",
    "SVDConfig",
    "ShardedCompressionReport",
    "compress_",
    "compression_layout",
    "load_compressed",
    "reinitialize_dense_",
    "restore_layout_",
    "save_compressed",
    "sharders",
]


def sharders(model: nn.Module | None = None) -> list[ModuleSharder[nn.Module]]:
    """Every sharder a ``DistributedModelParallel`` user must pass for compressed models.

    TorchRec's default sharders, with the ``EmbeddingBagCollection`` sharder replaced by one
    that offers row-wise sharding on CPU, plus the sharders of ``LowRankEmbeddingBagCollection``,
    ``PQEmbeddingBagCollection`` and of a ``FeatureProcessedEmbeddingBagCollection`` holding
    either (see :func:`torchrec_compress.distributed.planning.default_sharders`; pass ``model``
    so that the FPEBC sharder matches its FPEBCs), less TorchRec's inference-only sharder of
    quantized collections (:func:`~torchrec_compress.distributed.planning.training_sharders`):
    it asserts CUDA and does not exchange ids between training processes, so a row-wise int8
    collection stays whole on every process (frozen rows) while the rest trains.

    Returns:
        list[ModuleSharder[nn.Module]]: a fresh list, safe to extend.

    Example::

        >>> from torchrec_compress import sharders
        >>> names = [type(s).__name__ for s in sharders()]
        >>> names[:2]
        ['CPURowWiseEmbeddingBagCollectionSharder', 'PQEmbeddingBagCollectionSharder']
        >>> # DistributedModelParallel(model, plan=plan, sharders=sharders(), ...)
    """
    from torchrec_compress.distributed.planning import default_sharders, training_sharders

    return training_sharders(default_sharders(model))


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torchrec_compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
