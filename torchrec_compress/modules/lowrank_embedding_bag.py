"""A drop-in ``EmbeddingBagCollection`` whose tables are stored as low-rank factors.

Each compressed table E (N x d) is replaced by a factor table A (N x k), a projection B (k x d)
and a mean mu (d): ``e_i ~ A_i B + mu``.  Pooling happens on the k-dim factor rows, in an
ordinary TorchRec ``EmbeddingBagCollection`` (``factor_ebc``), so fbgemm pools and DMP shards
it with TorchRec's own sharder; one matmul per table then projects back to d.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_compress.pq import _ops


class LowRankEmbeddingBagCollection(nn.Module):
    """``EmbeddingBagCollection`` replacement with low-rank tables; same inputs and outputs.

    Pooling stays exact in the low-rank space.  For a bag S with per-id weights w (1 when
    unweighted) and L = |S| ids:

    * SUM:  ``sum_S w_i e_i = (sum_S w_i A_i) B + (sum_S w_i) mu``
    * MEAN: ``(1/L) sum_S w_i e_i = ((1/L) sum_S w_i A_i) B + (sum_S w_i / L) mu``; an empty bag
      gives 0, like the uncompressed collection.  (fbgemm's MEAN divides a weighted sum by L,
      not by the sum of weights; the unsharded ``nn.EmbeddingBag`` rejects weighted MEAN, and
      so does this module when unsharded.)

    The bag coefficients come from the input's lengths and weights (one segment sum); adding
    a plain ``+mu`` per bag would be wrong for any bag with more than one id.

    Tables missing from ``ranks`` stay uncompressed: their rows live at full dimension in
    ``factor_ebc`` and skip the projection.  Variable batch size per feature (VBE) inputs are
    not supported.

    Args:
        tables (list[EmbeddingBagConfig]): the ORIGINAL table configs (dims d); returned by
            :meth:`embedding_bag_configs` so models (e.g. DLRM's ``SparseArch``) see d.
        ranks (Mapping[str, int]): table name -> rank k (1..d); others stay uncompressed.
        is_weighted (bool): whether the input carries per-id weights.
        device (Optional[torch.device]): where to allocate.

    Attributes:
        factor_ebc (EmbeddingBagCollection): k-dim factor tables A (same names and features);
            after MEC/PQ compression of the factors (``compress_`` with ``MECConfig`` on a
            low-rank model) a ``PQEmbeddingBagCollection`` of them.
        projection (nn.ParameterDict): table name -> B, ``(k, d)``.
        mean (nn.ParameterDict): table name -> mu, ``(d,)``.

    Example::

        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
        >>> ebc = LowRankEmbeddingBagCollection([cfg], ranks={"t": 4})
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 0, 1]))
        >>> out = ebc(kjt)
        >>> out.keys(), out.values().shape
        (['f'], torch.Size([3, 8]))
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        ranks: Mapping[str, int],
        is_weighted: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        names = [t.name for t in tables]
        unknown = sorted(set(ranks) - set(names))
        if unknown:
            raise ValueError(f"ranks name unknown table(s) {unknown}; tables are {names}")
        for table in tables:
            if table.name in ranks and not 1 <= ranks[table.name] <= table.embedding_dim:
                raise ValueError(
                    f"table {table.name!r}: rank {ranks[table.name]} is invalid; "
                    f"valid ranks are 1..{table.embedding_dim}"
                )
        self._tables = tables
        self._ranks = dict(ranks)
        factor_tables = []
        for table in tables:
            factor = copy.deepcopy(table)
            factor.embedding_dim = ranks.get(table.name, table.embedding_dim)
            factor_tables.append(factor)
        self.factor_ebc = EmbeddingBagCollection(factor_tables, is_weighted, device)
        self.projection = nn.ParameterDict()
        self.mean = nn.ParameterDict()
        for table in tables:
            if table.name in ranks:
                k, d = ranks[table.name], table.embedding_dim
                self.projection[table.name] = nn.Parameter(torch.eye(k, d, device=device))
                self.mean[table.name] = nn.Parameter(torch.zeros(d, device=device))
        self._is_weighted = is_weighted
        # inference path: table name -> ((ptrs, versions), [B; mu]); see _projection_and_mean
        self._fused_cache: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}
        # from the factor configs: the EBC has filled in feature_names=[table name] where empty
        self._embedding_names_by_table = get_embedding_names_by_table(factor_tables)
        self._feature_names_by_table = [list(t.feature_names) for t in factor_tables]
        self._embedding_names = [n for names in self._embedding_names_by_table for n in names]
        self._length_per_key = [
            t.embedding_dim
            for t, names in zip(tables, self._embedding_names_by_table, strict=True)
            for _ in names
        ]

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The original (uncompressed) table configs."""
        return self._tables

    def is_weighted(self) -> bool:
        return self._is_weighted

    def ranks(self) -> dict[str, int]:
        """Table name -> rank of each compressed table."""
        return dict(self._ranks)

    @torch.no_grad()
    def with_factor_collection(
        self, factor_collection: nn.Module, column_orders: Mapping[str, torch.Tensor] | None = None
    ) -> LowRankEmbeddingBagCollection:
        """A copy whose factor tables are ``factor_collection`` (e.g. product-quantized).

        ``factor_collection`` must take the same features and return the factor dims in the
        same order as ``factor_ebc`` (e.g. a ``PQEmbeddingBagCollection`` of the factor
        tables).  ``column_orders[name]`` says that its columns of table ``name`` are this
        module's factor columns in that order (``new_A = A[:, order]``); the projection rows are
        reordered to match, so the product ``A B`` is unchanged.  Projections and means are
        copied; ``self`` is left as it is.

        Example::

            >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
            >>> ebc = LowRankEmbeddingBagCollection([cfg], ranks={"t": 4})
            >>> swapped = ebc.with_factor_collection(ebc.factor_ebc, {"t": torch.tensor([3, 2, 1, 0])})
            >>> swapped.projection["t"][0].tolist() == ebc.projection["t"][3].tolist()
            True
        """
        orders = dict(column_orders or {})
        unknown = sorted(set(orders) - set(self._ranks))
        if unknown:
            raise ValueError(f"column_orders name table(s) {unknown} that are not low-rank")
        new = LowRankEmbeddingBagCollection(
            self._tables, self._ranks, self._is_weighted, torch.device("meta")
        )
        new.factor_ebc = factor_collection
        for name, k in self._ranks.items():
            projection = self.projection[name].detach()
            order = orders.get(name)
            if order is not None:
                if sorted(order.tolist()) != list(range(k)):
                    raise ValueError(f"table {name!r}: column order must permute 0..{k - 1}")
                projection = projection[order.to(projection.device)]
            new.projection[name] = nn.Parameter(projection.clone())
            new.mean[name] = nn.Parameter(self.mean[name].detach().clone())
        return new

    @torch.no_grad()
    def load_table_(
        self,
        name: str,
        factor_table: torch.Tensor,
        projection: torch.Tensor | None = None,
        mean: torch.Tensor | None = None,
    ) -> None:
        """Copies one table's factors in (``factor_table`` only for an uncompressed table)."""
        weight = self.factor_ebc.embedding_bags[name].weight
        if factor_table.shape != weight.shape:
            raise ValueError(
                f"table {name!r}: factor table has shape {tuple(factor_table.shape)}, "
                f"expected {tuple(weight.shape)}"
            )
        weight.copy_(factor_table)
        if name in self._ranks:
            if projection is None or mean is None:
                raise ValueError(f"table {name!r} is compressed: projection and mean are needed")
            self.projection[name].copy_(projection)
            self.mean[name].copy_(mean)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings with the original keys, dims and order.

        Args:
            features (KeyedJaggedTensor): the input of the original collection.

        Returns:
            KeyedTensor: like ``EmbeddingBagCollection.forward``.
        """
        if features.variable_stride_per_key() or features.inverse_indices_or_none() is not None:
            raise ValueError(
                "LowRankEmbeddingBagCollection does not support variable batch size per feature"
            )
        if self._fused_applies(features):
            return self._fused_forward(features)
        # (B, sum of factor dims): table by table, feature by feature, as the factor configs say
        factor_kt = self.factor_ebc(features)
        factors = factor_kt.values()
        if factor_kt.keys() != self._embedding_names:
            # a DMP-sharded factor_ebc returns its keys grouped by shard, not in table order
            factors = torch.cat([factor_kt[name] for name in self._embedding_names], dim=1)
        batch = features.stride()
        lengths = features.lengths().view(-1, batch)
        weights = features.weights_or_none() if self._is_weighted else None
        # sum of w per bag; unweighted, that is the bag length itself (no segment reduction)
        if weights is None:
            bag_sum = lengths
        else:
            bag_sum = torch.segment_reduce(weights, "sum", lengths=features.lengths())
            bag_sum = bag_sum.view(-1, batch)
        key_index = {key: i for i, key in enumerate(features.keys())}
        pooled: list[torch.Tensor] = []
        start = 0
        for table, feature_names in zip(self._tables, self._feature_names_by_table, strict=True):
            k = self._ranks.get(table.name, table.embedding_dim)
            block = factors[:, start : start + k * len(feature_names)]
            start += block.shape[1]
            if table.name not in self._ranks:
                pooled.append(block)
                continue
            rows = [key_index[f] for f in feature_names]
            coef = bag_sum[rows].T  # (B, F_t)
            if table.pooling == PoolingType.MEAN:
                coef = coef / lengths[rows].T.clamp(min=1)
            # one (B * F_t, k + 1) @ (k + 1, d) for all features of the table (rows in bag,
            # feature order): [A | coef] @ [B ; mu] adds coef x mu inside the GEMM, so the
            # (B, d) output is written once, with no second pass or (B, d) temporary
            factors_and_coef = torch.cat(
                [block.reshape(-1, k), coef.reshape(-1, 1).to(block.dtype)], dim=1
            )
            projection_and_mean = torch.cat(
                [self.projection[table.name], self.mean[table.name].unsqueeze(0)]
            )
            pooled.append((factors_and_coef @ projection_and_mean).view(batch, -1))
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=self._length_per_key,
            # a single table's output is returned as is, not copied by a one-element cat
            values=pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1),
        )

    def _fused_applies(self, features: KeyedJaggedTensor) -> bool:
        """Inference on CPU with an unsharded factor collection: one C++ pass per feature."""
        if not _ops.HAS_KERNELS or type(self.factor_ebc) is not EmbeddingBagCollection:
            return False
        tables = self.factor_ebc.embedding_bags.values()
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return False  # training: nn.EmbeddingBag's autograd (sparse-aware) does the work
        weights = features.weights_or_none() if self._is_weighted else None
        if weights is not None and (
            weights.dtype != torch.float32
            or any(t.pooling == PoolingType.MEAN for t in self._tables)  # see the class notes
        ):
            return False
        return all(
            t.weight.device.type == "cpu" and t.weight.dtype == torch.float32 for t in tables
        ) and features.values().dtype in (torch.int32, torch.int64)

    def _projection_and_mean(self, name: str) -> torch.Tensor:
        """``[B; mu]`` (``(k + 1, d)``), rebuilt only when either parameter changed.

        Tensor versions count in-place updates (optimizer steps, ``load_state_dict``), so a
        stale copy is never used; serving reuses one copy instead of concatenating per call.
        """
        projection, mean = self.projection[name], self.mean[name]
        key = (projection.data_ptr(), projection._version, mean.data_ptr(), mean._version)
        cached = self._fused_cache.get(name)
        if cached is None or cached[0] != key:
            cached = (key, torch.cat([projection.detach(), mean.detach().unsqueeze(0)]))
            self._fused_cache[name] = cached
        return cached[1]

    def _fused_forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """``forward`` through ``torch.ops.torchrec_compress.lowrank_pooled_lookup``.

        Per feature, the kernel pools the k-dim factor rows of every bag and appends the mean
        row's coefficient (``[B, k + 1]``, reading the KJT's ids and offsets in place); one GEMM
        with ``[B; mu]`` then gives the ``(B, d)`` output.  Same results as the generic path.
        """
        batch = features.stride()
        values = features.values()
        offsets = features.offsets()
        weights = features.weights_or_none() if self._is_weighted else None
        key_index = {key: i for i, key in enumerate(features.keys())}
        pooled: list[torch.Tensor] = []
        for table, feature_names in zip(self._tables, self._feature_names_by_table, strict=True):
            weight = self.factor_ebc.embedding_bags[table.name].weight
            compressed = table.name in self._ranks
            if compressed:
                projection_and_mean = self._projection_and_mean(table.name)
            for name in feature_names:
                f = key_index[name]
                factors_and_coef = torch.ops.torchrec_compress.lowrank_pooled_lookup(
                    weight.detach(),
                    values,
                    offsets[f * batch : (f + 1) * batch + 1],
                    weights,
                    table.pooling == PoolingType.MEAN,
                )
                if compressed:
                    pooled.append(factors_and_coef @ projection_and_mean)
                else:
                    pooled.append(factors_and_coef[:, :-1])
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=self._length_per_key,
            values=pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1),
        )
