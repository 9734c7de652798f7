"""Streaming, mergeable first and second moments for AFM, accumulated in float64.

AFM needs, per embedding table, the covariance of the rows that the data looks up, weighted by
how often each row is looked up.  That splits into two independent pieces:

* lookup counts ``n_i`` per row (:class:`LookupCounter`, :func:`count_lookups`): a pass over the
  data that never touches the weights;
* moments ``(sum n_i, sum n_i e_i, sum n_i e_i e_i^T)`` (:func:`moments_from_counts`): a chunked
  pass over the rows that never touches the data.

Keeping them apart is what lets a sharded caller compute moments from its local rows only: row
shards add up (``moments_from_counts(rows, counts, row_offset)`` per shard, then sum), and counts
are synchronised before moments are formed.  Linear layers get output moments from forward hooks
(:class:`LinearOutputCollector`).  Every statistic here is a sum, so parts over batches, row ranges
or workers merge with ``+`` and :func:`sync_` (an all-reduce).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# Rows per chunk when turning rows into moments: bounds the float64 working copy to
# chunk_rows x d (64k x 128 x 8 B = 64 MiB) whatever the table size.
DEFAULT_CHUNK_ROWS = 65536


@dataclass
class Moments:
    """Weighted zeroth, first and second moments of d-dimensional vectors, in float64.

    ``count = sum w``, ``sum = sum w x``, ``sum_outer = sum w x x^T``.  Parts over disjoint data
    add up to the whole with ``+`` (or in place with ``add_``).

    Args:
        count (torch.Tensor): 0-dim float64 total weight.
        sum (torch.Tensor): ``(d,)`` float64.
        sum_outer (torch.Tensor): ``(d, d)`` float64.

    Example::

        >>> m = Moments.zeros(2)
        >>> m.update(torch.tensor([[1.0, 0.0], [3.0, 2.0]]))
        >>> m.mean().tolist()
        [2.0, 1.0]
    """

    count: torch.Tensor
    sum: torch.Tensor
    sum_outer: torch.Tensor

    @classmethod
    def zeros(cls, dim: int, device: torch.device | None = None) -> Moments:
        """Empty moments of ``dim``-dimensional vectors."""
        f64 = torch.float64
        return cls(
            torch.zeros((), dtype=f64, device=device),
            torch.zeros(dim, dtype=f64, device=device),
            torch.zeros(dim, dim, dtype=f64, device=device),
        )

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def update(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Adds the rows of ``x`` (``(n, d)``), each with its weight (default 1)."""
        x = x.detach().reshape(-1, self.dim).to(torch.float64)
        if weights is None:
            self.count += x.shape[0]
            self.sum += x.sum(dim=0)
            self.sum_outer += x.T @ x
        else:
            w = weights.detach().reshape(-1).to(torch.float64)
            self.count += w.sum()
            self.sum += w @ x
            self.sum_outer += (x * w[:, None]).T @ x

    def add_(self, other: Moments) -> Moments:
        """In-place merge of ``other`` (moments of disjoint data); returns ``self``."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dim {other.dim} into dim {self.dim}")
        self.count += other.count
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count.clone(), self.sum.clone(), self.sum_outer.clone()).add_(other)

    merge = __add__

    def mean(self) -> torch.Tensor:
        """``sum / count`` (``(d,)`` float64)."""
        return self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """Weighted covariance ``sum_outer / count - mean mean^T``, symmetrised."""
        mu = self.mean()
        cov = self.sum_outer / self.count - torch.outer(mu, mu)
        return (cov + cov.T) / 2

    def second_moment(self) -> torch.Tensor:
        """Uncentred ``sum_outer / count`` (what a truncated SVD of the rows diagonalises)."""
        return self.sum_outer / self.count

    def check_finite(self, name: str) -> None:
        """Raises ``ValueError`` naming ``name`` if any statistic is NaN or infinite."""
        for field_name in ("count", "sum", "sum_outer"):
            if not torch.isfinite(getattr(self, field_name)).all():
                raise ValueError(f"{name}: statistic {field_name!r} contains NaN or Inf")


# The names under which the two uses appear in signatures; the math is the same.
EmbeddingMoments = Moments
LinearOutputMoments = Moments


def moments_from_counts(
    weight: torch.Tensor,
    counts: torch.Tensor,
    row_offset: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    name: str = "table",
) -> Moments:
    """Frequency-weighted moments of the rows of one table (or of one row shard of it).

    Only rows with a non-zero count are read, chunk by chunk, so a 10M-row table never needs
    an N x d float64 copy.  Row shards add up: the moments of ``weight[a:b]`` computed with
    ``row_offset=a`` plus those of the other shards equal the moments of the whole table.

    Args:
        weight (torch.Tensor): ``(R, d)`` rows ``row_offset .. row_offset + R`` of the table.
        counts (torch.Tensor): ``(N,)`` lookup counts of the whole table (see
            :func:`count_lookups`).
        row_offset (int): global index of ``weight``'s first row.
        chunk_rows (int): rows converted to float64 at a time.
        name (str): table name used in error messages.

    Returns:
        Moments: ``count = sum n_i``, ``sum = sum n_i e_i``, ``sum_outer = sum n_i e_i e_i^T``
        over this shard's rows.

    Example::

        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
        >>> moments_from_counts(w, torch.tensor([3.0, 1.0, 0.0])).mean().tolist()
        [0.75, 0.25]
    """
    num_rows = weight.shape[0]
    if row_offset < 0 or row_offset + num_rows > counts.shape[0]:
        raise ValueError(
            f"{name}: rows [{row_offset}, {row_offset + num_rows}) are outside the "
            f"{counts.shape[0]} rows that counts describe"
        )
    local_counts = counts[row_offset : row_offset + num_rows].to(torch.float64)
    if not torch.isfinite(local_counts).all():
        raise ValueError(f"{name}: lookup counts contain NaN or Inf")
    moments = Moments.zeros(weight.shape[1], device=weight.device)
    for start in range(0, num_rows, chunk_rows):
        chunk_counts = local_counts[start : start + chunk_rows]
        used = chunk_counts.nonzero().squeeze(1)
        rows = weight[start : start + chunk_rows].detach()[used].to(torch.float64)
        if not torch.isfinite(rows).all():
            bad = used[~torch.isfinite(rows).all(dim=1)][0].item() + start + row_offset
            raise ValueError(f"{name}: weight row {bad} contains NaN or Inf")
        moments.update(rows, chunk_counts[used])
    return moments


class LookupCounter:
    """Accumulates per-row lookup counts of the tables of one ``EmbeddingBagCollection``.

    Each id in a bag adds 1 to its row, or its weight when ``is_weighted`` (like a weighted
    feature's contribution to the pooled output).  Features are mapped to their tables; features
    of the input that no table reads are ignored.  One ``torch.bincount`` per batch over all
    tables at once.

    Args:
        tables (Sequence[EmbeddingBagConfig]): the collection's table configs.
        is_weighted (bool): count per-id weights instead of 1.
        device (Optional[torch.device]): where the counts live.

    Example::

        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=3, feature_names=["f"])
        >>> counter = LookupCounter([cfg])
        >>> counter.update(KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f"], values=torch.tensor([0, 2, 2]), lengths=torch.tensor([2, 1])))
        >>> counter.counts()["t"].tolist()
        [1.0, 0.0, 2.0]
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | None = None,
    ) -> None:
        self._table_names = [t.name for t in tables]
        self._table_rows = [t.num_embeddings for t in tables]
        self._is_weighted = is_weighted
        starts = torch.tensor([0] + self._table_rows).cumsum(0).tolist()
        # feature -> (table name, first row of its table in the concatenated row space, rows)
        self._feature_slot: dict[str, list[tuple[str, int, int]]] = {}
        for table, start in zip(tables, starts[:-1], strict=True):
            for feature in table.feature_names or [table.name]:
                slot = (table.name, start, table.num_embeddings)
                self._feature_slot.setdefault(feature, []).append(slot)
        self._total = torch.zeros(starts[-1], dtype=torch.float64, device=device)

    def update(self, features: KeyedJaggedTensor) -> None:
        """Adds the lookups of one batch; raises ``ValueError`` on ids outside their table."""
        keys = features.keys()
        values = features.values()
        device = values.device
        key_of_value = torch.repeat_interleave(
            torch.arange(len(keys), device=device),
            torch.tensor(features.length_per_key(), device=device),
        )
        weights = features.weights_or_none() if self._is_weighted else None
        if weights is not None:
            weights = weights.to(torch.float64)
        # A key feeding several tables (a shared feature) is counted once per table: layer j
        # holds every key's j-th table (almost always a single layer).
        num_layers = max((len(self._feature_slot.get(k, [])) for k in keys), default=0)
        for layer in range(num_layers):
            slots = [self._feature_slot.get(k, [])[layer : layer + 1] for k in keys]
            start = torch.tensor([s[0][1] if s else -1 for s in slots], device=device)
            rows = torch.tensor([s[0][2] if s else 0 for s in slots], device=device)
            value_start = start[key_of_value]
            used = value_start >= 0
            ids = values[used]
            limit = rows[key_of_value][used]
            bad = (ids < 0) | (ids >= limit)
            if bad.any():
                first = int(bad.nonzero()[0])
                key = keys[int(key_of_value[used][first])]
                table = self._feature_slot[key][layer][0]
                raise ValueError(
                    f"feature {key!r} has id {int(ids[first])} outside table {table!r} "
                    f"(valid ids: 0..{int(limit[first]) - 1})"
                )
            # Counted over the batch's distinct rows, then added to theirs: the same sums as
            # a bincount over all rows, without two N-row temporaries per batch (20M rows:
            # 320 MB).
            rows_hit, slot = torch.unique(ids + value_start[used], return_inverse=True)
            batch_counts = torch.bincount(
                slot,
                weights=None if weights is None else weights[used],
                minlength=rows_hit.numel(),
            )
            self._total.index_add_(0, rows_hit, batch_counts.to(torch.float64))

    def counts(self) -> dict[str, torch.Tensor]:
        """Per table, the ``(num_embeddings,)`` float64 counts so far (views, no copy)."""
        return dict(zip(self._table_names, torch.split(self._total, self._table_rows), strict=True))


