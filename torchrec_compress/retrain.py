"""Re-initialise a compressed model's dense layers: the MEC paper's retraining protocol.

MEC (Wang et al.) does not fine-tune the model whose embeddings it quantized: it keeps the codes
frozen and trains the downstream CTR model again, from freshly initialised MLPs, with the
codebooks as the (trainable) embedding parameters.  :func:`reinitialize_dense_` is the step that
makes a compressed model start that way; train it as a baseline afterwards (full learning rates,
fresh optimizer state).

Everything that is not an embedding collection is re-initialised: ``nn.Linear`` layers of the
bottom and top MLPs (also inside ``LowRankLinear``), DCN cross layers, any module with a
``reset_parameters``.  Embedding collections are left as they are, whatever they hold (plain
tables, AFM factor tables and projections, PQ codes and codebooks, quantized rows), plain or
sharded.  Parameters whose module has no ``reset_parameters`` (torchrec's ``LowRankCrossNet``
keeps its kernels in ``ParameterList``s) get torchrec's own initialisation of such layers:
Xavier-normal for matrices, zeros for vectors.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollectionInterface,
    EmbeddingCollectionInterface,
)
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection

from torchrec_compress.registry import compressed_collection_types

_EMBEDDING_MODULES = (
    ShardedModule,
    EmbeddingBagCollectionInterface,
    EmbeddingCollectionInterface,
    FeatureProcessedEmbeddingBagCollection,
    nn.Embedding,
    nn.EmbeddingBag,
)


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, (*_EMBEDDING_MODULES, *compressed_collection_types()))


def reinitialize_dense_(model: nn.Module, seed: int = 0) -> list[str]:
    """Re-initialise every dense layer of ``model`` in place; embedding collections are kept.

    Deterministic given ``seed`` (the global RNG state is left as it was), so every process of
    a ``DistributedModelParallel`` job draws the same dense weights, as data parallelism
    requires.  Build a new optimizer afterwards: Adam's moments belong to the old weights.

    Args:
        model (nn.Module): a model, plain or ``DistributedModelParallel``, compressed or not.
        seed (int): seed of the new dense weights.

    Returns:
        list[str]: the qualified names of the modules re-initialised (empty when ``model`` has
        no dense layer).

    Example::

        >>> from torchrec.modules.mlp import MLP
        >>> mlp = MLP(4, [8, 1])
        >>> before = mlp._mlp[0]._linear.weight.detach().clone()
        >>> reinitialize_dense_(mlp, seed=0)
        ['_mlp.0._linear', '_mlp.1._linear']
        >>> bool(torch.equal(before, mlp._mlp[0]._linear.weight))
        False
    """
    touched: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if _is_embedding(module):
            return
        own = list(module.named_parameters(recurse=False))
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
            touched.append(prefix)
        elif own:
            for _, param in own:
                if param.dim() >= 2:
                    nn.init.xavier_normal_(param)
                else:
                    nn.init.zeros_(param)
            touched.append(prefix)
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        visit("", model)
    return touched
