"""TorchRec's own sharding test harness, driven over compressed models.

TorchRec checks its sharders with ``sharding_single_rank_test`` (``torchrec.distributed.
test_utils.test_sharding``): a ``TestSparseNN`` built twice from the same seed, one copy unsharded
and one sharded under the planner's plan for the given constraints, one SGD step on the global
batch and on each process's part of it, then the predictions compared.  Here the model class is a
``TestSparseNN`` that compresses its collections when it is built (the same layout for the unsharded
copy and the ``meta`` copy TorchRec shards; TorchRec copies the unsharded weights into the shards),
and the sharders are ``torchrec_compress.sharders(model)`` with TorchRec's fused SGD, so TorchRec's
own comparison judges this package's sharded modules.  ``benchmarks/torchrec_harness.py`` runs the
grid; ``tests/distributed/test_matrix.py`` a few of its cases.

Example::

    >>> from torchrec_compress.testing.torchrec_harness import harness_cases
    >>> len(harness_cases()) > 10
    True
"""

from __future__ import annotations

import importlib
import itertools
import sys
import traceback
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingBagConfig
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.test_utils.test_model import ModelInput, TestSparseNN
from torchrec.modules.embedding_configs import PoolingType
from torchrec.types import DataType

import torchrec_compress
from torchrec_compress import AFMConfig, MECConfig, MECTraining, PQConfig, SVDConfig
from torchrec_compress.distributed.planning import plan_model
from torchrec_compress.layout import compression_layout, restore_layout_
from torchrec_compress.testing.matrix import _is_refusal


def _import_test_sharding() -> Any:
    """TorchRec's ``test_sharding`` module.  The torchrec wheel does not ship
    ``torchrec.distributed.tests``, from which it imports one sharder for its 2-D parallel path
    (not taken here): that module is stood in for by one whose sharder raises if used."""
    name = "torchrec.distributed.tests.test_sequence_model"
    if name not in sys.modules:
        try:
            importlib.import_module(name)
        except ImportError:
            stand_in = types.ModuleType(name)

            class TestEmbeddingCollectionSharder:  # noqa: D101 - a stand-in
                def __init__(self, *args: Any, **kwargs: Any) -> None:
                    raise NotImplementedError(f"{name} is not installed (2-D parallel tests)")

            stand_in.TestEmbeddingCollectionSharder = TestEmbeddingCollectionSharder  # type: ignore[attr-defined]
            sys.modules[name] = stand_in
    return importlib.import_module("torchrec.distributed.test_utils.test_sharding")


SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
METHODS = ("none", "afm", "svd", "pq", "mec")
LEARNING_RATE = 0.1


def _configs(method: str) -> list[Any]:
    configs: dict[str, list[Any]] = {
        "none": [],
        "afm": [AFMConfig(rank=4)],
        "svd": [SVDConfig(rank=4)],
        "pq": [PQConfig(num_subspaces=2, num_centroids=8)],
        "mec": [MECConfig(num_subspaces=2, num_centroids=8, training=MECTraining(steps=5))],
    }
    return configs[method]


def _forward(model: nn.Module, batch: ModelInput) -> Any:
    return model(batch)


class CompressedTestSparseNN(TestSparseNN):
    """``TestSparseNN`` compressed with ``METHOD`` when built (subclasses set it).

    A copy on a real device is compressed with calibration data drawn from its tables (seeded);
    a copy whose collections are on ``meta`` (the one TorchRec shards) gets the same compressed
    modules, empty, from a compressed twin's layout.
    """

    METHOD = "none"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        configs = _configs(self.METHOD)
        if not configs:
            return
        if kwargs.get("sparse_device") == torch.device("meta"):
            twin = type(self)(*args, **{**kwargs, "sparse_device": None})
            restore_layout_(self, compression_layout(twin, configs))
            return
        tables = kwargs["tables"]
        weighted = kwargs.get("weighted_tables") or []
        calibration = [
            ModelInput.generate(
                batch_size=8,
                world_size=1,
                num_float_features=kwargs.get("num_float_features", 10),  # TestSparseNN's default
                tables=tables,
                weighted_tables=weighted,
                random_seed=100 + i,
            )[0]
            for i in range(2)
        ]
        for config in configs:
            torchrec_compress.compress_(self, config, calibration=calibration, forward_fn=_forward)


_MODEL_CLASSES: dict[str, type[CompressedTestSparseNN]] = {
    m: type(f"CompressedTestSparseNN_{m}", (CompressedTestSparseNN,), {"METHOD": m})
    for m in METHODS
}
# picklable by name for spawned processes
for _cls in _MODEL_CLASSES.values():
    globals()[_cls.__name__] = _cls


