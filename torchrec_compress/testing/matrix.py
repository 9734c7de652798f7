"""The differential test matrix: random small configurations, sharded vs unsharded.

A :class:`Case` is one seeded configuration: a TorchRec model (``TestSparseNN`` with weighted,
position-weighted (``FeatureProcessedEmbeddingBagCollection``) and shared-feature tables,
``DLRM``, ``DLRM_DCN``, ``DLRM_Projection``, ``SimpleDeepFMNN``), its tables (SUM / MEAN pooling
per table, mixed dims, tiny and large tables, empty bags), a compression stack (AFM incl. packed
ranks, SVD, MEC, PQ, row-wise int8, AFM→int8, AFM→MEC, or none), how the sharded model is made
(compressed unsharded then sharded, or sharded then compressed with ``compress_`` on the DMP
model and ``reshard``), a plan (TorchRec's planner on its own, or table-, row-, column-,
table-row-wise, data-parallel or a random mix forced through ``ParameterConstraints``), a
training recipe (Adagrad, RowWiseAdagrad or SGD applied in backward to the sparse arch, the
standard TorchRec recipe) and a world size.

:func:`run_case` (inside a process group, e.g. through
:func:`~torchrec_compress.testing.multiprocess.run_multiprocess` via :func:`run_cases`) builds
the unsharded compressed model and the sharded one from the same weights and compares

* the forward on each process's own batch (``<= FORWARD_TOL``),
* 3 training steps, through a plain loop and through ``TrainPipelineSparseDist``, against the
  unsharded model trained on the union of all processes' batches (``<= TRAIN_TOL``),
* the trained model saved with ``save_compressed`` and loaded with ``load_compressed`` into the
  uncompressed model on ``meta``: the same outputs, exactly.

Its outcome is ``pass``, ``refuse`` (the library raised a ``ValueError`` /
``NotImplementedError`` of its own: a clear refusal of an unsupported combination) or ``fail``
(a difference above tolerance, or any other exception: a crash).  ``benchmarks/matrix.py`` runs
hundreds of cases and prints the table; ``tests/distributed/test_matrix.py`` runs a slice.

Example::

    >>> from torchrec_compress.testing.matrix_cases import generate_cases
    >>> cases = generate_cases(seed=0, count=3)
    >>> len(cases), cases[0] == generate_cases(seed=0, count=3)[0]
    (3, True)
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

import torchrec_compress
from torchrec_compress import (  # the public names, as a user imports them
    AFMConfig,
    MECConfig,
    MECTraining,
    PQConfig,
    RowWiseQuantConfig,
    SVDConfig,
)
from torchrec_compress.distributed.compression import ShardedCompressionReport
from torchrec_compress.distributed.planning import plan_model
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.testing.matrix_cases import (
    CPU,
    DENSE,
    FORWARD_TOL,
    META,
    PACKAGE_DIR,
    STEPS,
    TRAIN_TOL,
    Case,
    Outcome,
)
from torchrec_compress.testing.matrix_models import (
    build_model,
    forward_fn,
    make_batch,
    predictions,
    sparse_arch,
    union_batch,
)

# --- compression ------------------------------------------------------------------------


def stack(case: Case) -> list[Any]:
    """The compression configs of the case's method, applied in order."""

    pq_m = 2
    configs: dict[str, list[Any]] = {
        "none": [],
        "afm": [AFMConfig(rank=4)],
        "afm_k2": [AFMConfig(rank=2, rank_multiple=1)],
        "svd": [SVDConfig(rank=4)],
        "mec": [
            MECConfig(
                num_subspaces=pq_m,
                num_centroids=8,
                training=MECTraining(steps=5, seed=case.seed),
            )
        ],
        "pq": [PQConfig(num_subspaces=pq_m, num_centroids=8)],
        "int8": [RowWiseQuantConfig(bits=8)],
        "afm+int8": [AFMConfig(rank=4), RowWiseQuantConfig(bits=8)],
        "afm+mec": [
            AFMConfig(rank=4),
            MECConfig(
                num_subspaces=pq_m, num_centroids=8, training=MECTraining(steps=5, seed=case.seed)
            ),
        ],
    }
    return configs[case.method]


