"""What a user would do instead of compressing: a DLRM trained small from scratch, at equal bytes.

Two baselines (issue 16), each sized so that its tables hold exactly a given number of bytes:

- **hash** (the hashing trick): feature ``f``'s ids are folded into ``h_f < n_f`` rows,
  ``id mod h_f``, so several ids share a row.  The ids are already dense indices ``0 .. n_f - 1``,
  so the modulo gives every row ``floor(n_f / h_f)`` or ``ceil(n_f / h_f)`` ids: the fewest
  collisions any hash can give (a random hash of 4,082 ids into 3,185 rows leaves 72 % of the
  ids sharing a row; the modulo, 44 %).
- **qr** (quotient-remainder compositional embeddings): feature ``f`` gets two tables, one looked
  up with ``id // m`` (``ceil(n_f / m)`` rows) and one with ``id mod r`` (``r >= m`` rows); the two
  pooled vectors are multiplied (``combine="mult"``, the default: 0.007-0.016 test AUC above
  ``"sum"`` on Frappe d=16, BENCHMARKS) or added (``"sum"``).  Since ``r >= m``, two
  ids share both rows only if they are equal: every id has its own ``(q, r)`` pair.

Both are standard TorchRec ``EmbeddingBagCollection`` tables behind :class:`SmallEmbeddingBags`,
a module that rewrites the batch's ``KeyedJaggedTensor`` (hashed ids; or two features ``f@q``,
``f@r`` per split feature) before its inner EBC and gives DLRM the pooled vectors of the original
features: DMP shards the inner EBC natively, and the model trains with the existing loop.

The byte budget caps every table at one number of rows (the hashing trick's usual "max rows per
table": tables below the cap stay whole; none gets fewer than the method's minimum, 1 row for
hash, ``min_m ceil(n/m) + m`` for QR), then the last rows go to the largest capped tables, so that
the tables' fp32 bytes are ``budget // (4 d)`` rows exactly (within one row's bytes of the budget).

Example::

    >>> plans = plan_tables("qr", [1000, 100], 4 * 8 * 300, 8)  # 300 rows of d=8
    >>> [(p.kind, p.table_rows, p.collisions) for p in plans]
    [('qr', (167, 33), 6), ('full', (100,), 1)]
    >>> sum(p.stored_rows for p in plans) * 8 * 4
    9600
"""

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.models.dlrm import DLRMTrain

from examples.dlrm.model import ModelConfig, build_model
from examples.dlrm.train import (
    CheckpointPolicy,
    FitResult,
    TrainConfig,
    attach_sparse_optimizer,
    build_optimizer,
    fit,
)
from torchrec_compress.data import CTRDataset, CTRSchema
from torchrec_compress.distributed.planning import shard_model

KINDS = ("hash", "qr")
COMBINES = ("mult", "sum")


@dataclass(frozen=True)
class FeaturePlan:
    """How one feature's ids reach its table(s).

    Args:
        feature: the feature's name in the batch.
        num_ids: ids ``0 .. num_ids - 1`` (the schema's rows).
        kind: ``"full"`` (one row per id), ``"hash"`` or ``"qr"``.
        table_rows: ``(num_ids,)``, ``(hashed rows,)`` or ``(quotient rows, remainder rows)``.
        collisions: QR's ``m``: ids per quotient row (1 otherwise).
    """

    feature: str
    num_ids: int
    kind: str
    table_rows: tuple[int, ...]
    collisions: int = 1

    @property
    def stored_rows(self) -> int:
        return sum(self.table_rows)


