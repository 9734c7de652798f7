"""The contract every CTR dataset of this project follows, and the batching it shares.

A dataset exposes a :class:`CTRSchema` (one embedding table per sparse feature) and yields
``torchrec.datasets.utils.Batch`` objects through ``batches(split, batch_size, rank, world_size,
epoch)``.  All datasets describe a split as a sequence of *blocks* (generated row blocks, parquet
row groups, or one in-memory array) and share :func:`block_batches`, which fixes the split
semantics once for all of them:

- the split's rows are cut into ``world_size`` contiguous, nearly equal rank ranges;
- every rank yields exactly ``ceil(max_rank_rows / batch_size)`` non-empty batches, because a
  ``DistributedModelParallel`` forward is a collective and a rank that stops early deadlocks
  the others;
- the train split is reshuffled per epoch by permuting blocks and the rows inside each block with
  a generator seeded by ``(seed, epoch)`` only, so that all ranks agree on the order and their
  ranges stay disjoint; val and test are never shuffled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class CTRSchema:
    """Shape of a CTR dataset as a model sees it.

    Args:
        dense_in_features: width of the dense input (at least 1: a dataset without dense features
            exposes one constant-zero column, because DLRM needs a dense input).
        sparse_features: feature names in KJT key order; feature ``f`` is looked up in the
            embedding table ``"t_" + f``.
        num_embeddings: rows of each feature's table, in the order of ``sparse_features``.

    Example::

        >>> schema = CTRSchema(2, ("user", "item"), (10, 20))
        >>> schema.table_names
        ('t_user', 't_item')
    """

    dense_in_features: int
    sparse_features: tuple[str, ...]
    num_embeddings: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dense_in_features < 1:
            raise ValueError(
                f"dense_in_features must be >= 1 (DLRM needs a dense input), got {self.dense_in_features}"
            )
        if len(self.sparse_features) != len(self.num_embeddings):
            raise ValueError(
                f"{len(self.sparse_features)} sparse_features but {len(self.num_embeddings)} num_embeddings"
            )
        if len(set(self.sparse_features)) != len(self.sparse_features):
            raise ValueError(f"sparse_features has duplicates: {self.sparse_features}")
        for feature, rows in zip(self.sparse_features, self.num_embeddings, strict=True):
            if rows < 1:
                raise ValueError(
                    f"feature {feature!r} (table 't_{feature}') has {rows} rows; need >= 1"
                )

    @property
    def table_names(self) -> tuple[str, ...]:
        """Embedding table names, ``"t_<feature>"``, in feature order."""
        return tuple(f"t_{feature}" for feature in self.sparse_features)


class CTRDataset(Protocol):
    """What the training loop relies on; see the module docstring for the split semantics."""

    schema: CTRSchema

    def batches(
        self, split: str, batch_size: int, rank: int = 0, world_size: int = 1, epoch: int = 0
    ) -> Iterator[Batch]: ...

    def num_rows(self, split: str) -> int: ...


def check_split(split: str) -> None:
    """Raise a ``ValueError`` unless ``split`` is one of ``"train"``, ``"val"``, ``"test"``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {SPLITS}")


@dataclass
class RowBlock:
    """Consecutive CTR rows held as numpy arrays (the unit datasets load, slice and shuffle).

    Args:
        dense: ``[n, D]`` float32 dense features.
        labels: ``[n]`` float32 labels in {0, 1}.
        lengths: ``[F, n]`` int32 bag lengths, one row per sparse feature.
        values: ``F`` int64 arrays, feature ``f``'s ids of all rows concatenated in row order.

    Example::

        >>> block = RowBlock(
        ...     dense=np.zeros((3, 1), np.float32),
        ...     labels=np.array([0, 1, 0], np.float32),
        ...     lengths=np.array([[1, 0, 2]], np.int32),
        ...     values=(np.array([7, 8, 9]),),
        ... )
        >>> block.take(np.array([2, 0])).values[0].tolist()
        [8, 9, 7]
    """

    dense: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    values: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> RowBlock:
        """Rows ``rows`` (any order, repeats allowed) as a new block; bags move with their rows."""
        lengths = self.lengths[:, rows]
        values = []
        for feature_lengths, feature_values, new_lengths in zip(
            self.lengths, self.values, lengths, strict=True
        ):
            starts = np.cumsum(feature_lengths, dtype=np.int64) - feature_lengths
            # Position of each output value = start of its source bag + offset inside the bag.
            new_offsets = np.cumsum(new_lengths, dtype=np.int64) - new_lengths
            total = int(new_lengths.sum())
            shift = np.repeat(starts[rows] - new_offsets, new_lengths)
            values.append(feature_values[shift + np.arange(total, dtype=np.int64)])
        return RowBlock(self.dense[rows], self.labels[rows], lengths, tuple(values))

    def slice(self, start: int, stop: int) -> RowBlock:
        """Rows ``start:stop`` as a new block (views where possible)."""
        values = []
        for feature_lengths, feature_values in zip(self.lengths, self.values, strict=True):
            first = int(feature_lengths[:start].sum())
            count = int(feature_lengths[start:stop].sum())
            values.append(feature_values[first : first + count])
        return RowBlock(
            self.dense[start:stop],
            self.labels[start:stop],
            self.lengths[:, start:stop],
            tuple(values),
        )

    @staticmethod
    def concat(blocks: Sequence[RowBlock]) -> RowBlock:
        """Blocks stacked row-wise, in order."""
        if len(blocks) == 1:
            return blocks[0]
        return RowBlock(
            np.concatenate([b.dense for b in blocks]),
            np.concatenate([b.labels for b in blocks]),
            np.concatenate([b.lengths for b in blocks], axis=1),
            tuple(np.concatenate(parts) for parts in zip(*(b.values for b in blocks), strict=True)),
        )

    def to_batch(self, keys: Sequence[str]) -> Batch:
        """A torchrec ``Batch``: KJT keyed by ``keys``, int32 lengths, int64 values, no weights."""
        sparse = KeyedJaggedTensor(
            keys=list(keys),
            values=torch.from_numpy(np.concatenate(self.values).astype(np.int64, copy=False)),
            lengths=torch.from_numpy(
                np.ascontiguousarray(self.lengths, dtype=np.int32).reshape(-1)
            ),
        )
        return Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(self.dense, dtype=np.float32)),
            sparse_features=sparse,
            labels=torch.from_numpy(np.ascontiguousarray(self.labels, dtype=np.float32)),
        )


