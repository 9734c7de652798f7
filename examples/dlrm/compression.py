"""The compression stage of the DLRM pipeline: trained (sharded) baseline -> compressed, re-sharded model.

One verb for every method: ``compress_(dmp_model, config, calibration=...)`` computes statistics,
factors and codes shard by shard (no table is gathered on one process), and the report's
``reshard`` re-plans the compressed model at its true, smaller size, shards it and loads the
compressed state through a DCP checkpoint (kept in the run directory: fine-tuning falls back to it).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel

from examples.dlrm.model import ModelConfig, build_model
from examples.dlrm.train import (
    CheckpointPolicy,
    FitResult,
    TrainConfig,
    attach_sparse_optimizer,
    build_optimizer,
    fit,
    is_main,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from torchrec_compress import (
    AFMConfig,
    BudgetConfig,
    BudgetReport,
    CompressionReport,
    MECConfig,
    MECTraining,
    RowWiseQuantConfig,
    ShardedBudgetReport,
    SVDConfig,
    compress_,
    compression_layout,
    load_compressed,
    reinitialize_dense_,
)
from torchrec_compress.config import CompressionConfig
from torchrec_compress.data import CTRDataset
from torchrec_compress.distributed.compression import (
    ShardedCompressionReport,
    read_compression_layout,
)
from torchrec_compress.distributed.tables import save_compressed_state
from torchrec_compress.faults import fault_point
from torchrec_compress.layout import CompressionLayout

logger = logging.getLogger("examples.dlrm")

FINETUNE_PROTOCOLS = ("continue", "retrain")
METHODS = ("afm", "svd", "mec", "pq", "afm+mec", "afm+pq", "budget")
PQ_METHODS = ("mec", "pq")
# AFM first (rank / variance / budget flags), then MEC or PQ of the k-dim factor tables
# (--subspaces must divide every rank)
TWO_STAGE = ("afm+mec", "afm+pq")
# --compress budget: what a DMP model can take after a plain model's compression (row-wise int4
# rows cannot be checkpointed by torchrec 1.8, so they are left out)
BUDGET_METHODS = ("fp16", "int8", "afm", "pq", "afm+pq", "afm+int8")
# --compress int8 / int4: TorchRec's row-wise quantization (RowWiseQuantConfig(bits))
ROW_WISE = {"int8": 8, "int4": 4}

# torchrec 1.8 cannot DCP-checkpoint int4 / int2 rows (UInt4Tensor.is_pinned), and both the DMP
# route (it re-shards through a checkpoint) and fine-tuning (it checkpoints every epoch) need to.
UNCHECKPOINTABLE_BITS = (4, 2)
NOT_FINETUNED = (
    "compressed unsharded, not fine-tuned: torchrec 1.8 cannot checkpoint int4/int2 rows, "
    "which the DMP route and fine-tuning need"
)


def unshardable(configs: Sequence[CompressionConfig]) -> bool:
    """Whether ``configs`` quantize rows to int4 / int2: compressed unsharded, not fine-tuned."""
    return any(
        isinstance(c, RowWiseQuantConfig) and c.bits in UNCHECKPOINTABLE_BITS for c in configs
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Compression flags of ``examples.dlrm.main``."""
    g = p.add_argument_group("compression")
    g.add_argument(
        "--compress",
        choices=[*METHODS, *ROW_WISE],
        default=None,
        help="compress the trained (or loaded) baseline, then fine-tune; int8 / int4: TorchRec's "
        "row-wise quantization (int4 is quantized unsharded, then neither fine-tuned nor saved: "
        "torchrec 1.8 cannot checkpoint int4 rows)",
    )
    g.add_argument("--rank", type=int, default=None, help="one rank for every table")
    g.add_argument(
        "--rank-multiple",
        type=int,
        default=4,
        help="round the ranks the library chooses (--explained-variance, --budget-ratio) up to "
        "a multiple of this; an explicit --rank is stored exactly (ranks that are not multiples "
        "of 4 are stored packed)",
    )
    g.add_argument(
        "--explained-variance",
        type=float,
        default=None,
        help="per-table rank: smallest k explaining this fraction of output variance",
    )
    g.add_argument(
        "--budget-ratio",
        type=float,
        default=None,
        help="one byte budget for all tables: embedding bytes / RATIO (afm/svd: ranks chosen "
        "globally; budget: the best option per table)",
    )
    _add_budget_arguments(g)
    g.add_argument(
        "--compress-linear", action="store_true", help="also compress the MLP hidden layers"
    )
    g.add_argument(
        "--keep-embeddings",
        action="store_true",
        help="leave the tables uncompressed (with --compress-linear: the MLPs only)",
    )
    g.add_argument("--linear-rank", type=int, default=None)
    g.add_argument("--linear-variance", type=float, default=None)
    g.add_argument("--subspaces", type=int, default=16, help="mec/pq: M one-byte codes per row")
    g.add_argument("--centroids", type=int, default=256, help="mec/pq: K codewords per subspace")
    g.add_argument("--mec-steps", type=int, default=300, help="mec: training steps per table")
    g.add_argument(
        "--mec-keep-last",
        action="store_true",
        help="mec: end with the last training state (MECTraining(keep_best=False)); by default "
        "the state with the best validation MSE is kept, which is often k-means' start",
    )
    g.add_argument(
        "--mec-weighting",
        choices=("log2", "lookups"),
        default="log2",
        help="mec/pq row weights from lookup counts n: the paper's max(1, floor(log2 n)), or n",
    )
    g.add_argument(
        "--calibration-batches",
        type=int,
        default=0,
        help="train batches per process for statistics (0: the whole train split)",
    )
    g.add_argument(
        "--finetune-epochs",
        type=int,
        default=None,
        help="fine-tuning epochs after compression; default: where it has paid (BENCHMARKS), "
        "1 on the streaming synthetic default (fresh rows: +0.003..+0.027 test AUC), 0 on "
        "frappe, criteo, parquet and non-streaming synthetic data (fresh_train_rows=0), where "
        "one epoch never beat the compressed weights",
    )
    g.add_argument(
        "--finetune-lr-scale",
        type=float,
        default=0.1,
        help="fine-tuning learning rates = training ones (--lr, --sparse-lr) times this; the "
        "compressed model starts close to a trained optimum and the fresh Adam state overshoots "
        "(continue protocol only)",
    )
    g.add_argument(
        "--finetune-protocol",
        choices=FINETUNE_PROTOCOLS,
        default="continue",
        help="continue: fine-tune the compressed model (the compressed weights compete as epoch "
        "-1); retrain: the MEC paper's protocol, re-initialise the MLPs and train "
        "--finetune-epochs epochs at the full learning rates; the embedding collections keep "
        "their compressed state (PQ codes frozen; codebooks, AFM factor tables and projections "
        "train as in fine-tuning)",
    )


