"""Train and evaluate a TorchRec DLRM / DLRM-DCN, sharded with DistributedModelParallel.

Runs as one process (``python -m examples.dlrm.main ...``) or many (``torchrun --nproc_per_node 2
-m examples.dlrm.main ...`` or the torchx component in ``launchers/components.py``): gloo on CPU,
nccl on GPU.  Prints a progress bar with examples/s, validation AUC, logloss and normalized
entropy (NE) per epoch (early stopping on the AUC), and finally one ``RESULT {json}`` line with
validation and test AUC / logloss / NE (``examples.dlrm.metrics``).

Example::

    python -m examples.dlrm.main --dataset synthetic --epochs 2 --out runs/demo
    # killed? the same command with --resume continues from runs/demo's last good checkpoint
    python -m examples.dlrm.main --dataset synthetic --epochs 2 --out runs/demo --resume
    python -m examples.dlrm.main --dataset frappe --data-path ../shared/data/frappe \
        --embedding-dim 16 --out runs/frappe
"""

# ruff: noqa: E402 - the launcher watch below comes before the other imports
from examples.dlrm.lifetime import end_with_launcher

# first, before the seconds torch takes to import: a torchrun killed meanwhile ends this worker too
end_with_launcher()

import argparse
import datetime
import json
import logging
import os
import socket
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel

from examples.dlrm.compression import (
    NOT_FINETUNED,
    add_arguments,
    checkpoint_layout,
    compress_model,
    default_finetune_epochs,
    finetune,
    report_dict,
    stage_configs,
)
from examples.dlrm.model import ARCHS, ModelConfig, build_model
from examples.dlrm.train import (
    SPARSE_OPTIMIZERS,
    CheckpointPolicy,
    TrainConfig,
    attach_sparse_optimizer,
    build_optimizer,
    evaluate,
    fit,
    is_main,
    load_checkpoint,
    save_checkpoint,
)
from torchrec_compress import locking
from torchrec_compress.config import CompressionConfig
from torchrec_compress.data import DATASETS, CTRDataset, get_dataset
from torchrec_compress.data.schema import rank_batch_bounds
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.faults import fault_point
from torchrec_compress.layout import compression_layout, restore_layout_

logger = logging.getLogger("examples.dlrm")

# How long a collective waits for a peer before it raises (torch's default is 30 minutes):
# long enough for the slowest one-process phase (checkpoint writes, a table's MEC training on
# its lead process), short enough that a frozen or lost peer ends the job.
DEFAULT_PG_TIMEOUT_S = 600.0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _option(text: str) -> Any:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--data-opt expects KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    if "," in value:
        return key, [float(v) if "." in v else int(v) for v in value.split(",")]
    return key, value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=list(DATASETS), default="synthetic")
    p.add_argument(
        "--data-path",
        default=None,
        help="frappe: dir with valid.libsvm/test.libsvm; criteo, parquet: parquet dir "
        "(parquet also needs --data-opt columns=COLUMNS.json)",
    )
    p.add_argument(
        "--data-opt",
        type=_option,
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="dataset options for get_dataset, e.g. --data-opt train_rows=100000 val_rows=10000 "
        "(one flag, several pairs: torchx rejects repeated flags)",
    )
    p.add_argument("--arch", choices=list(ARCHS), default="dlrm")
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument(
        "--dense-arch", type=_ints, default=[128], help="bottom MLP hidden sizes, e.g. 512,256"
    )
    p.add_argument("--over-arch", type=_ints, default=[400, 400, 400], help="top MLP hidden sizes")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1024, help="per process")
    p.add_argument("--eval-batch-size", type=int, default=8192, help="per process")
    p.add_argument("--lr", type=float, default=1e-3, help="dense Adam learning rate")
    p.add_argument("--sparse-lr", type=float, default=0.05)
    p.add_argument("--sparse-optimizer", choices=sorted(SPARSE_OPTIMIZERS), default="adagrad")
    p.add_argument("--patience", type=int, default=2)
    p.add_argument(
        "--sharding-type",
        default=None,
        help="force table_wise|column_wise|row_wise|table_row_wise|data_parallel (default: planner)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads per process (0: cores / processes)"
    )
    p.add_argument("--out", default="runs/dlrm", help="output dir: checkpoint/, result.json")
    p.add_argument(
        "--load-checkpoint",
        default=None,
        help="DCP checkpoint dir whose weights the run starts from (fresh optimizers, epoch 0; "
        "to continue a run use --resume). Loading runs the checkpoint's pickled metadata: "
        "trusted checkpoints only",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT's newest complete checkpoints (re-run the same command with it)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="also checkpoint every N training steps (0: at epoch ends only)",
    )
    p.add_argument(
        "--keep-checkpoints",
        type=int,
        default=1,
        help="earlier checkpoints kept beside OUT/checkpoint (checkpoint.prev-1, ...)",
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="with --load-checkpoint: do not train the baseline (evaluate it, or compress it)",
    )
    p.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip and count batches with a NaN/inf loss or gradient (default: stop with an error)",
    )
    p.add_argument(
        "--pg-timeout",
        type=float,
        default=DEFAULT_PG_TIMEOUT_S,
        help="seconds a collective waits for a frozen or lost peer before the job fails",
    )
    add_arguments(p)
    args = p.parse_args(argv)
    if args.finetune_epochs is None:
        args.finetune_epochs = default_finetune_epochs(args.dataset, dict(args.data_opt))
    return args


