"""Training, evaluation and checkpointing of a (DMP-sharded) DLRM.

Every function here is collective: all processes of the group call it in the same order.
"""

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torchrec.optim as trec_optim
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from examples.dlrm.metrics import auc, logloss
from torchrec_compress.data import CTRDataset, check_batch

logger = logging.getLogger(__name__)

# Fused (in-backward) optimizers fbgemm's CPU kernels support; Adam is CUDA-only there.
SPARSE_OPTIMIZERS = {
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


@dataclass
class TrainConfig:
    """Optimisation settings.

    Args:
        epochs: maximum number of epochs.
        batch_size: per-process batch size.
        lr: dense (Adam) learning rate.
        sparse_lr: learning rate of the fused table optimizer.
        sparse_optimizer: one of ``SPARSE_OPTIMIZERS``.
        patience: stop after this many epochs without a better validation AUC.
        eval_batch_size: per-process batch size for evaluation.
        skip_nonfinite: skip (and count) a batch whose loss or dense gradient is NaN or
            infinite instead of stopping with an error.  A non-finite loss is caught before the
            backward pass, so nothing is updated; a non-finite gradient of a finite loss is
            caught before the dense step, but the fused table optimizer has already applied it.
    """

    epochs: int = 10
    batch_size: int = 1024
    lr: float = 1e-3
    sparse_lr: float = 0.05
    sparse_optimizer: str = "adagrad"
    patience: int = 2
    eval_batch_size: int = 8192
    skip_nonfinite: bool = False

    def __post_init__(self) -> None:
        if self.sparse_optimizer not in SPARSE_OPTIMIZERS:
            raise ValueError(
                f"sparse_optimizer {self.sparse_optimizer!r} not supported on CPU; "
                f"choose from {sorted(SPARSE_OPTIMIZERS)}"
            )


def attach_sparse_optimizer(model: nn.Module, config: TrainConfig) -> None:
    """Fuse the table optimizer into the backward pass (before sharding, so the planner counts it)."""
    tables = [p for n, p in model.named_parameters() if "embedding_bags" in n]
    apply_optimizer_in_backward(
        SPARSE_OPTIMIZERS[config.sparse_optimizer], tables, {"lr": config.sparse_lr}
    )


def build_optimizer(model: DistributedModelParallel, config: TrainConfig) -> CombinedOptimizer:
    """Fused table optimizer + Adam for every parameter not already optimised in backward."""
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    # foreach: one fused update over the many small dense tensors (MLP layers, projections,
    # codebooks) instead of a Python loop over them; the same arithmetic
    dense_opt = KeyedOptimizerWrapper(
        dense, lambda ps: torch.optim.Adam(ps, lr=config.lr, foreach=True)
    )
    return CombinedOptimizer([model.fused_optimizer, dense_opt])


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: CTRDataset,
    config: TrainConfig,
    epoch: int,
) -> float:
    """One pass over this process's part of the train split; returns the mean training loss."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model.train()
    total_rows = data.num_rows("train")
    bar = tqdm(
        total=total_rows,
        unit="ex",
        unit_scale=True,
        desc=f"epoch {epoch}",
        disable=not is_main(),
        mininterval=2.0,
        dynamic_ncols=True,
    )
    losses: list[torch.Tensor] = []
    start = time.perf_counter()
    seen = 0
    skipped = 0
    for step, batch in enumerate(
        data.batches("train", config.batch_size, rank, world, epoch=epoch)
    ):
        check_batch(batch, data.schema)
        loss, _ = model(batch)
        optimizer.zero_grad()
        problem = _nonfinite_loss(loss, batch, step)
        if problem is None:
            loss.backward()
            problem = _nonfinite_gradient(model, step)
        if problem is not None:
            where = f"epoch {epoch}, step {step}: {problem}"
            if not config.skip_nonfinite:
                raise FloatingPointError(
                    f"{where}; stopping (TrainConfig.skip_nonfinite / --skip-nonfinite skips "
                    "such batches instead)"
                )
            skipped += 1
            logger.warning("skipping %s", where)
            continue
        optimizer.step()
        losses.append(loss.detach())
        # Every rank's batches have nearly equal sizes: the global count is local × world.
        step_rows = batch.labels.numel() * world
        seen += step_rows
        bar.update(min(step_rows, total_rows - bar.n))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    elapsed = time.perf_counter() - start
    if is_main():
        logger.info("epoch %d: %.0f examples/s", epoch, seen / max(elapsed, 1e-9))
        if skipped:
            logger.warning(
                "epoch %d: skipped %d batches with a non-finite loss or gradient", epoch, skipped
            )
    mean_loss = torch.stack(losses).mean() if losses else torch.tensor(float("nan"))
    dist.all_reduce(mean_loss)
    return float(mean_loss) / world


def _nonfinite_loss(loss: torch.Tensor, batch: Batch, step: int) -> str | None:
    """Describes a NaN or infinite loss on any process (``None`` when all are finite).

    Collective (one scalar all-reduce per step): every process must skip or stop together, or
    the others would wait in the backward pass's collectives for the one that left.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    flags = torch.zeros(world)
    flags[rank] = 0.0 if bool(torch.isfinite(loss.detach())) else 1.0
    if world > 1:
        dist.all_reduce(flags)
    if not bool(flags.any()):
        return None
    ranks = flags.nonzero().flatten().tolist()
    value = f" ({float(loss):g} here)" if rank in ranks else ""
    return (
        f"non-finite loss{value} from batch {step} of process(es) {ranks} "
        f"({batch.labels.numel()} rows on this process)"
    )