def _add_budget_arguments(g: argparse._ArgumentGroup) -> None:
    """The flags of ``--compress budget`` (with ``--budget-ratio`` and ``--mec-weighting``)."""
    g.add_argument(
        "--budget-objective",
        choices=("loss", "absolute", "relative", "loss_delta", "fisher"),
        default=None,
        help="budget: how each table's estimated output error is weighed (BudgetConfig): loss = "
        "times the loss's squared gradient (loss_sensitivity), absolute = summed over lookups, "
        "relative = over the table's output variance; loss_delta = the loss increase measured "
        "on held-out calibration batches with only that table compressed (objective); fisher = its "
        "second-order estimate from per-example loss gradients (loss_delta and fisher: one "
        "process only).  Default: fisher on one process (at or ahead of loss on Frappe d=16 / d=64 "
        "and the synthetic default, where loss lost 0.015 AUC at 16x; BENCHMARKS), loss on several",
    )
    g.add_argument(
        "--budget-loss-batches",
        type=int,
        default=8,
        help="budget: held-out calibration batches the loss_delta / fisher objectives measure on",
    )
    g.add_argument(
        "--budget-estimate-iterations",
        type=int,
        default=8,
        help="budget: k-means iterations of the PQ error estimates (the PQ method runs 20)",
    )
    g.add_argument(
        "--budget-subspaces",
        default="1,2,4,8,16",
        help="budget: the PQ M values to consider (comma-separated)",
    )


def default_finetune_epochs(dataset: str, data_options: dict[str, Any]) -> int:
    """``--finetune-epochs`` when not given: 1 where fine-tuning after compression has paid
    (the streaming synthetic default: every epoch reads fresh rows), else 0 (Frappe, Criteo,
    parquet: one epoch never beat the compressed weights, BENCHMARKS)."""
    streaming = dataset == "synthetic" and bool(data_options.get("fresh_train_rows", True))
    return 1 if streaming else 0


