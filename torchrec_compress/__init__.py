"""torchrec-compress: make TorchRec recommendation models smaller and faster.

Low-rank (AFM, SVD) and product-quantized (MEC, PQ) compression of embedding tables and MLP
layers, as drop-in TorchRec modules that shard through ``DistributedModelParallel``.

The public names below are importable from the package itself; each is loaded on first use
(PEP 562), so ``import torchrec_compress.config`` stays light and this module imports nothing of
the library at run time.  Layering (checked by ``tests/test_layering.py``): the public names on
top; the drivers (``api.compress_``, ``distributed.compression``); the methods, one folder each
under ``methods/``; the shared layer (registry, calibration, statistics, report, layout,
checkpoint, guards, ``distributed/`` helpers), which names no method; data and process helpers.

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
    from torchrec_compress.api import compress_
    from torchrec_compress.budget.config import BudgetConfig
    from torchrec_compress.budget.driver import BudgetReport
    from torchrec_compress.distributed.budget import ShardedBudgetReport
    from torchrec_compress.distributed.compression import (
        ShardedCompressionReport,
        load_compressed,
        save_compressed,
    )
    from torchrec_compress.distributed.embeddingbag import CPURowWiseEmbeddingBagCollectionSharder
    from torchrec_compress.distributed.fp_embeddingbag import FeatureProcessedCollectionSharder
    from torchrec_compress.distributed.planning import sharders
    from torchrec_compress.layout import CompressionLayout, compression_layout, restore_layout_
    from torchrec_compress.methods.lowrank.config import AFMConfig, LowRankOverride, SVDConfig
    from torchrec_compress.methods.lowrank.linear import LowRankLinear
    from torchrec_compress.methods.lowrank.module import LowRankEmbeddingBagCollection
    from torchrec_compress.methods.lowrank.sharded import LowRankEmbeddingBagCollectionSharder
    from torchrec_compress.methods.pq.config import (
        KMeansTraining,
        MECConfig,
        MECOverride,
        MECTraining,
        PQConfig,
    )
    from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
    from torchrec_compress.methods.pq.sharded import PQEmbeddingBagCollectionSharder
    from torchrec_compress.methods.pq.sharded_fp import (
        PQFeatureProcessedEmbeddingBagCollectionSharder,
    )
    from torchrec_compress.methods.rowwise_quant.config import (
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
    "BudgetConfig": "torchrec_compress.budget.config",
    "BudgetReport": "torchrec_compress.budget.driver",
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
    "PQEmbeddingBagCollectionSharder": "torchrec_compress.methods.pq.sharded",
    "CPURowWiseEmbeddingBagCollectionSharder": "torchrec_compress.distributed.embeddingbag",
    "LowRankEmbeddingBagCollectionSharder": "torchrec_compress.methods.lowrank.sharded",
    "PQFeatureProcessedEmbeddingBagCollectionSharder": "torchrec_compress.methods.pq.sharded_fp",
    "FeatureProcessedCollectionSharder": "torchrec_compress.distributed.fp_embeddingbag",
    "RowWiseQuantConfig": "torchrec_compress.methods.rowwise_quant.config",
    "RowWiseQuantOverride": "torchrec_compress.methods.rowwise_quant.config",
    "ShardedCompressionReport": "torchrec_compress.distributed.compression",
    "ShardedBudgetReport": "torchrec_compress.distributed.budget",
    "load_compressed": "torchrec_compress.distributed.compression",
    "save_compressed": "torchrec_compress.distributed.compression",
    "CompressionLayout": "torchrec_compress.layout",
    "compression_layout": "torchrec_compress.layout",
    "restore_layout_": "torchrec_compress.layout",
    "reinitialize_dense_": "torchrec_compress.retrain",
    "sharders": "torchrec_compress.distributed.planning",
}

__all__ = [
    "AFMConfig",
    "BudgetConfig",
    "BudgetReport",
    "CPURowWiseEmbeddingBagCollectionSharder",
    "CompressionLayout",
    "CompressionReport",
    "FeatureProcessedCollectionSharder",
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
    "ShardedBudgetReport",
    "ShardedCompressionReport",
    "compress_",
    "compression_layout",
    "load_compressed",
    "reinitialize_dense_",
    "restore_layout_",
    "save_compressed",
    "sharders",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torchrec_compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