def _sparse_features(batch: Batch | KeyedJaggedTensor) -> KeyedJaggedTensor:
    return batch.sparse_features if isinstance(batch, Batch) else batch


def count_lookups(
    tables: Sequence[EmbeddingBagConfig],
    batches: Iterable[Batch | KeyedJaggedTensor],
    is_weighted: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-row lookup counts of ``tables`` over ``batches`` (``Batch`` or ``KeyedJaggedTensor``).

    Args:
        tables (Sequence[EmbeddingBagConfig]): e.g. ``ebc.embedding_bag_configs()``.
        batches (Iterable[Union[Batch, KeyedJaggedTensor]]): calibration data.
        is_weighted (bool): count per-id weights (a weighted collection) instead of 1.

    Returns:
        Dict[str, torch.Tensor]: table name -> ``(num_embeddings,)`` float64 counts.

    Example::

        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=2, feature_names=["f"])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f"], values=torch.tensor([1, 1]), lengths=torch.tensor([1, 1]))
        >>> count_lookups([cfg], [kjt, kjt])["t"].tolist()
        [0.0, 4.0]
    """
    counter = LookupCounter(tables, is_weighted=is_weighted)
    for batch in batches:
        counter.update(_sparse_features(batch))
    return counter.counts()


class LinearOutputCollector:
    """Output moments of selected ``nn.Linear`` layers, collected by forward hooks.

    Use as a context manager around the calibration forward passes; hooks are removed on exit.

    Args:
        layers (Mapping[str, nn.Linear]): name (e.g. fully qualified name) -> layer.

    Example::

        >>> layer = nn.Linear(3, 2)
        >>> with LinearOutputCollector({"fc": layer}) as collector:
        ...     _ = layer(torch.randn(5, 3))
        >>> collector.moments["fc"].count.item()
        5.0
    """

    def __init__(self, layers: Mapping[str, nn.Linear]) -> None:
        self._layers = dict(layers)
        self.moments: dict[str, Moments] = {
            name: Moments.zeros(layer.out_features, device=layer.weight.device)
            for name, layer in self._layers.items()
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LinearOutputCollector:
        for name, layer in self._layers.items():
            moments = self.moments[name]
            self._handles.append(
                layer.register_forward_hook(lambda _m, _i, out, mom=moments: mom.update(out))
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def sync_(
    statistics: Mapping[str, Moments | torch.Tensor],
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Sums statistics over all workers in place (one all-reduce).

    Every worker must pass the same keys with the same shapes.  Keys are visited in sorted
    order, so dict insertion order may differ between workers.

    Args:
        statistics (Mapping[str, Union[Moments, torch.Tensor]]): moments and/or count tensors.
        process_group (Optional[dist.ProcessGroup]): default group when ``None``.
    """
    tensors: list[torch.Tensor] = []
    for key in sorted(statistics):
        value = statistics[key]
        if isinstance(value, Moments):
            tensors.extend([value.count, value.sum, value.sum_outer])
        else:
            tensors.append(value)
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    for tensor, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors]), strict=True):
        tensor.copy_(part.view_as(tensor))