def embedding_bytes(schema_rows: tuple[int, ...], dim: int) -> int:
    return sum(rows * dim * 4 for rows in schema_rows)


def make_config(
    args: argparse.Namespace, total_embedding_bytes: int, method: str | None = None
) -> CompressionConfig:
    """The config the flags describe for ``method`` (default ``args.compress``): MEC/PQ, or
    AFM/SVD (one of rank / variance / budget)."""
    method = method or args.compress
    if method == "budget":
        if args.budget_ratio is None:
            raise SystemExit("--compress budget needs --budget-ratio")
        objective = args.budget_objective or ("loss" if _several_processes() else "fisher")
        return BudgetConfig(
            memory_budget_bytes=int(total_embedding_bytes / args.budget_ratio),
            methods=BUDGET_METHODS,
            num_centroids=args.centroids,
            subspaces=tuple(int(m) for m in args.budget_subspaces.split(",")),
            weighting=args.mec_weighting,
            error="relative" if objective == "relative" else "absolute",
            # train_forward returns DLRMTrain's loss first
            loss_sensitivity=objective == "loss",
            objective=objective if objective in ("loss_delta", "fisher") else "squared_error",
            loss_batches=args.budget_loss_batches,
            estimate_iterations=args.budget_estimate_iterations,
        )
    if method in ROW_WISE:
        return RowWiseQuantConfig(bits=ROW_WISE[method])
    if method in PQ_METHODS:
        return MECConfig(
            num_subspaces=args.subspaces,
            num_centroids=args.centroids,
            mode=method,
            weighting=args.mec_weighting,
            training=MECTraining(steps=args.mec_steps, keep_best=not args.mec_keep_last),
        )
    chosen = [x is not None for x in (args.rank, args.explained_variance, args.budget_ratio)]
    if args.keep_embeddings:
        if not args.compress_linear:
            raise SystemExit("--keep-embeddings without --compress-linear compresses nothing")
    elif sum(chosen) != 1:
        raise SystemExit(
            "--compress needs exactly one of --rank, --explained-variance, --budget-ratio"
        )
    kwargs: dict[str, Any] = {
        "rank": args.rank,
        "explained_variance": args.explained_variance,
        "memory_budget_bytes": (
            int(total_embedding_bytes / args.budget_ratio) if args.budget_ratio else None
        ),
        "embeddings": not args.keep_embeddings,
        "linear": args.compress_linear,
        "linear_rank": args.linear_rank,
        "linear_variance": args.linear_variance,
        "rank_multiple": args.rank_multiple,
    }
    return (AFMConfig if method == "afm" else SVDConfig)(**kwargs)


def calibration_batches(data: CTRDataset, batch_size: int, limit: int) -> Iterator[Batch]:
    batches = data.batches("train", batch_size, dist.get_rank(), dist.get_world_size())
    return islice(batches, limit) if limit > 0 else batches


def train_forward(model: nn.Module, batch: Batch) -> Any:
    """``DLRMTrain`` takes the whole batch."""
    return model(batch)


def compress_model(
    model: DistributedModelParallel,
    data: CTRDataset,
    model_config: ModelConfig,
    finetune_config: TrainConfig,
    args: argparse.Namespace,
    device: torch.device,
    work_dir: str,
) -> tuple[nn.Module, CompressionReport, CompressionConfig | TwoStageConfig | BudgetStages]:
    """Compress a trained DMP model and return the re-planned, re-sharded compressed model.

    ``int4`` returns a plain model instead, quantized on every process (torchrec 1.8 cannot
    checkpoint int4 rows, which re-sharding needs): it is evaluated, not fine-tuned or saved.

    ``afm+mec`` / ``afm+pq`` run two stages: AFM (sharded, re-planned and loaded like the final
    model), then MEC / PQ of its factor tables; the report follows each table through both.
    """
    total_bytes = embedding_bytes(data.schema.num_embeddings, model_config.embedding_dim)
    if args.compress == "budget":
        return compress_within_budget(
            model, data, model_config, finetune_config, args, device, work_dir
        )
    methods = args.compress.split("+")
    configs = [make_config(args, total_bytes, method) for method in methods]
    if unshardable(configs):  # int4: the trained weights, unsharded, quantized in place
        plain = unsharded_copy(model, data, model_config, os.path.join(work_dir, "compress_source"))
        quantized, report = compress_stages(
            plain, configs, data, finetune_config, args, device, [""], reshard=False
        )
        return quantized, report, configs[0]
    # the next stage compresses this one's re-sharded model further
    checkpoint_dirs = [os.path.join(work_dir, f"compressed_{m}") for m in methods[:-1]]
    checkpoint_dirs.append(os.path.join(work_dir, "compressed_init"))
    compressed, report = compress_stages(
        model, configs, data, finetune_config, args, device, checkpoint_dirs
    )
    assert isinstance(compressed, DistributedModelParallel)  # resharded after every stage
    return compressed, report, configs[-1] if len(configs) == 1 else TwoStageConfig(*configs)


