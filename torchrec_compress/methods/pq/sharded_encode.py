"""Encoding a sharded float table into the codes of a sharded PQ collection, where the rows
live (:func:`encode_sharded_codes_`): the float table is never gathered."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._shard.sharded_tensor import ShardedTensor

from torchrec_compress.distributed.state import shard_rank
from torchrec_compress.methods.pq.sharded_codes import all_to_all


class CodeEncoder(Protocol):
    """Anything that encodes float rows into PQ codes, e.g. ``ProductQuantizer`` or
    ``MECQuantizer`` (their ``compute_codes``)."""

    def compute_codes(self, x: Tensor, chunk_size: int = ...) -> Tensor: ...


@torch.no_grad()
def encode_sharded_codes_(
    codes: ShardedTensor,
    weight: ShardedTensor,
    encoder: CodeEncoder,
    chunk_size: int = 65536,
) -> None:
    """Encodes a row-sharded float table into a row-sharded codes tensor, in place.

    Each process encodes the rows of ``weight`` it holds (``chunk_size`` rows at a time, so the
    float rows are never copied whole), then the codes (``M`` bytes per row) are exchanged with
    one ``all_to_all_single`` so that every process receives the rows of ``codes`` it owns.  The
    two layouts are independent (e.g. a row-wise float table and table-wise codes); when they
    coincide nothing crosses the network.  Collective: every process of the group must call it.

    Args:
        codes (ShardedTensor): ``[rows, M]`` target, e.g.
            ``ShardedPQEmbeddingBagCollection.sharded_codes(table)`` (writes into the module).
        weight (ShardedTensor): ``[rows, d]`` float table sharded by whole rows (table-wise,
            row-wise, table-row-wise), e.g. a DMP-sharded ``EmbeddingBagCollection``'s
            ``state_dict()[...weight]``.
        encoder (CodeEncoder): trained quantizer with ``compute_codes(x, chunk_size)``.
        chunk_size (int): rows encoded at once.

    Example::

        >>> # 2 processes, see tests/distributed/test_pq_sharded.py::test_encode_sharded_codes
        >>> # encode_sharded_codes_(sharded_pq.sharded_codes("t"), weight, quantizer)
    """
    rows, dim = weight.size()
    if codes.size(0) != rows:
        raise ValueError(f"codes have {codes.size(0)} rows, the float table {rows}")
    pg = codes._process_group
    world_size = dist.get_world_size(pg)
    code_width = codes.size(1)
    local_keys: list[Tensor] = []
    local_codes: list[Tensor] = []
    for shard in weight.local_shards():
        offset, size = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        if offset[1] != 0 or size[1] != dim:
            raise ValueError(
                f"the float table must be sharded by whole rows to be encoded, got a shard at "
                f"{offset} of size {size}; plan it table_wise, row_wise or table_row_wise"
            )
        encoded = encoder.compute_codes(shard.tensor, chunk_size)
        local_codes.append(encoded.to(codes.dtype))
        local_keys.append(torch.arange(offset[0], offset[0] + size[0]))
    keys = torch.cat(local_keys) if local_keys else torch.empty(0, dtype=torch.long)
    encoded = (
        torch.cat(local_codes) if local_codes else torch.empty(0, code_width, dtype=codes.dtype)
    )
    if encoded.shape[1] != code_width:
        raise ValueError(
            f"the encoder gives {encoded.shape[1]} codes per row, expected {code_width}"
        )

    targets = sorted(codes.metadata().shards_metadata, key=lambda m: m.shard_offsets[0])
    targets = [m for m in targets if m.shard_sizes[0] > 0]
    starts = torch.tensor([m.shard_offsets[0] for m in targets], dtype=torch.long)
    owners = torch.tensor([shard_rank(m) for m in targets], dtype=torch.long)
    owner = owners[torch.searchsorted(starts, keys, right=True) - 1]
    order = torch.argsort(owner, stable=True)
    send_counts = torch.bincount(owner, minlength=world_size)
    recv_counts = all_to_all(send_counts, [1] * world_size, [1] * world_size, pg)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    got_keys = all_to_all(keys[order], send_splits, recv_splits, pg)
    got_codes = all_to_all(encoded[order], send_splits, recv_splits, pg)

    mine = sorted(codes.local_shards(), key=lambda s: s.metadata.shard_offsets[0])
    if got_keys.numel() != sum(s.metadata.shard_sizes[0] for s in mine):
        raise RuntimeError("codes shards and float shards disagree on the rows of this process")
    shard_starts = torch.tensor([s.metadata.shard_offsets[0] for s in mine], dtype=torch.long)
    which = torch.searchsorted(shard_starts, got_keys, right=True) - 1
    for index, shard in enumerate(mine):
        selected = (which == index).nonzero().squeeze(1)
        shard.tensor[got_keys[selected] - shard.metadata.shard_offsets[0]] = got_codes[selected]
