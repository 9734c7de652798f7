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

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress.moments import Moments

# The names under which the two uses appear in signatures; the math is the same.
EmbeddingMoments = Moments
LinearOutputMoments = Moments


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
