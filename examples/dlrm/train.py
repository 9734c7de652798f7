"""Training, evaluation and checkpointing of a (DMP-sharded) DLRM.

Every function here is collective: all processes of the group call it in the same order.
"""

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
import torchrec.optim as trec_optim
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from examples.dlrm.metrics import ctr_metrics
from torchrec_compress import checkpoint
from torchrec_compress.data import CTRDataset, check_batch
from torchrec_compress.faults import fault_point

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
        data_epoch_offset: training epoch ``e`` reads the dataset's epoch ``e +
            data_epoch_offset``: fine-tuning starts after the baseline's epochs, so a streaming
            dataset (the synthetic default) gives it rows the baseline never saw.
        skip_nonfinite: skip (and count) a batch whose loss or dense gradient is NaN or
            infinite instead of stopping with an error.  A non-finite loss is caught before the
            backward pass, so nothing is updated; a non-finite gradient of a finite loss is
            caught before the dense step, but the fused table optimizer has already applied it.
        max_skipped_fraction: with ``skip_nonfinite``, an epoch that skips more than this
            fraction of its batches stops training with an error: what is left is not a model
            of the data (a non-finite value in a table makes every later batch non-finite).
    """

    epochs: int = 10
    batch_size: int = 1024
    lr: float = 1e-3
    sparse_lr: float = 0.05
    sparse_optimizer: str = "adagrad"
    patience: int = 2
    eval_batch_size: int = 8192
    data_epoch_offset: int = 0
    skip_nonfinite: bool = False
    max_skipped_fraction: float = 0.5

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


@dataclass
class Progress:
    """Where training stands; stored (JSON) in every training-state checkpoint.

    Args:
        epoch: the epoch in progress (or next to start).
        step: batches of ``epoch`` done; a resumed epoch skips them.
        loss_sum: this process's sum of ``epoch``'s training losses so far.
        best_auc / best_epoch: best validation AUC so far and its epoch (-1: the start weights).
        skipped: batches of ``epoch`` skipped for a non-finite loss or gradient.
        stale: epochs since the best one; ``stopped`` once it reached the patience.
        history: one dict per finished epoch.
        finished: training is over and the final (best) weights are in the checkpoint.
    """

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    skipped: int = 0
    best_auc: float = -math.inf
    best_epoch: int = -1
    stale: int = 0
    stopped: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = False

    def to_json(self) -> dict[str, Any]:
        """Every field, ``loss_sum`` gathered from all processes as ``loss_sums`` (collective)."""
        sums: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(sums, self.loss_sum)
        out = asdict(self)
        del out["loss_sum"]
        return {**out, "loss_sums": sums}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Progress":
        fields = {k: v for k, v in data.items() if k != "loss_sums"}
        return cls(**fields, loss_sum=data["loss_sums"][dist.get_rank()])


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: CTRDataset,
    config: TrainConfig,
    epoch: int,
    progress: Progress | None = None,
    after_step: Callable[[], None] | None = None,
) -> float:
    """One pass over this process's part of the train split; returns the mean training loss.

    With ``progress`` (a resumed epoch) the first ``progress.step`` batches are skipped: the batch
    order is a function of (seed, epoch) only.  ``after_step`` runs after every optimizer step.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    progress = progress if progress is not None else Progress(epoch=epoch)
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
    start = time.perf_counter()
    seen = 0
    batches = data.batches(
        "train", config.batch_size, rank, world, epoch=epoch + config.data_epoch_offset
    )
    for step, batch in enumerate(islice(batches, progress.step, None), start=progress.step):
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
            progress.skipped += 1
            progress.step += 1  # done (skipped): a resumed epoch does not redo it
            logger.warning("skipping %s", where)
            continue
        optimizer.step()
        # a float64 running sum (not a list of tensors): a checkpoint stores it exactly
        progress.step += 1
        value = loss.item()
        progress.loss_sum += value
        # Every rank's batches have nearly equal sizes: the global count is local × world.
        step_rows = batch.labels.numel() * world
        seen += step_rows
        bar.update(min(step_rows, total_rows - bar.n))
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        fault_point("train.step")
        if after_step is not None:
            after_step()
    bar.close()
    elapsed = time.perf_counter() - start
    if is_main():
        logger.info("epoch %d: %.0f examples/s", epoch, seen / max(elapsed, 1e-9))
        if progress.skipped:
            logger.warning(
                "epoch %d: skipped %d batches with a non-finite loss or gradient",
                epoch,
                progress.skipped,
            )
    if progress.skipped > config.max_skipped_fraction * progress.step:
        raise FloatingPointError(
            f"epoch {epoch}: skipped {progress.skipped} of {progress.step} batches for a "
            f"non-finite loss or gradient, more than {config.max_skipped_fraction:.0%} "
            "(TrainConfig.max_skipped_fraction): the data or the model is broken (a NaN or inf "
            "that reached a table makes every later batch non-finite); fix the data, or lower "
            "--lr / --sparse-lr, and train again"
        )
    counted = progress.step - progress.skipped
    local_mean = progress.loss_sum / counted if counted else float("nan")
    mean_loss = torch.tensor(local_mean, dtype=torch.float64)
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
    """AUC, logloss, normalized entropy (``ne``) and row count of ``split``.

    Every process predicts its rows; the metrics are computed from all of them, gathered (the
    same on every process, and the same for any number of processes).

    Raises:
        ValueError: every row of ``split`` has the same label (AUC is undefined).
        FloatingPointError: a prediction is NaN or infinite (the model's weights are not).
    """
    out = predict(model, data, split, batch_size)
    rows, positives = out["labels"].numel(), int(out["labels"].sum())
    if positives in (0, rows):
        raise ValueError(
            f"the {split} split's {rows} rows all have label {int(positives > 0)}: AUC needs "
            f"positive and negative labels; give the {split} split rows of both"
        )
    bad = int((~torch.isfinite(out["logits"])).sum())
    if bad:
        raise FloatingPointError(
            f"{bad} of the {rows} {split} predictions are NaN or infinite: the model's weights "
            "are not finite (a non-finite gradient reached a table?); no metrics are reported "
            "for it"
        )
    return {**ctr_metrics(out["logits"], out["labels"]), "rows": float(rows)}


