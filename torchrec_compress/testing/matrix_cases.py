"""The cases of the differential test matrix (:mod:`torchrec_compress.testing.matrix`): what is
varied, and the seeded generator of :class:`Case` s.

Example::

    >>> cases = generate_cases(seed=0, count=3)
    >>> len(cases), cases[0] == generate_cases(seed=0, count=3)[0]
    (3, True)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType

import torchrec_compress

FORWARD_TOL = 1e-5
TRAIN_TOL = 1e-4
STEPS = 3
NUM_DENSE = 6
MODELS = ("sparsenn", "dlrm", "dcn", "projection", "deepfm")
METHODS = ("none", "afm", "afm_k2", "svd", "mec", "pq", "int8", "afm+int8", "afm+mec")
PLANS = (
    "planner",
    "table_wise",
    "row_wise",
    "column_wise",
    "table_row_wise",
    "data_parallel",
    "mixed",
)
ROUTES = ("compress_then_shard", "shard_then_compress")
RECIPES = ("adagrad", "rowwise_adagrad", "sgd", "tables_sgd")
# data-parallel tables train with the dense optimizer in TorchRec (in-backward optimizers on
# them are refused): "dense" attaches none, for plans that make every table data-parallel
DENSE = "dense"
CPU, META = torch.device("cpu"), torch.device("meta")
PACKAGE_DIR = str(Path(torchrec_compress.__file__).resolve().parent)


@dataclass(frozen=True)
class TableSpec:
    """One table of a case.

    Args:
        name (str): table name.
        rows (int): number of rows.
        dim (int): embedding dimension.
        pooling (str): ``"SUM"`` or ``"MEAN"``.
        features (tuple[str, ...]): the features it reads (a feature may feed several tables).
        kind (str): ``"plain"``, ``"weighted"`` (``idscore`` features) or ``"position"``
            (position-weighted, in a ``FeatureProcessedEmbeddingBagCollection``).
    """

    name: str
    rows: int
    dim: int
    pooling: str
    features: tuple[str, ...]
    kind: str = "plain"

    def config(self) -> EmbeddingBagConfig:
        return EmbeddingBagConfig(
            name=self.name,
            embedding_dim=self.dim,
            num_embeddings=self.rows,
            feature_names=list(self.features),
            pooling=PoolingType[self.pooling],
        )


@dataclass(frozen=True)
class Case:
    """One configuration of the matrix (see the module docstring).

    Args:
        seed (int): seeds weights, batches and compression.
        model (str): one of :data:`MODELS`.
        tables (tuple[TableSpec, ...]): the tables.
        method (str): one of :data:`METHODS`.
        plan (str): one of :data:`PLANS`.
        world_size (int): number of processes.
        route (str): one of :data:`ROUTES`.
        recipe (str): one of :data:`RECIPES`.
        mixed (tuple[str, ...]): for ``plan="mixed"``, the sharding type of each table.
        batch_size (int): rows per process and step.
    """

    seed: int
    model: str
    tables: tuple[TableSpec, ...]
    method: str
    plan: str
    world_size: int
    route: str = "compress_then_shard"
    recipe: str = "sgd"
    mixed: tuple[str, ...] = ()
    batch_size: int = 6

    @property
    def name(self) -> str:
        tables = ",".join(
            f"{t.rows}x{t.dim}{t.pooling[0]}{'' if t.kind == 'plain' else t.kind[0]}"
            f"{'s' if self.shared(t) else ''}"
            for t in self.tables
        )
        plan = self.plan if self.plan != "mixed" else "mixed(" + ",".join(self.mixed) + ")"
        return (
            f"s{self.seed}-{self.model}[{tables}]-{self.method}-{plan}-w{self.world_size}-"
            f"{self.route}-{self.recipe}"
        )

    def shared(self, table: TableSpec) -> bool:
        return any(
            other is not table and set(other.features) & set(table.features)
            for other in self.tables
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Case:
        tables = tuple(TableSpec(**{**t, "features": tuple(t["features"])}) for t in data["tables"])
        return cls(**{**data, "tables": tables, "mixed": tuple(data.get("mixed", ()))})


@dataclass
class Outcome:
    """What :func:`run_case` found for one case on one process.

    Args:
        case (str): the case's name.
        status (str): ``"pass"``, ``"refuse"`` or ``"fail"``.
        detail (str): the error message, or which comparison failed.
        errors (dict[str, float]): the largest difference of each comparison.
        sharding (list[str]): the sharding types of the plan(s) the sharded model ran on.
    """

    case: str
    status: str
    detail: str = ""
    errors: dict[str, float] = field(default_factory=dict)
    sharding: list[str] = field(default_factory=list)


# --- generating cases -------------------------------------------------------------------


def _tables(rng: random.Random, model: str) -> tuple[TableSpec, ...]:
    count = rng.randint(2, 4)
    same_dim = rng.choice((8, 16))
    specs: list[TableSpec] = []
    for i in range(count):
        rows = rng.choice((rng.randint(5, 40), rng.randint(100, 400), rng.randint(2000, 5000)))
        dim = same_dim if model != "sparsenn" else rng.choice((8, 16))
        pooling = rng.choice(("SUM", "MEAN"))
        kind = "plain"
        if model == "sparsenn" and i > 0:
            kind = rng.choice(("plain", "plain", "weighted", "position"))
        if kind != "plain":
            pooling = "SUM"  # unsharded TorchRec pools weighted bags by SUM only
        specs.append(TableSpec(f"t{i}", rows, dim, pooling, (f"f{i}",), kind))
    plain = [i for i, t in enumerate(specs) if t.kind == "plain"]
    if model == "sparsenn" and len(plain) >= 2 and rng.random() < 0.4:
        # one feature feeds two tables (TorchRec's TestSparseNN layout); ids fit both
        a, b = plain[:2]
        rows = min(specs[a].rows, specs[b].rows)
        specs[a] = replace(specs[a], rows=rows)
        specs[b] = replace(specs[b], rows=rows, features=specs[a].features)
    return tuple(specs)


def generate_cases(
    seed: int,
    count: int,
    models: Sequence[str] = MODELS,
    methods: Sequence[str] = METHODS,
    plans: Sequence[str] = PLANS,
    world_sizes: Sequence[int] = (1, 2),
) -> list[Case]:
    """``count`` seeded random cases drawn over the given axes (same seed, same cases).

    Example::

        >>> [c.world_size in (1, 2) for c in generate_cases(seed=1, count=2)]
        [True, True]
    """
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        model = rng.choice(list(models))
        tables = _tables(rng, model)
        plan = rng.choice(list(plans))
        mixed: tuple[str, ...] = ()
        if plan == "mixed":
            mixed = tuple(
                rng.choice(("table_wise", "row_wise", "column_wise", "data_parallel"))
                for _ in tables
            )
        cases.append(
            Case(
                seed=seed * 100_000 + i,
                model=model,
                tables=tables,
                method=rng.choice(list(methods)),
                plan=plan,
                world_size=rng.choice(list(world_sizes)),
                route=rng.choice(ROUTES),
                recipe=rng.choice(
                    [*RECIPES, DENSE, DENSE, DENSE] if plan == "data_parallel" else list(RECIPES)
                ),
                mixed=mixed,
                batch_size=rng.choice((4, 6, 8)),
            )
        )
    return cases
