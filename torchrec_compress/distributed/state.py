"""Moving full (unsharded) weights into a sharded model."""

from collections.abc import Mapping

import torch
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor, distribute_tensor


def _copy_into(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    if isinstance(dst, ShardedTensor):
        if tuple(dst.size()) != tuple(src.shape):
            raise ValueError(
                f"{key}: checkpoint shape {tuple(src.shape)} != model {tuple(dst.size())}"
            )
        for shard in dst.local_shards():
            index = tuple(
                slice(o, o + s)
                for o, s in zip(
                    shard.metadata.shard_offsets, shard.metadata.shard_sizes, strict=False
                )
            )
            shard.tensor.copy_(src[index])
    elif isinstance(dst, DTensor):
        # Every process holds the full source, so distributing it only slices locally.
        local = distribute_tensor(src.to(dst.dtype), dst.device_mesh, dst.placements).to_local()
        dst.to_local().copy_(local)
    else:
        if dst.shape != src.shape:
            raise ValueError(
                f"{key}: checkpoint shape {tuple(src.shape)} != model {tuple(dst.shape)}"
            )
        dst.copy_(src)


@torch.no_grad()
def load_full_state_dict_(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a full (unsharded) ``state_dict`` into a possibly sharded model, shard by shard.

    Each process copies only the rows/columns it owns.  Keys must match exactly: a missing or
    unexpected key raises ``KeyError`` naming it, so no weight is silently left initialised.
    """
    target = model.state_dict()
    missing = sorted(set(target) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(target))
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}")
    for key, dst in target.items():
        _copy_into(dst, state_dict[key], key)


def shard_rank(shard: ShardMetadata) -> int:
    """The process that holds ``shard`` (a ``ShardedTensor``'s shard metadata).

    Raises:
        ValueError: the shard has no placement (naming its offsets).
    """
    rank = shard.placement.rank() if shard.placement is not None else None
    if rank is None:
        raise ValueError(f"shard at offsets {shard.shard_offsets} has no placement rank")
    return rank