def init_distributed(timeout_s: float = DEFAULT_PG_TIMEOUT_S) -> torch.device:
    """Join the torchrun/torchx process group, or make a 1-process one.

    Args:
        timeout_s: the process group's timeout: a collective waiting longer for a peer raises.
    """
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def quiet_torchrec() -> None:
    """TorchRec's planner warns about every CPU topology; keep the console for our own output."""
    warnings.filterwarnings("ignore", module=r"torchrec\..*")
    warnings.filterwarnings("ignore", module=r"torch\.distributed\..*")
    for name in ("torchrec", "torch.distributed", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_sharded_model(
    data: CTRDataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[DistributedModelParallel, list[CompressionConfig]]:
    """The DMP model to train or evaluate, and the compression configs already applied to it.

    With ``--load-checkpoint`` of a compressed run, the checkpoint's compression layout rebuilds
    the compressed modules before sharding (the weights are loaded later).
    """
    layout = checkpoint_layout(args.load_checkpoint) if args.load_checkpoint else None
    model = build_model(data.schema, model_config, torch.device("meta"))
    if layout:
        restore_layout_(model, layout, quantized_device=device)
    attach_sparse_optimizer(model, train_config)
    sharded = shard_model(model, device, sharding_type=args.sharding_type)
    return sharded, list(layout.configs) if layout else []


def checkpoint_policy(args: argparse.Namespace, name: str) -> CheckpointPolicy:
    """Where the training stage ``name`` checkpoints under ``--out``."""
    return CheckpointPolicy(
        directory=os.path.join(args.out, name),
        every_steps=args.checkpoint_every,
        keep=args.keep_checkpoints,
        resume=args.resume,
    )


def baseline_checkpoint(args: argparse.Namespace) -> str:
    """The baseline's training-state checkpoint under ``--out``: ``checkpoint``, or, when the
    run compresses, ``checkpoint_baseline`` (``checkpoint`` then receives the final compressed
    model, and ``--resume`` must still find the baseline's state)."""
    return "checkpoint_baseline" if args.compress else "checkpoint"


def written_checkpoints(args: argparse.Namespace) -> list[str]:
    """The checkpoints this run writes under ``--out``."""
    written = [] if args.eval_only else [baseline_checkpoint(args)]
    if args.compress:
        methods = args.compress.split("+")
        written += ["checkpoint", "compressed_init", *(f"compressed_{m}" for m in methods[:-1])]
        if args.finetune_epochs > 0:
            written.append("checkpoint_compressed")
    return written


def check_not_overwritten(args: argparse.Namespace) -> None:
    """Refuse a run whose own checkpoints would replace the one it starts from (``--resume``
    continues that checkpoint's run instead)."""
    if not args.load_checkpoint or args.resume:
        return
    source = os.path.realpath(args.load_checkpoint)
    name = os.path.basename(source)
    for stage in written_checkpoints(args):
        # the stage's checkpoint, its _best weights and its .prev-N predecessors
        if os.path.dirname(source) == os.path.realpath(args.out) and (
            name in (stage, f"{stage}_best") or name.startswith(f"{stage}.prev-")
        ):
            raise SystemExit(
                f"--load-checkpoint {args.load_checkpoint} is one of the checkpoints this run "
                f"writes in --out {args.out}, so the run would replace it: pass --resume to "
                "continue that run, or another --out"
            )


def check_same_flags(args: argparse.Namespace) -> None:
    """Refuse processes started with different flags (collective): e.g. another ``--seed`` on
    one process trains on other rows there and ends in a result nobody asked for."""
    world = dist.get_world_size()
    mine = json.loads(json.dumps(vars(args), default=str))
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    differing = sorted(k for k in mine if any(flags.get(k) != every[0].get(k) for flags in every))
    if differing:
        details = "; ".join(
            f"--{key.replace('_', '-')}: "
            + ", ".join(f"{flags.get(key)!r} on process {r}" for r, flags in enumerate(every))
            for key in differing
        )
        raise SystemExit(
            f"the {world} processes were started with different flags ({details}): start "
            "every process with the same command"
        )


def check_splits(data: CTRDataset, args: argparse.Namespace, world: int) -> None:
    """Refuse, before anything runs, a split the run needs that cannot give a result: an empty
    train split, a val or test split of fewer than 2 rows (AUC needs a positive and a negative
    label), or one too small for every process to get its batches."""
    needed = {"val": args.eval_batch_size, "test": args.eval_batch_size}
    if not args.eval_only or args.compress:  # training, calibration and fine-tuning read train
        needed = {"train": args.batch_size, **needed}
    where = f"--dataset {args.dataset}" + (
        f" --data-path {args.data_path}" if args.data_path else ""
    )
    for split, batch_size in needed.items():
        rows = data.num_rows(split)
        least = 1 if split == "train" else 2
        if rows < least:
            why = "nothing to train on" if split == "train" else "AUC needs both labels"
            fix = (
                f"--data-opt {split}_rows=N"
                if args.dataset == "synthetic"
                else "the files under --data-path and --data-opt split_fractions"
            )
            raise SystemExit(
                f"the {split} split of {where} has {rows} rows, it needs at least {least} "
                f"({why}): check {fix}"
            )
        for rank in range(world):
            rank_batch_bounds(rows, batch_size, rank, world, split)  # raises, naming the split


def load_dataset(args: argparse.Namespace) -> CTRDataset:
    """``get_dataset`` from the flags; a bad ``--data-opt`` (e.g. an unknown key: the error lists
    the valid ones) ends the run with the message instead of a traceback."""
    try:
        return get_dataset(args.dataset, path=args.data_path, seed=args.seed, **dict(args.data_opt))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--dataset {args.dataset} --data-opt: {e}") from e


def train_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, TrainConfig]:
    """Model, training and fine-tuning settings from the flags (``run`` and the sweep)."""
    model_config = ModelConfig(
        arch=args.arch,
        embedding_dim=args.embedding_dim,
        dense_arch=args.dense_arch,
        over_arch=args.over_arch,
    )
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        sparse_lr=args.sparse_lr,
        sparse_optimizer=args.sparse_optimizer,
        patience=args.patience,
        eval_batch_size=args.eval_batch_size,
        skip_nonfinite=args.skip_nonfinite,
    )
    # the retrain protocol trains re-initialised MLPs: the baseline's learning rates
    lr_scale = args.finetune_lr_scale if args.finetune_protocol == "continue" else 1.0
    finetune_config = replace(
        train_config,
        epochs=args.finetune_epochs,
        lr=args.lr * lr_scale,
        sparse_lr=args.sparse_lr * lr_scale,
        # after the baseline's (at most --epochs) epochs: fresh rows on streaming data
        data_epoch_offset=train_config.epochs,
    )
    return model_config, train_config, finetune_config


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole pipeline (train, compress, fine-tune, evaluate), holding ``--out``'s lock."""
    device = init_distributed(args.pg_timeout)
    check_same_flags(args)
    with locking.lock_directory(args.out):
        return _pipeline(args, device)