def calibration(case: Case, rank: int | None = None) -> list[Any]:
    """Calibration batches: process ``rank``'s own, or (``None``) every process's."""
    ranks = range(case.world_size) if rank is None else [rank]
    return [make_batch(case, r, 50 + i) for i in range(3) for r in ranks]


def compress_unsharded(case: Case, model: nn.Module) -> None:
    for config in stack(case):
        torchrec_compress.compress_(
            model, config, calibration=calibration(case), forward_fn=forward_fn
        )


# --- sharding ---------------------------------------------------------------------------


def constraints(case: Case) -> dict[str, ParameterConstraints]:
    """``ParameterConstraints`` forcing the case's plan on every table (none for ``planner``)."""
    if case.plan == "planner":
        return {}
    forced = {
        t.name: (case.mixed[i] if case.plan == "mixed" else case.plan)
        for i, t in enumerate(case.tables)
    }
    out = {}
    for name, sharding_type in forced.items():
        min_partition = None
        if sharding_type in (ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value):
            # 4-wide column shards: TorchRec's default keeps small tables whole (and a k = 4
            # factor table is 4 wide)
            min_partition = 4
        out[name] = ParameterConstraints(
            sharding_types=[sharding_type], min_partition=min_partition
        )
    return out


def shard(case: Case, model: nn.Module) -> DistributedModelParallel:
    """``model`` under DMP as a TorchRec user shards it: TorchRec's planner on the process
    group with the case's constraints and ``torchrec_compress.sharders(model)``."""
    sharders = torchrec_compress.sharders(model)
    world = dist.get_world_size()
    plan = plan_model(
        model,
        Topology(world_size=world, compute_device="cpu", local_world_size=world),
        sharders=sharders,
        pg=dist.group.WORLD,
        constraints=constraints(case),
    )
    return DistributedModelParallel(model, device=CPU, plan=plan, sharders=sharders)


def attach_recipe(case: Case, model: nn.Module) -> None:
    """TorchRec's recipe: the case's optimizer in backward on every sparse-arch parameter.

    ``RowWiseAdagrad`` takes 2-D parameters only: 1-D ones (TorchRec's position weights) get
    ``Adagrad``, as a TorchRec user must do.  ``tables_sgd``: SGD in backward on the embedding
    tables' weights only; everything else (projections, means, codebooks, feature processors)
    trains with the dense optimizer.
    """
    params = [p for p in sparse_arch(model).parameters() if p.requires_grad]
    if case.recipe == DENSE:
        return
    if case.recipe == "tables_sgd":
        tables = [
            bag.weight
            for m in sparse_arch(model).modules()
            if isinstance(m, EmbeddingBagCollection)
            for bag in m.embedding_bags.values()
            if bag.weight.requires_grad
        ]
        apply_optimizer_in_backward(torch.optim.SGD, tables, {"lr": 0.05})
        return
    if case.recipe == "sgd":
        apply_optimizer_in_backward(torch.optim.SGD, params, {"lr": 0.05})
        return
    rowwise = case.recipe == "rowwise_adagrad"
    matrices = [p for p in params if p.dim() >= 2 and rowwise]
    others = [p for p in params if not (p.dim() >= 2 and rowwise)]
    if matrices:
        apply_optimizer_in_backward(RowWiseAdagrad, matrices, {"lr": 0.05, "eps": 1e-8})
    if others:
        apply_optimizer_in_backward(torch.optim.Adagrad, others, {"lr": 0.05, "eps": 1e-8})


def dense_optimizer(model: nn.Module) -> KeyedOptimizerWrapper:
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    return KeyedOptimizerWrapper(dense, lambda params: torch.optim.SGD(params, lr=0.05))


def sharded_model(case: Case, state: dict[str, torch.Tensor]) -> DistributedModelParallel:
    """The case's compressed model under DMP, its recipe attached, weights from ``state``."""
    configs = stack(case)
    if case.route == "compress_then_shard" or not configs:
        model = build_model(case, CPU)
        compress_unsharded(case, model)
        attach_recipe(case, model)
        dmp = shard(case, model)
        load_full_state_dict_(dmp, state)
        return dmp
    model = build_model(case, CPU)
    model.load_state_dict(_uncompressed_state(case))
    dmp = shard(case, model)
    load_full_state_dict_(dmp, _uncompressed_state(case))
    rank = dist.get_rank()
    for i, config in enumerate(configs):
        report = torchrec_compress.compress_(
            dmp, config, calibration=calibration(case, rank), forward_fn=forward_fn
        )
        assert isinstance(report, ShardedCompressionReport)
        last = i == len(configs) - 1
        dmp = report.reshard(
            CPU,
            constraints=constraints(case),
            prepare=(lambda m: attach_recipe(case, m)) if last else None,
        )
    return dmp


