"""A drop-in ``EmbeddingBagCollection`` whose tables are stored as low-rank factors.

Each compressed table E (N x d) is replaced by a factor table A (N x k), a projection B (k x d)
and a mean mu (d, stored ``(1, d)``): ``e_i ~ A_i B + mu``.  Pooling happens on the k-dim factor
rows, in an ordinary TorchRec ``EmbeddingBagCollection`` (``factor_ebc``), so fbgemm pools them;
one matmul per table then projects back to d.  Under DMP the collection is sharded as one module
(``torchrec_compress.methods.lowrank.sharded``: factor tables by TorchRec's EBC sharder,
projection and mean dense), and its forward traces (``torch.fx``, TorchScript, ``torch.export``,
``torch.compile``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_compress.guards import FeatureIdRanges, check_fixed_batch, is_tracing
from torchrec_compress.methods.lowrank import kernels as _ops
from torchrec_compress.methods.lowrank.pooling import LowRankLayout


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
        mean (nn.ParameterDict): table name -> mu, ``(1, d)`` (2-D like every other dense
            parameter, so row-wise optimizers such as TorchRec's ``RowWiseAdagrad`` apply).

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
        self._id_ranges = FeatureIdRanges(tables)
        self._ranks = dict(ranks)
        self._layout = LowRankLayout(tables, self._ranks, is_weighted)
        # packed tables read weighted slot features (see LowRankLayout.factor_features)
        self.factor_ebc = EmbeddingBagCollection(
            self._layout.factor_configs(), is_weighted or bool(self._layout.packing), device
        )
        self.projection = nn.ParameterDict()
        self.mean = nn.ParameterDict()
        for table in tables:
            if table.name in ranks:
                k, d = ranks[table.name], table.embedding_dim
                self.projection[table.name] = nn.Parameter(torch.eye(k, d, device=device))
                self.mean[table.name] = nn.Parameter(torch.zeros(1, d, device=device))
        self._is_weighted = is_weighted
        # inference path: table name -> ((ptrs, versions), [B; mu]); see _projection_and_mean
        self._fused_cache: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}
        self.register_load_state_dict_pre_hook(_vector_mean_to_row)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The original (uncompressed) table configs."""
        return self._tables

    def is_weighted(self) -> bool:
        return self._is_weighted

    def ranks(self) -> dict[str, int]:
        """Table name -> rank of each compressed table."""
        return dict(self._ranks)

    def layout(self) -> LowRankLayout:
        """The constants of the forward (tables, ranks, feature and output names)."""
        return self._layout

    def check_factors_compressible(self, fqn: str) -> None:
        """Raises naming ``fqn`` when a factor table is stored packed (several factor rows to a
        stored row): such tables cannot be compressed further.

        Example::

            >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
            >>> LowRankEmbeddingBagCollection([cfg], ranks={"t": 2}).check_factors_compressible("ebc")
            Traceback (most recent call last):
            ...
            ValueError: the factor tables ['t'] of 'ebc' are stored packed (ranks not a multiple of 4) and cannot be compressed further; compress with ranks that are multiples of 4 first (e.g. rank=4)
        """
        packed = sorted(self._layout.packing)
        if packed:
            raise ValueError(
                f"the factor tables {packed} of {fqn!r} are stored packed (ranks not a multiple "
                "of 4) and cannot be compressed further; compress with ranks that are multiples "
                "of 4 first (e.g. rank=4)"
            )

    def column_order_keys(self, table: str) -> list[str]:
        """The projection's rows run over the factor columns of ``table``."""
        return [f"projection.{table}"]

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
        # an EBC of factors keeps this class, which TorchRec shards as one unit; any other
        # collection (e.g. product-quantized) is sharded by its own sharder, inside the composite
        cls = (
            LowRankEmbeddingBagCollection
            if type(factor_collection) is EmbeddingBagCollection
            else CompositeLowRankEmbeddingBagCollection
        )
        new = cls(self._tables, self._ranks, self._is_weighted, torch.device("meta"))
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
    def factor_rows(self, name: str) -> torch.Tensor:
        """Table ``name``'s ``(N, k)`` factor rows: a view of ``factor_ebc``'s weight (of its
        first ``N`` rows when packed; the padding of its last stored row is zeroed).

        Example::

            >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=5, feature_names=["f"])
            >>> ebc = LowRankEmbeddingBagCollection([cfg], ranks={"t": 2})
            >>> ebc.factor_rows("t").shape, ebc.factor_ebc.embedding_bags["t"].weight.shape
            (torch.Size([5, 2]), torch.Size([3, 4]))
        """
        weight = self.factor_ebc.embedding_bags[name].weight
        if name not in self._layout.packing:
            return weight
        table = next(t for t in self._tables if t.name == name)
        rows = weight.view(-1, self._ranks[name])
        rows[table.num_embeddings :] = 0.0
        return rows[: table.num_embeddings]

    @torch.no_grad()
    def load_table_(
        self,
        name: str,
        factor_table: torch.Tensor,
        projection: torch.Tensor | None = None,
        mean: torch.Tensor | None = None,
    ) -> None:
        """Copies one table's factors in (``factor_table`` only for an uncompressed table).

        ``mean`` may be given as ``(d,)`` or ``(1, d)``.
        """
        weight = self.factor_ebc.embedding_bags[name].weight
        factor_table = pack_factor_rows(factor_table, self._layout.packing.get(name, 1))
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
            self.mean[name].copy_(mean.reshape(self.mean[name].shape))

    @property
    def _factor_keys_in_order(self) -> bool:
        """Whether ``factor_ebc`` returns its keys in table order (TorchRec's collection does, and
        any that says so with ``keys_in_table_order``, e.g. the PQ one; TorchRec's quantized
        collection groups them by pooling type and a DMP-sharded one by shard, so their outputs
        are regrouped by name)."""
        if type(self.factor_ebc) is EmbeddingBagCollection:
            return True
        return bool(getattr(self.factor_ebc, "keys_in_table_order", False))

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings with the original keys, dims and order.

        Traceable: under ``torch.fx``, TorchScript, ``torch.compile`` and ``torch.export`` it is
        the factor lookup and the projection only (no data-dependent branches); eagerly it also
        refuses VBE inputs and ids outside their tables (naming table, feature and id) and, for
        inference on CPU, takes the fused kernel.

        Args:
            features (KeyedJaggedTensor): the input of the original collection.

        Returns:
            KeyedTensor: like ``EmbeddingBagCollection.forward`` (float32 values).
        """
        if not is_tracing():
            check_fixed_batch(features, type(self).__name__)
            self._id_ranges.check(features)
            if self._fused_applies(features):
                return self._fused_forward(features)
        return self._layout.project(
            self.factor_ebc(self._layout.factor_features(features, self._slot_weights_dtype())),
            self._layout.bag_coefficients(features),
            self.projection,
            self.mean,
            # unsharded collections return keys in table order; DMP-sharded ones need not
            keys_in_order=self._factor_keys_in_order,
        )

    def _slot_weights_dtype(self) -> torch.dtype:
        """The type of the packed slot features' weights: that of the factor tables when they
        are ``nn.EmbeddingBag`` s (which take weights of their rows' type: a bf16 / fp16
        collection), else float32 (fbgemm's quantized kernels, the PQ collection)."""
        if not self._layout.packing or type(self.factor_ebc) is not EmbeddingBagCollection:
            return torch.float32
        bags = self.factor_ebc.embedding_bags
        if not is_tracing():
            dtypes = {name: str(bag.weight.dtype) for name, bag in bags.items()}
            if len(set(dtypes.values())) > 1:
                raise ValueError(
                    f"factor tables stored in different types {dtypes} with packed tables "
                    f"{sorted(self._layout.packing)}: their slot features carry one weight "
                    "type; store every factor table in one type"
                )
        return bags[next(iter(self._layout.packing))].weight.dtype

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
            cached = (key, torch.cat([projection.detach(), mean.detach()]).float())
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
        layout = self._layout
        for table, feature_names in zip(layout.tables, layout.feature_names_by_table, strict=True):
            weight = self.factor_ebc.embedding_bags[table.name].weight
            if table.name in layout.packing:  # row-major packing: a view of the k-dim rows
                weight = weight.view(-1, self._ranks[table.name])
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
            keys=layout.embedding_names,
            length_per_key=layout.length_per_key,
            values=pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1),
        )