def _pipeline(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    world = dist.get_world_size()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(args.seed)
    data = load_dataset(args)
    model_config, train_config, _ = train_configs(args)
    if args.eval_only and not args.load_checkpoint:
        raise SystemExit("--eval-only needs --load-checkpoint")
    check_not_overwritten(args)
    check_splits(data, args, world)
    model, configs = build_sharded_model(data, model_config, train_config, args, device)
    if is_main():
        logger.info("dataset %s: %s", args.dataset, data.schema)
        logger.info("plan:\n%s", model.plan)
    metadata = {
        "model": asdict(model_config),
        "dataset": args.dataset,
        "data_options": dict(args.data_opt),
        "seed": args.seed,
        "world_size": world,
        "compression_layout": compression_layout(model, configs).to_dict(),
    }
    result: dict[str, Any] = {
        "dataset": args.dataset,
        "world_size": world,
        "seed": args.seed,
        "model": asdict(model_config),
    }
    if args.load_checkpoint:  # build_sharded_model verified it, reading its layout
        load_checkpoint(model, args.load_checkpoint, verify=False)
    if not args.eval_only:
        optimizer = build_optimizer(model, train_config)
        policy = checkpoint_policy(args, baseline_checkpoint(args))
        fitted = fit(model, optimizer, data, train_config, policy, metadata)
        result.update(
            best_epoch=fitted.best_epoch, epochs_run=fitted.epochs_run, history=fitted.history
        )
    if args.compress:
        model = _compress(model, data, configs, metadata, result, args, device)
    fault_point("final.evaluate")
    for split in ("val", "test"):
        result[split] = evaluate(model, data, split, train_config.eval_batch_size)
    if is_main():
        # written whole or not at all: a kill leaves no half file
        tmp = os.path.join(args.out, "result.json.tmp")
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, os.path.join(args.out, "result.json"))
        summary = {k: result[k] for k in ("dataset", "world_size", "val", "test")}
        if args.compress:
            before = result["compression"]["before_finetune"]["test"]
            summary["baseline_test_auc"] = result["baseline"]["test"]["auc"]
            summary["before_finetune_test_auc"] = before["auc"]
            summary["baseline_test_ne"] = result["baseline"]["test"]["ne"]
            summary["before_finetune_test_ne"] = before["ne"]
            summary["compression_ratio"] = result["compression"]["report"]["ratio"]
        print("RESULT " + json.dumps(summary), flush=True)
    return result