def _uncompressed_state(case: Case) -> dict[str, torch.Tensor]:
    return build_model(case, CPU).state_dict()


def _plan_types(dmp: DistributedModelParallel) -> list[str]:
    return sorted({p.sharding_type for module in dmp.plan.plan.values() for p in module.values()})


# --- running a case ---------------------------------------------------------------------


def _train_reference(case: Case, model: nn.Module) -> nn.Module:
    attach_recipe(case, model)
    optimizer = dense_optimizer(model)
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = model(union_batch(case, step))[0]
        loss.backward()
        optimizer.step()
    return model


def _train_plain(case: Case, dmp: DistributedModelParallel, rank: int) -> None:
    optimizer = dense_optimizer(dmp)
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = dmp(make_batch(case, rank, step))[0]
        loss.backward()
        optimizer.step()


def _train_pipeline(case: Case, dmp: DistributedModelParallel, rank: int) -> None:
    pipeline = TrainPipelineSparseDist(dmp, dense_optimizer(dmp), CPU)
    batches: Iterator[Any] = iter([make_batch(case, rank, step) for step in range(STEPS)])
    for _ in range(STEPS):
        pipeline.progress(batches)
    pipeline.detach()  # the model's own forward again, for evaluation


def _max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    if got.shape != expected.shape:
        return float("inf")
    if got.numel() == 0:
        return 0.0
    return float((got - expected).abs().max())


def _compare(case: Case, rank: int, outcome: Outcome) -> None:
    reference = build_model(case, CPU)
    compress_unsharded(case, reference)
    state = copy.deepcopy(reference.state_dict())
    eval_batch = make_batch(case, rank, 99)

    dmp = sharded_model(case, state)
    outcome.sharding = _plan_types(dmp)
    outcome.errors["forward"] = _max_error(
        predictions(dmp, eval_batch), predictions(reference, eval_batch)
    )
    trained = _train_reference(case, reference)
    expected = predictions(trained, eval_batch)
    _train_plain(case, dmp, rank)
    outcome.errors["train"] = _max_error(predictions(dmp, eval_batch), expected)
    pipelined = sharded_model(case, state)
    _train_pipeline(case, pipelined, rank)
    outcome.errors["pipeline"] = _max_error(predictions(pipelined, eval_batch), expected)
    outcome.errors["reload"] = _max_error(
        predictions(_reloaded(case, pipelined), eval_batch), predictions(pipelined, eval_batch)
    )


