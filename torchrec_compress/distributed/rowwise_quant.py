"""Row-wise quantized collections under ``DistributedModelParallel``: plan for serving, replicate
for training.

A row-wise quantized table (see :mod:`torchrec_compress.rowwise_quant`) is TorchRec's quantized
``EmbeddingBagCollection``.  TorchRec's ``QuantEmbeddingBagCollectionSharder`` (one of its default
sharders) *plans* it at its true size on any topology (``rows x (d * bits / 8 + 4)`` bytes), but
the module it *shards* into is TorchRec's inference module: one process driving several GPUs
(``ShardingEnv.from_local``), with CUDA table-batched kernels.  Measured with torchrec 1.8.0 on
CPU, sharding it (``table_wise`` or ``row_wise``) fails ("Torch not compiled with CUDA
enabled"), and in a multi-process training job its local-only input dist would not exchange ids
between ranks anyway.

For fine-tuning a model whose tables are quantized (the rows are frozen; AFM projections,
means and dense layers train), :func:`training_sharders` leaves TorchRec's inference sharders
out, so DMP keeps each quantized collection whole on every rank (like a dense module; its
``uint8`` buffers are not broadcast) and shards or replicates everything else as usual.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchrec.distributed.quant_embeddingbag import QuantEmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from torchrec_compress.distributed.planning import default_sharders


def training_sharders(
    sharders: Sequence[ModuleSharder[nn.Module]] | None = None,
) -> list[ModuleSharder[nn.Module]]:
    """``sharders`` (default :func:`~torchrec_compress.distributed.default_sharders`) without
    the sharders of TorchRec's quantized (inference) embedding bag collections.

    Pass the result to the planner and to ``DistributedModelParallel`` when training a model
    that holds row-wise quantized collections: they then stay whole on every rank.

    Args:
        sharders (Optional[Sequence[ModuleSharder[nn.Module]]]): the sharders to filter.

    Returns:
        list[ModuleSharder[nn.Module]]: the same sharders, in order, minus those whose module
        type is TorchRec's quantized ``EmbeddingBagCollection``.

    Example::

        >>> any(isinstance(s, QuantEmbeddingBagCollectionSharder) for s in training_sharders())
        False
        >>> len(training_sharders()) == len(default_sharders()) - 1
        True
    """
    sharders = list(sharders) if sharders is not None else default_sharders()
    return [
        s
        for s in sharders
        if not isinstance(s, QuantEmbeddingBagCollectionSharder)
        and s.module_type is not QuantEmbeddingBagCollection
    ]