def save_checkpoint(model: nn.Module, path: str, metadata: dict[str, Any], keep: int = 1) -> None:
    """Atomic, verified DCP checkpoint of the model weights (see :mod:`torchrec_compress.checkpoint`).

    The checkpoint reshards on load: it loads into a run with any number of processes and any
    sharding plan.  ``metadata`` (JSON) is stored with it; the checkpoint it replaces is kept
    as ``PATH.prev-1`` (``keep`` of them).
    """
    checkpoint.save({"model": model.state_dict()}, path, metadata, keep=keep)


def load_checkpoint(model: nn.Module, path: str, verify: bool = True) -> dict[str, Any]:
    """Load the weights of a checkpoint into ``model`` (resharding as needed); returns its metadata.

    The checkpoint is verified against its manifest (``verify=False``: the caller just did)
    and refused if a weight is not finite.  Loading unpickles DCP's ``.metadata``: load
    trusted checkpoints only.
    """
    state = {"model": model.state_dict()}
    metadata = checkpoint.load(state, path, verify_files=verify)
    model.load_state_dict(state["model"])
    return metadata


@dataclass
class CheckpointPolicy:
    """Where :func:`fit` keeps its checkpoints, how often, and whether it resumes.

    Args:
        directory: the training-state checkpoint (weights, optimizer state, RNG, progress),
            written at every epoch end; the best epoch's weights go to ``DIRECTORY_best``.
        every_steps: also write it every this many steps inside an epoch (0: epoch ends only).
        keep: how many earlier training-state checkpoints survive (``DIRECTORY.prev-N``).
        resume: continue from the newest complete checkpoint in ``directory`` if there is one.
    """

    directory: str
    every_steps: int = 0
    keep: int = 1
    resume: bool = False

    @property
    def best(self) -> str:
        return self.directory + "_best"


def training_state(model: nn.Module, optimizer: CombinedOptimizer) -> dict[str, Any]:
    """What a resumable checkpoint holds: weights, dense and fused optimizer state, torch RNG."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
    }


# metadata that must agree between a checkpoint and the run resuming it
_SAME_RUN_KEYS = ("dataset", "data_options", "seed", "world_size", "model", "compression")


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    current = json.loads(json.dumps(current, default=str))  # as stored: tuples become lists
    train_saved = {k: v for k, v in saved.get("train", {}).items() if k != "epochs"}
    train_now = {k: v for k, v in current.get("train", {}).items() if k != "epochs"}
    pairs = [(k, saved.get(k), current.get(k)) for k in _SAME_RUN_KEYS]
    for key, was, now in [*pairs, ("train", train_saved, train_now)]:
        if was != now:
            raise ValueError(
                f"cannot resume from {path!r}: it was written with {key}={was!r}, this run has "
                f"{key}={now!r} (run the same command, or use a new --out)"
            )


def _resume(
    model: nn.Module,
    optimizer: CombinedOptimizer,
    checkpoints: CheckpointPolicy,
    metadata: dict[str, Any],
) -> Progress | None:
    """Load the newest complete training-state checkpoint; ``None`` when there is none."""
    path = checkpoint.latest(checkpoints.directory)
    if path is None:
        if os.path.exists(checkpoints.directory) or checkpoint.previous(checkpoints.directory):
            checkpoint.verify(checkpoints.directory)  # raises, naming what is wrong
        return None
    if path != checkpoints.directory and is_main():
        logger.warning(
            "%s is incomplete or corrupted: resuming from %s", checkpoints.directory, path
        )
    _check_same_run(checkpoint.read_metadata(path), metadata, path)
    # Adam creates its state at the first step and DCP loads in place: create it (a zero-gradient
    # step, which moves no weight), then overwrite it
    for _, keyed in optimizer.optimizers:
        if not keyed.state:
            keyed.init_state()
    state = training_state(model, optimizer)
    saved = checkpoint.load(state, path, verify_files=False)  # latest() has just verified it
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    progress = Progress.from_json(saved["progress"])
    if is_main():
        logger.info("resumed from %s: epoch %d, step %d", path, progress.epoch, progress.step)
    return progress


def read_checkpoint_metadata(path: str) -> dict[str, Any]:
    """The ``metadata`` :func:`save_checkpoint` stored with a checkpoint (``{}`` if none), read
    before any model exists (its compression layout says how to build the model).

    The checkpoint is verified against its manifest first (collective), so nothing of a
    damaged checkpoint, DCP's pickled ``.metadata`` included, is read.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    checkpoint.verify(path)
    return checkpoint.read_metadata(path)