@dataclass(frozen=True)
class HarnessCase:
    """One run of TorchRec's harness: a method, a sharding type and a pooling mix."""

    method: str
    sharding_type: str
    pooling: str  # "SUM", "MEAN" or "MIXED" (SUM beside MEAN, which TorchRec's tables never mix)
    shared: bool  # one feature read by two tables (TorchRec's standard layout)

    @property
    def name(self) -> str:
        return (
            f"{self.method}-{self.sharding_type}-{self.pooling}{'-shared' if self.shared else ''}"
        )


def harness_cases() -> list[HarnessCase]:
    """The grid: every method x sharding type x pooling mix x shared feature or not."""
    return [
        HarnessCase(m, s, p, shared)
        for m, s, p, shared in itertools.product(
            METHODS, SHARDING_TYPES, ("SUM", "MEAN", "MIXED"), (False, True)
        )
    ]


def _tables(case: HarnessCase) -> tuple[list[EmbeddingBagConfig], dict[str, list[str]]]:
    poolings = {
        "SUM": [PoolingType.SUM] * 3,
        "MEAN": [PoolingType.MEAN] * 3,
        "MIXED": [PoolingType.MEAN, PoolingType.SUM, PoolingType.MEAN],
    }[case.pooling]
    features = [["feature_0"], ["feature_0" if case.shared else "feature_1"], ["feature_2"]]
    tables = [
        EmbeddingBagConfig(
            num_embeddings=200 if not case.shared or i > 1 else 100,
            embedding_dim=16,
            name=f"table_{i}",
            feature_names=features[i],
            pooling=poolings[i],
            data_type=DataType.FP32,
        )
        for i in range(3)
    ]
    names = [
        f"{f}@{t.name}" if case.shared and f == "feature_0" else f
        for t in tables
        for f in t.feature_names
    ]
    return tables, {"group_0": names}


def run_harness_case(case: HarnessCase) -> tuple[str, str]:
    """``(status, detail)`` of one case on this process: ``pass``, ``refuse`` (this package
    raised ``ValueError`` / ``NotImplementedError``, or TorchRec's planner refused the forced
    plan) or ``fail``."""
    tables, groups = _tables(case)
    model_class = _MODEL_CLASSES[case.method]
    probe = model_class(
        tables=tables, weighted_tables=[], embedding_groups=groups, num_float_features=16
    )
    sharders = torchrec_compress.sharders(probe)
    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LEARNING_RATE}
    for sharder in sharders:  # TorchRec's harness trains the fused tables by SGD
        if hasattr(sharder, "_fused_params"):
            sharder._fused_params = dict(fused)
        for inner in ("_ebc_sharder", "_factor_sharder"):
            if hasattr(getattr(sharder, inner, None), "_fused_params"):
                getattr(sharder, inner)._fused_params = dict(fused)
    constraints = {
        t.name: ParameterConstraints(sharding_types=[case.sharding_type], min_partition=4)
        for t in tables
    }
    try:
        # TorchRec's harness plans on rank 0 and broadcasts: a plan rank 0 cannot make would
        # leave the other processes waiting; plan here first, where every rank raises alike
        world = dist.get_world_size()
        plan_model(
            model_class(
                tables=tables,
                weighted_tables=[],
                embedding_groups=groups,
                num_float_features=16,
                sparse_device=torch.device("meta"),
            ),
            Topology(world_size=world, compute_device="cpu", local_world_size=world),
            sharders=sharders,
            pg=dist.group.WORLD,
            constraints=constraints,
        )
        _import_test_sharding().sharding_single_rank_test_single_process(
            pg=dist.group.WORLD,
            device=torch.device("cpu"),
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            model_class=model_class,
            embedding_groups=groups,
            tables=tables,
            sharders=sharders,
            optim=EmbOptimType.EXACT_SGD,
            constraints=constraints,
            local_size=dist.get_world_size(),
        )
    except Exception as error:  # noqa: BLE001 - every failure becomes an outcome
        status = "refuse" if _is_refusal(error) else "fail"
        tail = "" if status == "refuse" else "".join(traceback.format_tb(error.__traceback__)[-3:])
        return status, f"{type(error).__name__}: {error}"[:400] + tail
    return "pass", ""


def run_harness_cases(
    rank: int, world_size: int, cases: list[tuple[str, str, str, bool]]
) -> list[tuple[str, str, str]]:
    """Runs each case in this process group (``run_multiprocess`` entry point)."""
    torch.set_num_threads(1)
    out = []
    for fields in cases:
        case = HarnessCase(*fields)
        status, detail = run_harness_case(case)
        out.append((case.name, status, detail))
        dist.barrier()
    return out