def unsharded_copy(
    model: DistributedModelParallel, data: CTRDataset, model_config: ModelConfig, path: str
) -> nn.Module:
    """A plain (unsharded) DLRM on the CPU of every process holding ``model``'s weights, passed
    through a DCP checkpoint at ``path`` (collective)."""
    save_checkpoint(model, path, {}, keep=0)
    plain = build_model(data.schema, model_config, torch.device("cpu"))
    load_checkpoint(plain, path)
    return plain


def finetune(
    model: DistributedModelParallel,
    data: CTRDataset,
    config: TrainConfig,
    checkpoints: CheckpointPolicy,
    metadata: dict[str, Any],
    args: argparse.Namespace,
    start_auc: float,
) -> FitResult:
    """Train the compressed model as ``--finetune-protocol`` says.

    ``continue``: from the compressed weights, which compete as epoch -1 (validation AUC
    ``start_auc``).  ``retrain`` (the MEC paper's protocol): the dense layers are re-initialised
    (seed ``--seed``, equal on every process) and trained again; the embedding collections
    start from their compressed state (PQ codes frozen; codebooks, AFM factor tables,
    projections and kept tables train, as in fine-tuning); no epoch -1.
    """
    if args.finetune_protocol == "retrain":
        reset = reinitialize_dense_(model, seed=args.seed)
        if is_main():
            logger.info("retrain protocol: re-initialised %d dense layers", len(reset))
    optimizer = build_optimizer(model, config)
    keep_start = args.finetune_protocol == "continue"
    return fit(
        model,
        optimizer,
        data,
        config,
        checkpoints,
        metadata,
        start_auc=start_auc if keep_start else None,
    )


def compress_stages(
    model: nn.Module,
    configs: Sequence[CompressionConfig],
    data: CTRDataset,
    finetune_config: TrainConfig,
    args: argparse.Namespace,
    device: torch.device,
    checkpoint_dirs: Sequence[str],
    reshard: bool = True,
) -> tuple[nn.Module, CompressionReport]:
    """``compress_`` with each config in turn, calibrated on the train split; the report follows
    each table through every stage.

    With ``reshard`` (a DMP model) each stage's model is re-planned, re-sharded and loaded
    through its checkpoint in ``checkpoint_dirs`` (one per stage) before the next stage; without
    it a plain model is compressed in place.
    """
    report: CompressionReport | None = None
    for config, checkpoint_dir in zip(configs, checkpoint_dirs, strict=True):
        stage_report = compress_(
            model,
            config,
            calibration_batches(data, finetune_config.batch_size, args.calibration_batches),
            forward_fn=train_forward,
        )
        report = stage_report if report is None else report.followed_by(stage_report)
        fault_point("compress.stage")
        if reshard:
            assert isinstance(stage_report, ShardedCompressionReport)  # a DMP model's report
            model = stage_report.reshard(
                device,
                sharding_type=args.sharding_type,
                prepare=lambda m: attach_sparse_optimizer(m, finetune_config),
                checkpoint_dir=checkpoint_dir,
            )
    assert report is not None
    return model, report


@dataclass(frozen=True)
class TwoStageConfig:
    """``afm+mec`` / ``afm+pq``: the low-rank config, then the product quantizer of its factors."""

    lowrank: CompressionConfig
    quantizer: CompressionConfig

    def to_dict(self) -> dict[str, Any]:
        return {"lowrank": self.lowrank.to_dict(), "quantizer": self.quantizer.to_dict()}