def _nonfinite_gradient(model: nn.Module, step: int) -> str | None:
    """Names the first dense parameter with a NaN or infinite gradient (``None`` if none).

    Dense gradients are all-reduced by DDP before this runs, so every process reaches the same
    answer without communicating.
    """
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(g).all() for _, g in named])
    if bool(finite.all()):
        return None
    name = named[int((~finite).nonzero()[0, 0])][0]
    return f"non-finite gradient of {name!r} (batch {step} on every process)"


@torch.no_grad()
def predict(
    model: nn.Module, data: CTRDataset, split: str, batch_size: int
) -> dict[str, torch.Tensor]:
    """Logits and labels of a whole split, gathered from every process (on every process)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model.eval()
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for batch in data.batches(split, batch_size, rank, world):
        check_batch(batch, data.schema)
        _, (_, batch_logits, batch_labels) = model(batch)
        logits.append(batch_logits.flatten().float())
        labels.append(batch_labels.flatten().float())
    local = torch.stack([torch.cat(logits), torch.cat(labels)]) if logits else torch.empty(2, 0)
    gathered: list[torch.Tensor | None] = [None] * world
    dist.all_gather_object(gathered, local)
    merged = torch.cat([g for g in gathered if g is not None], dim=1)
    return {"logits": merged[0], "labels": merged[1]}


def evaluate(model: nn.Module, data: CTRDataset, split: str, batch_size: int) -> dict[str, float]:
    """AUC, logloss and row count of ``split``."""
    out = predict(model, data, split, batch_size)
    return {
        "auc": auc(out["logits"], out["labels"]),
        "logloss": logloss(out["logits"], out["labels"]),
        "rows": float(out["labels"].numel()),
    }


def save_checkpoint(model: nn.Module, path: str, metadata: dict[str, Any]) -> None:
    """``torch.distributed.checkpoint`` save of the model weights (each process writes its shards).

    The checkpoint reshards on load: it loads into a run with any number of processes and any
    sharding plan.  ``metadata`` (JSON) is written next to it by rank 0.
    """
    dcp.save({"model": model.state_dict()}, checkpoint_id=path)
    if is_main():
        with open(os.path.join(path, "run.json"), "w") as f:
            json.dump(metadata, f, indent=2, default=str)
    dist.barrier()


def load_checkpoint(model: nn.Module, path: str) -> dict[str, Any]:
    """Load weights saved by :func:`save_checkpoint` into ``model`` (resharding as needed)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    meta_path = os.path.join(path, "run.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return json.load(f)
    return {}


@dataclass
class FitResult:
    best_epoch: int
    best_val_auc: float
    epochs_run: int
    history: list[dict[str, float]]


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: CTRDataset,
    config: TrainConfig,
    checkpoint_dir: str,
    metadata: dict[str, Any],
    start: tuple[float, str] | None = None,
) -> FitResult:
    """Train with early stopping on validation AUC; the best epoch's weights end up in ``model``.

    The best weights are kept as a DCP checkpoint in ``checkpoint_dir`` and re-loaded at the end.
    ``start = (val_auc, checkpoint)`` describes the weights training starts from (fine-tuning):
    they compete as epoch -1, and are re-loaded from ``checkpoint`` if no epoch beats them.
    """
    best_auc, best_epoch, stale = -math.inf, -1, 0
    if start is not None:
        best_auc = start[0]
    history: list[dict[str, float]] = []
    epoch = 0
    for epoch in range(config.epochs):
        train_loss = train_epoch(model, optimizer, data, config, epoch)
        val = evaluate(model, data, "val", config.eval_batch_size)
        history.append(
            {"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()}}
        )
        if is_main():
            logger.info(
                "epoch %d: train loss %.5f  val AUC %.5f  val logloss %.5f",
                epoch,
                train_loss,
                val["auc"],
                val["logloss"],
            )
        if val["auc"] > best_auc:
            best_auc, best_epoch, stale = val["auc"], epoch, 0
            save_checkpoint(
                model,
                checkpoint_dir,
                {**metadata, "epoch": epoch, "val_auc": val["auc"], "train": asdict(config)},
            )
        else:
            stale += 1
            if stale >= config.patience:
                if is_main():
                    logger.info("early stop: no val AUC gain for %d epochs", stale)
                break
    if best_epoch == -1 and start is not None:
        if is_main():
            logger.info("no epoch beat the starting weights (val AUC %.5f): keeping them", start[0])
        load_checkpoint(model, start[1])
    elif best_epoch != epoch:
        load_checkpoint(model, checkpoint_dir)
    return FitResult(best_epoch, best_auc, epoch + 1, history)


def batches_of(data: CTRDataset, split: str, batch_size: int) -> Iterator[Batch]:
    """This process's batches of ``split`` (for calibration passes)."""
    return data.batches(split, batch_size, dist.get_rank(), dist.get_world_size())