class CompositeLowRankEmbeddingBagCollection(LowRankEmbeddingBagCollection):
    """A :class:`LowRankEmbeddingBagCollection` whose factor tables are another compressed
    collection (e.g. a ``PQEmbeddingBagCollection``: AFM x MEC); built by
    :meth:`LowRankEmbeddingBagCollection.with_factor_collection`.

    Same forward and state.  Its own type tells ``DistributedModelParallel`` (which picks
    sharders by exact type) to walk into it and shard ``factor_ebc`` with that collection's own
    sharder, leaving the projection and mean dense; a plain low-rank collection is sharded as
    one unit instead.

    Args:
        tables (list[EmbeddingBagConfig]): as for :class:`LowRankEmbeddingBagCollection`.
        ranks (Mapping[str, int]): as for :class:`LowRankEmbeddingBagCollection`.
        is_weighted (bool): as for :class:`LowRankEmbeddingBagCollection`.
        device (Optional[torch.device]): as for :class:`LowRankEmbeddingBagCollection`.

    Example::

        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
        >>> ebc = LowRankEmbeddingBagCollection([cfg], ranks={"t": 4})
        >>> composite = ebc.with_factor_collection(nn.Identity())
        >>> type(composite).__name__
        'CompositeLowRankEmbeddingBagCollection'
    """


def _vector_mean_to_row(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: object
) -> None:
    """Checkpoints written before the mean became ``(1, d)`` hold it as ``(d,)``."""
    for name in getattr(module, "mean", {}):
        key = f"{prefix}mean.{name}"
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            state_dict[key] = value.unsqueeze(0)


def pack_factor_rows(factors: torch.Tensor, rows_per_row: int) -> torch.Tensor:
    """``(N, k)`` factor rows stored ``rows_per_row`` to a row: ``(ceil(N / p), p k)``, the last
    row zero-padded (row ``i`` is columns ``(i % p) k ..`` of stored row ``i // p``).

    Example::

        >>> pack_factor_rows(torch.arange(6.0).view(3, 2), 2).tolist()
        [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 0.0, 0.0]]
    """
    if rows_per_row == 1:
        return factors
    n, k = factors.shape
    stored = -(-n // rows_per_row)
    padded = factors.new_zeros(stored * rows_per_row, k)
    padded[:n] = factors
    return padded.view(stored, rows_per_row * k)


def unpack_factor_rows(packed: torch.Tensor, rows_per_row: int, num_rows: int) -> torch.Tensor:
    """The inverse of :func:`pack_factor_rows`: the first ``num_rows`` factor rows.

    Example::

        >>> unpack_factor_rows(pack_factor_rows(torch.arange(6.0).view(3, 2), 2), 2, 3).tolist()
        [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    """
    k = packed.shape[1] // rows_per_row
    return packed.reshape(-1, k)[:num_rows]