@dataclass(frozen=True)
class BudgetStages:
    """``budget``: the budget, and the per-table configs that applied its plan."""

    budget: BudgetConfig
    stages: tuple[CompressionConfig, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget.to_dict(), "stages": [c.to_dict() for c in self.stages]}


def stage_configs(
    config: CompressionConfig | TwoStageConfig | BudgetStages,
) -> list[CompressionConfig]:
    """The configs :func:`compress_model` applied, in order."""
    if isinstance(config, TwoStageConfig):
        return [config.lowrank, config.quantizer]
    if isinstance(config, BudgetStages):
        return list(config.stages)
    return [config]


def _several_processes() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def compress_within_budget(
    model: nn.Module,
    data: CTRDataset,
    model_config: ModelConfig,
    finetune_config: TrainConfig,
    args: argparse.Namespace,
    device: torch.device,
    work_dir: str,
) -> tuple[DistributedModelParallel, CompressionReport, BudgetStages]:
    """``--compress budget``.  Several processes: the library plans and compresses the DMP
    ``model`` where its rows live (``compress_(dmp, BudgetConfig)``; not the loss_delta / fisher
    objectives) and the report reshards it.  One process: the trained tables are copied into an
    unsharded model (a plain ``model`` is compressed in place), compressed there with any
    objective, written to ``compressed_init`` with their layout and loaded sharded."""
    total_bytes = embedding_bytes(data.schema.num_embeddings, model_config.embedding_dim)
    config = make_config(args, total_bytes)
    assert isinstance(config, BudgetConfig)
    if dist.get_world_size() != 1:
        if config.objective != "squared_error":
            raise SystemExit(
                f"--budget-objective {args.budget_objective} needs the unsharded model: run "
                "--compress budget on one process for it (several processes: loss, absolute, "
                "relative)"
            )
        batches = calibration_batches(data, finetune_config.batch_size, args.calibration_batches)
        sharded = compress_(model, config, batches, forward_fn=train_forward)
        assert isinstance(sharded, ShardedBudgetReport)
        resharded = sharded.reshard(
            device,
            sharding_type=args.sharding_type,
            prepare=lambda m: attach_sparse_optimizer(m, finetune_config),
            checkpoint_dir=os.path.join(work_dir, "compressed_init"),
        )
        return resharded, sharded, BudgetStages(config, tuple(sharded.stages))
    plain = (
        unsharded_copy(model, data, model_config, os.path.join(work_dir, "compress_source"))
        if isinstance(model, DistributedModelParallel)
        else model
    )
    batches = calibration_batches(data, finetune_config.batch_size, args.calibration_batches)
    report = compress_(plain, config, batches, forward_fn=train_forward)
    assert isinstance(report, BudgetReport)
    checkpoint_dir = os.path.join(work_dir, "compressed_init")
    layout = compression_layout(plain, report.stages)
    save_compressed_state(plain.state_dict(), checkpoint_dir, layout.to_dict())
    compressed = load_compressed(
        build_model(data.schema, model_config, torch.device("meta")),
        checkpoint_dir,
        device,
        sharding_type=args.sharding_type,
        prepare=lambda m: attach_sparse_optimizer(m, finetune_config),
    )
    return compressed, report, BudgetStages(config, tuple(report.stages))


def checkpoint_layout(path: str) -> CompressionLayout | None:
    """The compression layout of a checkpoint: from the metadata ``save_checkpoint`` stored
    with it, else from the checkpoint itself (``compressed_init``, written by the library's
    ``report.reshard``); ``None`` for a checkpoint of neither kind (uncompressed)."""
    data = read_checkpoint_metadata(path).get("compression_layout")
    if data is not None:
        return CompressionLayout.from_dict(data)
    return read_compression_layout(path)


def report_dict(report: CompressionReport) -> dict[str, Any]:
    return {
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "ratio": report.compression_ratio,
        "rows": [
            {
                "name": r.name,
                "kind": r.kind,
                "shape": list(r.shape),
                "method": r.method,
                "rank": r.rank,
                "bytes_before": r.bytes_before,
                "bytes_after": r.bytes_after,
                "explained_variance": r.explained_variance,
                "note": r.note,
            }
            for r in report.rows
        ],
    }


def table_bytes(report: CompressionReport, kind: str) -> float | None:
    rows = [r for r in report.rows if r.kind == kind]
    if not rows:
        return None
    return sum(r.bytes_before for r in rows) / max(sum(r.bytes_after for r in rows), 1)