def _compress(
    model: DistributedModelParallel,
    data: CTRDataset,
    configs: list[CompressionConfig],
    metadata: dict[str, Any],
    result: dict[str, Any],
    args: argparse.Namespace,
    device: torch.device,
) -> nn.Module:
    """Evaluate the baseline, compress, evaluate, fine-tune and save the final model; fills
    ``result`` and ``configs``, returns the final model.  An int4
    model (unsharded: torchrec 1.8 cannot checkpoint its rows) is neither fine-tuned nor saved."""
    model_config, train_config, finetune_config = train_configs(args)
    result["baseline"] = {
        split: evaluate(model, data, split, train_config.eval_batch_size)
        for split in ("val", "test")
    }
    fault_point("compress.begin")
    compressed, report, config = compress_model(
        model, data, model_config, finetune_config, args, device, args.out
    )
    sharded = isinstance(compressed, DistributedModelParallel)
    configs += stage_configs(config)
    metadata = {
        **metadata,
        "compression": config.to_dict(),
        "compression_layout": compression_layout(compressed, configs).to_dict(),
    }
    if is_main():
        logger.info("compressed with %s:\n%s", config, report)
        if sharded:
            logger.info("compressed plan:\n%s", compressed.plan)
    result["compression"] = {
        "method": args.compress,
        "finetune_protocol": args.finetune_protocol,
        "config": config.to_dict(),
        "report": report_dict(report),
        "before_finetune": {
            split: evaluate(compressed, data, split, train_config.eval_batch_size)
            for split in ("val", "test")
        },
    }
    if not sharded:
        result["compression"]["note"] = NOT_FINETUNED + "; not saved"
        if is_main():
            logger.warning("%s: %s", args.compress, result["compression"]["note"])
        return compressed
    if finetune_config.epochs > 0:
        fitted = finetune(
            compressed,
            data,
            finetune_config,
            checkpoint_policy(args, "checkpoint_compressed"),
            {**metadata, "compression": result["compression"]["config"]},
            args,
            start_auc=result["compression"]["before_finetune"]["val"]["auc"],
        )
        result["compression"]["finetune_history"] = fitted.history
    # OUT/checkpoint holds the run's final model: the compressed (and fine-tuned) one; the
    # baseline's training state stays in OUT/checkpoint_baseline for --resume
    save_checkpoint(compressed, os.path.join(args.out, "checkpoint"), metadata)
    return compressed


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr, force=True
    )
    # Our own progress at INFO; torchrec / fbgemm log every TBE they build at INFO.
    for name in ("examples", "torchrec_compress"):
        logging.getLogger(name).setLevel(logging.INFO)
    quiet_torchrec()
    args = parse_args(argv)
    try:
        run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