def _reloaded(case: Case, dmp: DistributedModelParallel) -> DistributedModelParallel:
    """``dmp`` saved with ``save_compressed`` and loaded into the uncompressed model on ``meta``
    with ``load_compressed`` (the checkpoint route of a user), under the case's plan."""
    path: list[Any] = [tempfile.mkdtemp(prefix="matrix-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path)
    try:
        torchrec_compress.save_compressed(dmp, path[0], stack(case))
        return torchrec_compress.load_compressed(
            build_model(case, META), path[0], CPU, constraints=constraints(case)
        )
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(path[0], ignore_errors=True)


# TorchRec's planner refusing a forced plan that no sharder offers, naming the table
PLANNER_REFUSAL = "No available sharding type and compute kernel combination after applying user"


def _is_refusal(error: BaseException) -> bool:
    """A ``ValueError`` / ``NotImplementedError`` raised by this package's own code, or
    TorchRec's planner refusing a forced plan (:data:`PLANNER_REFUSAL`)."""
    if PLANNER_REFUSAL in str(error):
        return True
    if not isinstance(error, (ValueError, NotImplementedError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(PACKAGE_DIR)


def run_case(case: Case, rank: int) -> Outcome:
    """Runs ``case`` on this process (every process of the group must run it too)."""
    outcome = Outcome(case.name, "pass")
    try:
        _compare(case, rank, outcome)
    except Exception as error:  # noqa: BLE001 - every failure becomes an outcome
        outcome.status = "refuse" if _is_refusal(error) else "fail"
        outcome.detail = f"{type(error).__name__}: {error}".strip()[:600]
        if outcome.status == "fail":
            outcome.detail += "\n" + "".join(
                traceback.format_tb(error.__traceback__)[-int(os.environ.get("MATRIX_TB", 4)) :]
            )
        return outcome
    return judge(outcome)


def judge(outcome: Outcome) -> Outcome:
    """Fails ``outcome`` if a comparison is above its tolerance (or not a number)."""
    # a reloaded model may be planned otherwise (other kernels, other summation order)
    limits = {
        "forward": FORWARD_TOL,
        "train": TRAIN_TOL,
        "pipeline": TRAIN_TOL,
        "reload": FORWARD_TOL,
    }
    wrong = {k: v for k, v in outcome.errors.items() if not v <= limits[k]}
    if wrong:
        outcome.status = "fail"
        outcome.detail = "wrong result: " + ", ".join(f"{k} {v:.3g}" for k, v in wrong.items())
    return outcome


def run_cases(
    rank: int, world_size: int, cases: list[dict[str, Any]], threads: int = 1
) -> list[dict[str, Any]]:
    """Runs each case (as a dict) in this process group; returns the outcomes as dicts.

    The processes exchange each case's outcome; a case that left them out of step (one
    raised while another waits in a collective) ends the run early, and the caller runs the
    rest in a new process group.
    """
    torch.set_num_threads(threads)
    out = []
    for data in cases:
        case = Case.from_dict(data)
        assert case.world_size == world_size, (case.name, world_size)
        outcome = run_case(case, rank)
        try:
            everyone: list[Any] = [None] * world_size
            dist.all_gather_object(everyone, (outcome.status, outcome.case))
        except Exception as error:  # noqa: BLE001 - the group is out of step
            outcome.status = "fail"
            outcome.detail += f" (processes out of step: {error})"
            out.append(asdict(outcome))
            break
        out.append(asdict(outcome))
        if any(name != case.name for _, name in everyone):
            break
    return out


def combine(per_rank: list[list[dict[str, Any]]]) -> list[Outcome]:
    """One outcome per case from every process's: the worst status, the largest errors."""
    order = {"pass": 0, "refuse": 1, "fail": 2}
    merged = []
    for outcomes in itertools.zip_longest(*per_rank):
        present = [Outcome(**o) for o in outcomes if o is not None]
        worst = max(present, key=lambda o: order[o.status])
        if len(present) < len(outcomes):
            worst = replace(worst, status="fail", detail=worst.detail + " (a process stopped)")
        errors: dict[str, float] = {}
        for o in present:
            for k, v in o.errors.items():
                errors[k] = max(errors.get(k, 0.0), v)
        merged.append(replace(worst, errors=errors))
    return merged


def run_matrix(
    cases: Sequence[Case],
    runner: Callable[..., list[Any]],
    chunk: int = 20,
    timeout_s: float = 1800.0,
) -> list[Outcome]:
    """Runs ``cases`` grouped by world size in spawned process groups (``runner`` is
    :func:`~torchrec_compress.testing.multiprocess.run_multiprocess`); a group that stops
    early is restarted after the case that stopped it."""
    results: dict[str, Outcome] = {}
    for world_size in sorted({c.world_size for c in cases}):
        todo = [c for c in cases if c.world_size == world_size]
        while todo:
            batch = todo[:chunk]
            try:
                per_rank = runner(
                    run_cases,
                    world_size=world_size,
                    timeout_s=timeout_s,
                    pg_timeout_s=120.0,
                    cases=[c.to_dict() for c in batch],
                )
                done = combine(per_rank)
            except RuntimeError as error:  # a process died: blame the first case
                done = [Outcome(batch[0].name, "fail", f"process group failed: {error}"[:600])]
            for outcome in done:
                results[outcome.case] = outcome
            todo = todo[max(1, len(done)) :]
    return [results[c.name] for c in cases if c.name in results]