def qr_min_rows(n: int) -> int:
    """Fewest rows a QR split of ``n`` ids can have: ``min over m >= 2 of ceil(n/m) + m``, or
    ``n`` where that is not smaller (a tiny table stays whole)."""
    m = max(2, math.isqrt(n))
    best = min(-(-n // k) + k for k in range(max(2, m - 1), m + 2))
    return min(n, best)


def qr_split(n: int, rows: int) -> tuple[int, int, int]:
    """``(m, quotient rows, remainder rows)`` of ``n`` ids in exactly ``rows`` rows: the smallest
    ``m >= 2`` whose quotient table ``ceil(n/m)`` leaves at least ``m`` remainder rows.

    Raises:
        ValueError: ``rows`` is below :func:`qr_min_rows` or not below ``n``.
    """
    if not qr_min_rows(n) <= rows < n:
        raise ValueError(f"a QR split of {n} ids needs {qr_min_rows(n)}..{n - 1} rows, got {rows}")
    m = 2
    while -(-n // m) + m > rows:
        m += 1
    quotient = -(-n // m)
    return m, quotient, rows - quotient


def allocate_rows(sizes: Sequence[int], minimum: Sequence[int], total: int) -> list[int]:
    """Rows per table, ``minimum[t] <= rows[t] <= sizes[t]``, summing to ``total``: every table
    capped at one common number of rows (the hashing trick's "max rows per table": small tables
    stay whole), the largest cap that fits, then one more row for the largest capped tables
    until the sum is ``total``.

    Raises:
        ValueError: ``total`` is below the minimums' sum or above the sizes' sum.

    Example::

        >>> allocate_rows([1000, 300, 10], [1, 1, 1], 500)
        [245, 245, 10]
    """
    low, high = sum(minimum), sum(sizes)
    if not low <= total <= high:
        raise ValueError(f"{total} rows is out of reach: between {low} and {high} rows")

    def rows_at(cap: int) -> list[int]:
        return [min(n, max(lo, cap)) for n, lo in zip(sizes, minimum, strict=True)]

    lo_cap, hi_cap = 0, max(sizes)  # sum(rows_at(lo_cap)) <= total < sum(rows_at(hi_cap + 1))
    while lo_cap < hi_cap:
        mid = (lo_cap + hi_cap + 1) // 2
        lo_cap, hi_cap = (mid, hi_cap) if sum(rows_at(mid)) <= total else (lo_cap, mid - 1)
    rows = rows_at(lo_cap)
    for t in sorted(range(len(sizes)), key=lambda t: -sizes[t]):
        if sum(rows) < total and rows[t] < sizes[t] and rows[t] == lo_cap:
            rows[t] += 1
    return rows


def plan_tables(kind: str, sizes: Sequence[int], budget_bytes: int, dim: int) -> list[FeaturePlan]:
    """Per-feature plans of baseline ``kind`` whose fp32 tables hold ``budget_bytes // (4 dim)``
    rows exactly (features named ``f0, f1, ...``; :func:`plan_schema` names them)."""
    if kind not in KINDS:
        raise ValueError(f"unknown baseline {kind!r}; choose from {KINDS}")
    total = budget_bytes // (4 * dim)
    minimum = [1] * len(sizes) if kind == "hash" else [qr_min_rows(n) for n in sizes]
    try:
        rows = allocate_rows(sizes, minimum, total)
    except ValueError as e:
        raise ValueError(
            f"{kind} baseline of {budget_bytes} bytes at d={dim}: {e} of {4 * dim} bytes "
            f"(smallest reachable: {sum(minimum) * 4 * dim} bytes)"
        ) from None
    plans = []
    for t, (n, r) in enumerate(zip(sizes, rows, strict=True)):
        if r >= n:
            plans.append(FeaturePlan(f"f{t}", n, "full", (n,)))
        elif kind == "hash":
            plans.append(FeaturePlan(f"f{t}", n, "hash", (r,)))
        else:
            m, quotient, remainder = qr_split(n, r)
            plans.append(FeaturePlan(f"f{t}", n, "qr", (quotient, remainder), m))
    return plans


def plan_schema(kind: str, schema: CTRSchema, budget_bytes: int, dim: int) -> list[FeaturePlan]:
    """:func:`plan_tables` for the features of ``schema``."""
    plans = plan_tables(kind, schema.num_embeddings, budget_bytes, dim)
    return [
        FeaturePlan(f, p.num_ids, p.kind, p.table_rows, p.collisions)
        for f, p in zip(schema.sparse_features, plans, strict=True)
    ]


def hash_ids(ids: torch.Tensor, rows: int) -> torch.Tensor:
    """The hashing trick's row of each (dense) id: ``id mod rows``, balanced loads."""
    return ids % rows


def _table_configs(plans: Sequence[FeaturePlan], dim: int) -> list[EmbeddingBagConfig]:
    configs = []
    for p in plans:
        names = [p.feature] if p.kind != "qr" else [f"{p.feature}@q", f"{p.feature}@r"]
        for name, rows in zip(names, p.table_rows, strict=True):
            table = "t_" + name.replace("@", "_")
            configs.append(EmbeddingBagConfig(name=table, embedding_dim=dim,
                                              num_embeddings=rows, feature_names=[name]))  # fmt: skip
    return configs


class SmallEmbeddingBags(nn.Module):
    """The tables of a hash or QR baseline, seen from outside as an EBC of the original features.

    ``forward(features)`` rewrites the batch's ids as the plans say, looks them up in the inner
    ``ebc`` (a plain ``EmbeddingBagCollection``: DMP shards it) and returns a ``KeyedTensor``
    keyed by the original features (QR: the two pooled vectors multiplied or added).
    ``embedding_bag_configs()`` describes the original features (what DLRM's ``SparseArch``
    reads); the stored tables are ``ebc.embedding_bag_configs()``.
    """

    def __init__(
        self,
        plans: Sequence[FeaturePlan],
        dim: int,
        combine: str = "mult",
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        self.plans, self.combine = list(plans), combine
        self.ebc = EmbeddingBagCollection(tables=_table_configs(plans, dim), device=device)
        self._outer = [
            EmbeddingBagConfig(name=f"t_{p.feature}", embedding_dim=dim,
                               num_embeddings=p.num_ids, feature_names=[p.feature])
            for p in plans
        ]  # fmt: skip

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._outer

    def transform(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The inner EBC's batch: hashed ids, or ``f@q = id // m`` and ``f@r = id mod r``."""
        if features.weights_or_none() is not None:
            raise ValueError("hash / QR baselines take unweighted features")
        by_name = features.to_dict()
        keys: list[str] = []
        values: list[torch.Tensor] = []
        lengths: list[torch.Tensor] = []
        for p in self.plans:
            ids, lens = by_name[p.feature].values(), by_name[p.feature].lengths()
            if p.kind == "qr":
                keys += [f"{p.feature}@q", f"{p.feature}@r"]
                values += [ids // p.collisions, ids % p.table_rows[1]]
                lengths += [lens, lens]
                continue
            keys.append(p.feature)
            values.append(hash_ids(ids, p.table_rows[0]) if p.kind == "hash" else ids)
            lengths.append(lens)
        return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.ebc(self.transform(features)).to_dict()
        out = []
        for p in self.plans:
            if p.kind != "qr":
                out.append(pooled[p.feature])
                continue
            q, r = pooled[f"{p.feature}@q"], pooled[f"{p.feature}@r"]
            out.append(q + r if self.combine == "sum" else q * r)
        return KeyedTensor.from_tensor_list([p.feature for p in self.plans], out)


def build_small_model(
    schema: CTRSchema,
    config: ModelConfig,
    plans: Sequence[FeaturePlan],
    device: torch.device,
    combine: str = "mult",
) -> DLRMTrain:
    """The DLRM of ``config`` whose tables are :class:`SmallEmbeddingBags` of ``plans``."""
    if config.arch == "dense_only":
        raise ValueError("a dense-only model has no tables to make small")
    model = build_model(schema, config, torch.device("meta"))  # dense layers: on the CPU
    small = SmallEmbeddingBags(plans, config.embedding_dim, combine, device)
    model.model.sparse_arch.embedding_bag_collection = small  # type: ignore[union-attr,assignment]
    return model


def stored_bytes(plans: Sequence[FeaturePlan], dim: int) -> int:
    """fp32 bytes of the plans' tables."""
    return sum(p.stored_rows for p in plans) * dim * 4


def train_small(
    kind: str,
    budget_bytes: int,
    data: CTRDataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    args: argparse.Namespace,
    device: torch.device,
    work_dir: str,
) -> tuple[DistributedModelParallel, list[FeaturePlan], FitResult]:
    """A hash or QR DLRM of ``budget_bytes`` of tables, sharded by DMP and trained from scratch
    like the baseline (``train_config``: its epochs, optimizers, early stopping; seed
    ``args.seed``; ``args.qr_combine``, ``args.sharding_type``); checkpoints under ``work_dir``."""
    plans = plan_schema(kind, data.schema, budget_bytes, model_config.embedding_dim)
    torch.manual_seed(args.seed)
    model = build_small_model(
        data.schema, model_config, plans, torch.device("meta"), args.qr_combine
    )
    attach_sparse_optimizer(model, train_config)
    sharded = shard_model(model, device, sharding_type=args.sharding_type)
    metadata = {"baseline": kind, "budget_bytes": budget_bytes, "seed": args.seed}
    fitted = fit(
        sharded,
        build_optimizer(sharded, train_config),
        data,
        train_config,
        CheckpointPolicy(os.path.join(work_dir, "train"), keep=0),
        metadata,
    )
    return sharded, plans, fitted