def rank_batch_bounds(
    num_rows: int, batch_size: int, rank: int, world_size: int, split: str = "split"
) -> np.ndarray:
    """Row offsets delimiting ``rank``'s batches of a split of ``num_rows`` rows.

    Ranks get contiguous, nearly equal ranges (``np.array_split`` style); every rank gets
    ``ceil(max_rank_rows / batch_size)`` batches, each rank's rows cut into that many nearly
    equal, non-empty pieces.

    Returns:
        int64 array of ``num_batches + 1`` global row offsets (batch ``i`` = rows
        ``bounds[i]:bounds[i + 1]``).

    Example::

        >>> rank_batch_bounds(10, 4, rank=1, world_size=2).tolist()
        [5, 8, 10]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    rows = base + int(rank < extra)
    num_batches = -(-(base + int(extra > 0)) // batch_size)
    if rows < num_batches:
        raise ValueError(
            f"{split} split has {num_rows} rows: with world_size={world_size} and "
            f"batch_size={batch_size}, rank {rank} gets {rows} rows for {num_batches} batches, so some "
            f"batch would be empty; use batch_size >= 2 and at least world_size rows"
        )
    piece, longer = divmod(rows, max(num_batches, 1))
    sizes = np.full(num_batches, piece, dtype=np.int64)
    sizes[:longer] += 1
    return start + np.concatenate([[0], np.cumsum(sizes)])


def shuffled_blocks(
    block_sizes: Sequence[int], load_block: Callable[[int], RowBlock], seed: int, epoch: int
) -> tuple[list[int], Callable[[int], RowBlock]]:
    """The same blocks in an order and with row orders drawn from ``(seed, epoch)`` only.

    Depends on neither rank nor world size, so every rank sees the same permuted split and the
    contiguous rank ranges of :func:`rank_batch_bounds` stay disjoint.

    Example::

        >>> sizes, load = shuffled_blocks([2, 3], lambda i: None, seed=0, epoch=1)
        >>> sorted(sizes)
        [2, 3]
    """
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(block_sizes))

    def load(index: int) -> RowBlock:
        physical = int(order[index])
        block = load_block(physical)
        rows = np.random.default_rng([seed, epoch, 0x5EED, physical + 1]).permutation(len(block))
        return block.take(rows)

    return [int(block_sizes[i]) for i in order], load


def block_batches(
    block_sizes: Sequence[int],
    load_block: Callable[[int], RowBlock],
    keys: Sequence[str],
    batch_size: int,
    rank: int,
    world_size: int,
    split: str = "split",
) -> Iterator[Batch]:
    """Batches of ``rank``'s share of a split stored as consecutive blocks.

    Loads only the blocks overlapping the rank's range, each once (batches are consecutive), and
    keeps at most the blocks the current batch spans in memory.

    Args:
        block_sizes: rows of each block, in split order.
        load_block: returns block ``i`` as a :class:`RowBlock` of ``block_sizes[i]`` rows.
        keys: KJT keys (the schema's sparse features).
        batch_size, rank, world_size: see :func:`rank_batch_bounds`.
        split: split name, used in error messages.

    Example::

        >>> block = RowBlock(np.zeros((5, 1), np.float32), np.zeros(5, np.float32),
        ...                  np.ones((1, 5), np.int32), (np.arange(5),))
        >>> [len(b.labels) for b in block_batches([5], lambda i: block, ["f"], 2, 0, 1)]
        [2, 2, 1]
    """
    bounds = rank_batch_bounds(sum(block_sizes), batch_size, rank, world_size, split)
    block_starts = np.concatenate([[0], np.cumsum(block_sizes, dtype=np.int64)])
    loaded: dict[int, RowBlock] = {}
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        first = int(np.searchsorted(block_starts, start, side="right")) - 1
        last = int(np.searchsorted(block_starts, stop, side="left")) - 1
        loaded = {i: loaded[i] if i in loaded else load_block(i) for i in range(first, last + 1)}
        parts = [
            loaded[i].slice(
                max(start - int(block_starts[i]), 0),
                min(stop, int(block_starts[i + 1])) - int(block_starts[i]),
            )
            for i in range(first, last + 1)
        ]
        yield RowBlock.concat(parts).to_batch(keys)