@dataclass
class FitResult:
    best_epoch: int
    best_val_auc: float
    epochs_run: int
    history: list[dict[str, float]]


@dataclass
class _Run:
    """One :func:`fit` call's fixed parts, so that its steps take one argument."""

    model: nn.Module
    optimizer: CombinedOptimizer
    data: CTRDataset
    config: TrainConfig
    checkpoints: CheckpointPolicy
    metadata: dict[str, Any]

    def save(self, progress: Progress) -> None:
        meta = {**self.metadata, "progress": progress.to_json()}
        state = training_state(self.model, self.optimizer)
        checkpoint.save(state, self.checkpoints.directory, meta, keep=self.checkpoints.keep)

    def save_best(self, epoch: int, val_auc: float) -> None:
        meta = {**self.metadata, "epoch": epoch, "val_auc": val_auc}
        save_checkpoint(self.model, self.checkpoints.best, meta, keep=0)


def _train_one_epoch(run: _Run, progress: Progress) -> None:
    """Train and validate ``progress.epoch``; checkpoint the best weights and the progress."""
    epoch, every = progress.epoch, run.checkpoints.every_steps

    def after_step() -> None:
        if every > 0 and progress.step % every == 0:
            run.save(progress)

    train_loss = train_epoch(
        run.model, run.optimizer, run.data, run.config, epoch, progress, after_step
    )
    val = evaluate(run.model, run.data, "val", run.config.eval_batch_size)
    progress.history.append(
        {"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()}}
    )
    if is_main():
        logger.info(
            "epoch %d: train loss %.5f  val AUC %.5f  val logloss %.5f  val NE %.5f",
            epoch,
            train_loss,
            val["auc"],
            val["logloss"],
            val["ne"],
        )
    if val["auc"] > progress.best_auc:
        progress.best_auc, progress.best_epoch, progress.stale = val["auc"], epoch, 0
        run.save_best(epoch, val["auc"])
    else:
        progress.stale += 1
        if progress.stale >= run.config.patience:
            if is_main():
                logger.info("early stop: no val AUC gain for %d epochs", progress.stale)
            progress.stopped = True
    progress.epoch, progress.step, progress.loss_sum, progress.skipped = epoch + 1, 0, 0.0, 0
    run.save(progress)


def fit(
    model: nn.Module,
    optimizer: CombinedOptimizer,
    data: CTRDataset,
    config: TrainConfig,
    checkpoints: CheckpointPolicy,
    metadata: dict[str, Any],
    start_auc: float | None = None,
) -> FitResult:
    """Train with early stopping on validation AUC; the best epoch's weights end up in ``model``.

    Everything needed to continue (weights, optimizer state, RNG, epoch, step, best AUC) is
    checkpointed in ``checkpoints.directory`` at every epoch end (and every
    ``checkpoints.every_steps`` steps); with ``checkpoints.resume`` a killed run continues from
    there and ends exactly as an uninterrupted one.  The best weights are kept in
    ``checkpoints.best`` and re-loaded at the end; the final checkpoint holds them.
    ``start_auc`` is the validation AUC of the weights training starts from (fine-tuning):
    they compete as epoch -1.
    """
    run = _Run(model, optimizer, data, config, checkpoints, {**metadata, "train": asdict(config)})
    progress = _resume(model, optimizer, checkpoints, run.metadata) if checkpoints.resume else None
    if progress is None:
        progress = Progress()
        if start_auc is not None:
            progress.best_auc = start_auc
            run.save_best(-1, start_auc)
    while not progress.finished and not progress.stopped and progress.epoch < config.epochs:
        _train_one_epoch(run, progress)
    if not progress.finished:
        last = len(progress.history) - 1
        if progress.best_epoch != last and (progress.best_epoch >= 0 or start_auc is not None):
            if is_main() and progress.best_epoch == -1:
                logger.info(
                    "no epoch beat the starting weights (val AUC %.5f): keeping them", start_auc
                )
            # a kill between the two renames of a save leaves the best weights in .prev-1
            load_checkpoint(model, checkpoint.latest(checkpoints.best) or checkpoints.best)
        progress.finished = True
        run.save(progress)
    return FitResult(
        progress.best_epoch, progress.best_auc, len(progress.history), progress.history
    )


def batches_of(data: CTRDataset, split: str, batch_size: int) -> Iterator[Batch]:
    """This process's batches of ``split`` (for calibration passes)."""
    return data.batches(split, batch_size, dist.get_rank(), dist.get_world_size())
