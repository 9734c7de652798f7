"""How pooled factors become pooled embeddings: :class:`LowRankLayout`, shared by the unsharded
low-rank collection and its sharded form (which table is compressed to which rank, the factor
collection's features, the mean's exact bag coefficients, the projection of pooled factors)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_compress.methods.lowrank.rank import rows_per_packed_row


@dataclass(eq=False)
class LowRankLayout:
    """How pooled factors become pooled embeddings; shared by the unsharded and sharded modules.

    All fields are Python constants fixed at construction, so :meth:`bag_coefficients` and
    :meth:`project` trace (``torch.fx``, ``torch.export``, ``torch.compile``) without
    data-dependent control flow.

    Args:
        tables (list[EmbeddingBagConfig]): the original table configs (dims d).
        ranks (dict[str, int]): compressed table name -> rank k.
        is_weighted (bool): whether inputs carry per-id weights.

    Example::

        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
        >>> layout = LowRankLayout([cfg], {"t": 4}, is_weighted=False)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 0, 1]))
        >>> layout.bag_coefficients(kjt)[0].tolist()
        [[2.0], [0.0], [1.0]]
    """

    tables: list[EmbeddingBagConfig]
    ranks: dict[str, int]
    is_weighted: bool
    factor_dims: list[int] = field(init=False)
    feature_names_by_table: list[list[str]] = field(init=False)
    embedding_names: list[str] = field(init=False)
    length_per_key: list[int] = field(init=False)
    runs: list[_Run] = field(init=False)
    packing: dict[str, int] = field(init=False)
    factor_sources: list[list[tuple[str, int, int]]] = field(init=False)
    _plain_features: list[tuple[str, bool]] = field(init=False)

    def __post_init__(self) -> None:
        self.factor_dims = [self.ranks.get(t.name, t.embedding_dim) for t in self.tables]
        # the EBC fills in feature_names=[table name] where empty; so does this
        self.feature_names_by_table = [list(t.feature_names) or [t.name] for t in self.tables]
        configs = [copy.copy(t) for t in self.tables]
        for config, names in zip(configs, self.feature_names_by_table, strict=True):
            config.feature_names = names
        self.embedding_names = [n for names in get_embedding_names_by_table(configs) for n in names]
        self.length_per_key = [
            t.embedding_dim
            for t, names in zip(self.tables, self.feature_names_by_table, strict=True)
            for _ in names
        ]
        self.runs = _runs(self)
        # table -> factor rows per stored row, for ranks that are not a multiple of 4
        self.packing = {
            name: p for name, k in self.ranks.items() if (p := rows_per_packed_row(k)) > 1
        }
        self.factor_sources = self._factor_sources()
        # features read by unpacked tables (in table order, once), with whether that table
        # pools by MEAN: passed on as they are, MEAN ones weighted by 1 / L
        plain: dict[str, bool] = {}
        for t, names in zip(self.tables, self.feature_names_by_table, strict=True):
            for f in names if t.name not in self.packing else []:
                mean = t.pooling == PoolingType.MEAN
                if plain.setdefault(f, mean) != mean and self.packing:
                    raise ValueError(
                        f"feature {f!r} is read by a SUM- and a MEAN-pooled table of a "
                        f"collection with packed tables {sorted(self.packing)}; choose ranks "
                        "that are multiples of 4"
                    )
        self._plain_features = list(plain.items())

    def slot_feature(self, table: str, feature: str, slot: int) -> str:
        """The factor collection's feature for ids of ``feature`` in ``slot`` of a packed table."""
        return f"{feature}__{table}__slot{slot}"

    def factor_configs(self) -> list[EmbeddingBagConfig]:
        """The factor collection's tables: k-dim (kept tables d-dim); a packed table holds
        ``p`` factor rows per row (``ceil(N / p)`` rows of width ``p k``) and reads one slot
        feature per original feature and slot."""
        factors = []
        for table, names, k in zip(
            self.tables, self.feature_names_by_table, self.factor_dims, strict=True
        ):
            factor = copy.deepcopy(table)
            factor.embedding_dim = k
            if self.packing:
                factor.pooling = PoolingType.SUM  # MEAN: ids weigh 1 / L (factor_features)
            p = self.packing.get(table.name, 1)
            if p > 1:
                factor.num_embeddings = -(-table.num_embeddings // p)
                factor.embedding_dim = p * k
                factor.feature_names = [
                    self.slot_feature(table.name, f, s) for f in names for s in range(p)
                ]
            factors.append(factor)
        return factors

    def _factor_sources(self) -> list[list[tuple[str, int, int]]]:
        """Per output embedding (in order), the factor outputs ``(name, start, stop)`` whose
        columns sum to its pooled factors: one for a plain table, one per slot when packed."""
        sources = []
        factor_names = get_embedding_names_by_table(self.factor_configs())
        for table, names, k in zip(self.tables, factor_names, self.factor_dims, strict=True):
            p = self.packing.get(table.name, 1)
            for first in range(0, len(names), p):
                sources.append([(names[first + s], s * k, (s + 1) * k) for s in range(p)])
        return sources

    def factor_features(
        self, features: KeyedJaggedTensor, weights_dtype: torch.dtype = torch.float32
    ) -> KeyedJaggedTensor:
        """The factor collection's input: ``features`` itself, or with packed tables, per packed
        table and feature ``p`` slot features: every id ``i`` becomes stored row ``i // p`` with
        weight ``w_i [i % p == s]`` in slot ``s``.  The factor tables of a packed collection all
        pool by SUM; a MEAN table's ids weigh ``w_i / L`` instead (static shapes: traceable).
        The weights are computed in float32 and given as ``weights_dtype`` (an unsharded
        ``nn.EmbeddingBag`` takes them in its rows' type; fbgemm's kernels take float32)."""
        if not self.packing:
            return features
        by_feature = features.to_dict()
        keys: list[str] = []
        values: list[torch.Tensor] = []
        lengths: list[torch.Tensor] = []
        weights: list[torch.Tensor] = []
        for name, mean in self._plain_features:  # constants: traceable
            bags = by_feature[name]
            keys.append(name)
            values.append(bags.values())
            lengths.append(bags.lengths())
            weights.append(self._weights(bags, mean))
        for table, names in zip(self.tables, self.feature_names_by_table, strict=True):
            p = self.packing.get(table.name, 1)
            for name in names if p > 1 else []:
                bags = by_feature[name]
                ids = bags.values()
                w = self._weights(bags, table.pooling == PoolingType.MEAN)
                for slot in range(p):
                    keys.append(self.slot_feature(table.name, name, slot))
                    values.append(torch.div(ids, p, rounding_mode="floor"))
                    lengths.append(bags.lengths())
                    weights.append(w * (ids % p == slot).to(w.dtype))
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.cat(values),
            lengths=torch.cat(lengths),
            weights=torch.cat(weights).to(weights_dtype),
        )

    def _weights(self, bags: JaggedTensor, mean: bool) -> torch.Tensor:
        """Per-id weights of one feature for a SUM-pooled factor table: ``w_i`` (1 unweighted),
        divided by the bag length for a MEAN table (fbgemm's weighted MEAN divides by ``L``)."""
        ids = bags.values()
        if self.is_weighted:
            weights = bags.weights().float()
        else:
            weights = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
        if not mean:
            return weights
        lengths = bags.lengths()
        per_bag = lengths.clamp(min=1).float().reciprocal()
        return weights * torch.repeat_interleave(per_bag, lengths, output_size=ids.numel())

    def bag_coefficients(self, features: KeyedJaggedTensor) -> list[torch.Tensor]:
        """Per compressed table, the coefficient of mu for every bag: ``(B, F_t)`` float32.

        SUM: ``sum_S w_i`` (the bag length when unweighted); MEAN: that divided by the bag
        length (0 for an empty bag).
        """
        by_feature = features.to_dict()
        coefficients: list[torch.Tensor] = []
        for table, names in zip(self.tables, self.feature_names_by_table, strict=True):
            if table.name not in self.ranks:
                continue
            per_feature = []
            for name in names:
                bags = by_feature[name]
                lengths = bags.lengths()
                if self.is_weighted:
                    total = torch.segment_reduce(bags.weights(), "sum", lengths=lengths).float()
                else:
                    total = lengths.float()
                if table.pooling == PoolingType.MEAN:
                    total = total / lengths.clamp(min=1)
                per_feature.append(total)
            coefficients.append(torch.stack(per_feature, dim=1))
        return coefficients

    def project(
        self,
        factors: KeyedTensor,
        coefficients: list[torch.Tensor],
        projection: nn.ParameterDict,
        mean: nn.ParameterDict,
        keys_in_order: bool = True,
    ) -> KeyedTensor:
        """Pooled embeddings from pooled factors: ``[A | coef] @ [B; mu]`` per feature.

        Consecutive compressed tables of equal rank and dimension form one run (all of them,
        with one global rank): every feature of a run is projected by a single batched GEMM,
        ``(F, B, k + 1) @ (F, k + 1, d)``, so the number of ops does not grow with the number
        of tables.  Adding ``coef x mu`` inside the GEMM writes each output once.

        Args:
            factors (KeyedTensor): pooled factors, one key per embedding name (any key order).
            coefficients (list[torch.Tensor]): :meth:`bag_coefficients` of the same batch.
            projection (nn.ParameterDict): table name -> B ``(k, d)``.
            mean (nn.ParameterDict): table name -> mu ``(1, d)``.
            keys_in_order (bool): whether ``factors`` has its keys in table order (an unsharded
                collection); ``False`` (a sharded one, keys grouped by shard) regroups them.
                A Python constant: traced code cannot compare the keys of a traced value.

        Returns:
            KeyedTensor: float32 like ``EmbeddingBagCollection``'s, keys in table order.
        """
        if keys_in_order and not self.packing:
            values = factors.values()
        else:
            by_name = factors.to_dict()
            values = torch.cat(
                [self._pooled_factors(by_name, sources) for sources in self.factor_sources],
                dim=1,
            )
        pooled: list[torch.Tensor] = []
        for run in self.runs:
            block = values[:, run.start : run.stop]
            if run.rank is None:
                pooled.append(block.float())
                continue
            num_features = len(run.feature_tables)
            coef = torch.cat([coefficients[i] for i in run.coefficients], dim=1)
            # (F, B, k + 1): features first, so one bmm covers them all
            factors_and_coef = torch.cat(
                [block.reshape(-1, num_features, run.rank).float(), coef.unsqueeze(2)], dim=2
            ).transpose(0, 1)
            # (F, k + 1, d): a table read by several features repeats its [B; mu]
            projection_and_mean = torch.cat(
                [
                    torch.stack([projection[name] for name in run.feature_tables]),
                    torch.stack([mean[name] for name in run.feature_tables]),
                ],
                dim=1,
            ).float()
            out = torch.bmm(factors_and_coef, projection_and_mean)  # (F, B, d)
            pooled.append(out.transpose(0, 1).reshape(-1, num_features * run.dim))
        return KeyedTensor(
            keys=self.embedding_names,
            length_per_key=self.length_per_key,
            # a single run's output is returned as is, not copied by a one-element cat
            values=pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1),
        )

    @staticmethod
    def _pooled_factors(
        by_name: dict[str, torch.Tensor], sources: list[tuple[str, int, int]]
    ) -> torch.Tensor:
        parts = [by_name[name][:, start:stop] for name, start, stop in sources]
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


@dataclass
class _Run:
    """Consecutive tables projected together: ``rank`` None for uncompressed tables (passed
    through), else compressed tables of rank ``rank`` and dimension ``dim``; columns
    ``[start, stop)`` of the pooled factors; one table name per feature; indices into
    :meth:`LowRankLayout.bag_coefficients`."""

    rank: int | None
    dim: int
    start: int
    stop: int
    feature_tables: list[str]
    coefficients: list[int]


def _runs(layout: LowRankLayout) -> list[_Run]:
    runs: list[_Run] = []
    start, compressed = 0, 0
    for table, names, k in zip(
        layout.tables, layout.feature_names_by_table, layout.factor_dims, strict=True
    ):
        rank = k if table.name in layout.ranks else None
        stop = start + k * len(names)
        last = runs[-1] if runs else None
        if last is None or last.rank != rank or last.dim != table.embedding_dim:
            last = _Run(rank, table.embedding_dim, start, start, [], [])
            runs.append(last)
        last.stop = stop
        last.feature_tables += [table.name] * len(names)
        if rank is not None:
            last.coefficients.append(compressed)
            compressed += 1
        start = stop
    return runs
