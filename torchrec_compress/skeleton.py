"""The unsharded architecture of a ``DistributedModelParallel`` model, on ``meta``.

What the sharded drivers compress into (a compressed skeleton whose state comes from the shards)
and what a compressed checkpoint's layout is read from: every sharded module becomes the empty
unsharded module it came from (its own method says how, through the registry), every other
module a copy with its weights on ``meta``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.feature_processor_ import FeatureProcessorsCollection
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection

from torchrec_compress.registry import registered_methods

META = torch.device("meta")


def skeleton_of(module: nn.Module, fqn: str) -> nn.Module:
    """The empty unsharded (``meta``) module of one sharded module: TorchRec's sharded EBC or
    feature-processed collection here, any method's own sharded module by that method
    (:meth:`~torchrec_compress.registry.CompressionMethod.skeleton`).

    Raises:
        TypeError: naming a sharded module no one knows the unsharded form of.
    """
    if isinstance(module, ShardedEmbeddingBagCollection):
        # TorchRec's sharded EBC keeps its configs and weighting, without a public getter
        return EmbeddingBagCollection(
            module._embedding_bag_configs, module._is_weighted, device=META
        )
    processors = getattr(module, "_feature_processors", None)
    collection = getattr(module, "_embedding_bag_collection", None)
    if isinstance(processors, nn.Module) and isinstance(collection, ShardedModule):
        # a sharded FeatureProcessedEmbeddingBagCollection (TorchRec's or this package's):
        # its (dense, replicated) feature processors and the skeleton of its collection
        processors = copy.deepcopy(processors)
        processors.apply(weights_to_meta_)
        return FeatureProcessedEmbeddingBagCollection(
            skeleton_of(collection, f"{fqn}._embedding_bag_collection"),
            processors
            if isinstance(processors, FeatureProcessorsCollection)
            else dict(processors.named_children()),
        )
    for method in registered_methods():
        skeleton = method.skeleton(module, fqn, skeleton_of)
        if skeleton is not None:
            return skeleton
    raise TypeError(
        f"cannot derive the unsharded module of {type(module).__name__} at {fqn!r}; pass "
        "meta_model= (the same architecture, unsharded, on the meta device) to compress_"
    )


def unsharded_skeleton(model: DistributedModelParallel) -> nn.Module:
    """The architecture of a DMP model, unsharded and on ``meta`` (no weights).

    Sharded ``EmbeddingBagCollection`` s and this package's sharded low-rank and PQ collections
    become empty unsharded ones of the same tables; every other module is deep-copied (the
    dense part of a recommendation model is small) with its parameters and persistent buffers
    on ``meta`` (non-persistent buffers, which no checkpoint restores, keep their values).

    Args:
        model (DistributedModelParallel): the sharded model (left unchanged).

    Returns:
        nn.Module: the unwrapped module tree (``model.module``'s structure) on ``meta``.

    Raises:
        TypeError: naming a sharded module whose unsharded form is unknown: pass
            ``meta_model=`` to ``compress_`` instead.

    Example::

        >>> # 2 processes: see tests/distributed/test_compress_dmp.py
        >>> # skeleton = unsharded_skeleton(dmp)  # EBCs instead of ShardedEBCs, all on meta
    """
    inner = model.module
    memo: dict[int, Any] = {
        id(m): skeleton_of(m, fqn)
        for fqn, m in inner.named_modules()
        if isinstance(m, ShardedModule)
    }
    if id(inner) in memo:
        return memo[id(inner)]
    skeleton = copy.deepcopy(inner, memo)
    skeleton.apply(weights_to_meta_)
    return skeleton


def weights_to_meta_(module: nn.Module) -> None:
    """Parameters and persistent buffers to ``meta``; non-persistent buffers stay as they are.

    A non-persistent buffer is not in any checkpoint, so it must keep its value: DMP would
    zero-fill it on ``meta`` (e.g. the ``triu_indices`` of DLRM's ``InteractionArch``).
    """
    for name, param in module._parameters.items():
        if param is not None and param.device != META:
            module._parameters[name] = nn.Parameter(
                torch.empty_like(param, device=META), requires_grad=param.requires_grad
            )
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            module._buffers[name] = torch.empty_like(buffer, device=META)
