r"""Compression sweep: one trained checkpoint, a grid of methods x sizes, a table, a JSON and a plot.

Every grid point starts from the same baseline: the checkpoint is loaded into a fresh sharded
DLRM (``DistributedModelParallel``), compressed with ``torchrec_compress.compress_`` (one call per
stage; ``report.reshard`` re-plans and re-shards after each), evaluated on val/test, fine-tuned
(``--finetune-epochs``: 1 on the streaming synthetic default, 0 elsewhere, where it never paid;
the compressed weights compete as "epoch -1", as in
``examples.dlrm.main``; ``--finetune-protocol retrain``: the MEC paper's protocol, MLPs
re-initialised and trained again on the frozen codes) and evaluated again.  Row-wise int4 / int2
points are compressed unsharded and not fine-tuned (torchrec 1.8 cannot checkpoint their rows,
which the DMP route and fine-tuning need); their status says so.  A point that raises is
recorded as failed, with its error, and the sweep goes on.  Takes the data and model flags of ``examples.dlrm.main`` (and its
compression flags as defaults: ``--mec-steps``, ``--calibration-batches``, ...); runs on one
process or many (``torchrun``).

Writes to ``--out``: ``sweep.json`` (every point, baseline, command), ``sweep.md`` (the table) and
``sweep.png`` (test AUC and test logloss after fine-tuning against embedding bytes, log scale,
Pareto front marked, baseline as a line).  Embedding bytes are the compression report's bytes
after compression, tables only (codes, codebooks, factor tables, projections and means of the
compressed tables; MLPs are not counted).

``--baselines hash,qr`` also trains DLRMs small from scratch (``examples.dlrm.baselines``: the
hashing trick; quotient-remainder embeddings) at each distinct size of the grid, or at
``--baseline-ratios``, like the baseline (``--epochs``, ``--patience``, optimizers, seed), and adds
them as points of their own.

The grid (``--grid``): points separated by ``;``; a point is a method, then ``:name=v1,v2,...``
parameters whose value lists are crossed.  Methods: ``afm``, ``svd`` (``rank``), ``mec``, ``pq``
(``M`` subspaces, ``K`` centroids), ``int8``, ``int4``, ``int2``, ``fp16`` (TorchRec's row-wise
quantization), ``budget`` (``ratio``: ``torchrec_compress.BudgetConfig`` at the baseline's bytes /
ratio, the best option per table; one process: a plain copy is compressed, then loaded sharded),
and stages joined by ``+`` (``afm+mec``: AFM, then MEC of the factor tables).  Or a JSON file: a list
of objects such as ``{"method": "afm+mec", "rank": 8, "M": 4}``.

Example::

    python -m examples.dlrm.main --dataset synthetic --epochs 2 --out runs/syn
    python -m examples.dlrm.sweep --dataset synthetic --load-checkpoint runs/syn/checkpoint \
        --grid "afm:rank=4,8;mec:M=4,8:K=256;afm+mec:rank=8:M=4;int8" --out runs/syn_sweep
"""

import argparse
import itertools
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from tqdm import tqdm

from examples.dlrm.baselines import COMBINES, KINDS, stored_bytes, train_small
from examples.dlrm.compression import (
    NOT_FINETUNED,
    compress_stages,
    compress_within_budget,
    embedding_bytes,
    finetune,
    make_config,
    report_dict,
    unshardable,
)
from examples.dlrm.main import (
    init_distributed,
    load_dataset,
    parse_args,
    quiet_torchrec,
    train_configs,
)
from examples.dlrm.model import ModelConfig, build_model
from examples.dlrm.sweep_report import default_title, human_bytes, write_outputs
from examples.dlrm.train import (
    CheckpointPolicy,
    TrainConfig,
    attach_sparse_optimizer,
    evaluate,
    is_main,
    load_checkpoint,
)
from torchrec_compress import CompressionReport, RowWiseQuantConfig
from torchrec_compress.config import CompressionConfig
from torchrec_compress.data import CTRDataset
from torchrec_compress.distributed.planning import shard_model

logger = logging.getLogger("examples.dlrm.sweep")

DEFAULT_GRID = (
    "afm:rank=2,4,8;svd:rank=2,4,8;mec:M=4,8;pq:M=4,8;afm+mec:rank=8:M=2,4;int8;int4;int2"
)
# stage -> the grid parameters it reads
STAGE_PARAMS = {
    "afm": ("rank",),
    "svd": ("rank",),
    "mec": ("M", "K"),
    "pq": ("M", "K"),
    "int8": (),
    "int4": (),
    "int2": (),
    "fp16": (),
    "budget": ("ratio",),
}
SPLITS = ("val", "test")


@dataclass(frozen=True)
class GridPoint:
    """One compression of the sweep: stages joined by ``+`` and their integer parameters.

    Args:
        method (str): e.g. ``"afm"``, ``"afm+mec"``, ``"int8"``.
        params (Dict[str, int]): ``rank`` (afm/svd), ``M`` and ``K`` (mec/pq).

    Example::

        >>> GridPoint("afm+mec", {"rank": 8, "M": 4}).label
        'afm+mec rank=8 M=4'
    """

    method: str
    params: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return " ".join([self.method, *(f"{k}={v}" for k, v in self.params.items())])

    @property
    def slug(self) -> str:
        """A file-name-safe label."""
        return self.label.replace("+", "_").replace(" ", "_").replace("=", "")


def _check_point(point: GridPoint) -> GridPoint:
    stages = point.method.split("+")
    unknown = [s for s in stages if s not in STAGE_PARAMS]
    if unknown:
        raise ValueError(
            f"grid point {point.label!r}: unknown method {unknown[0]!r}; "
            f"choose stages from {sorted(STAGE_PARAMS)} joined by '+'"
        )
    if "budget" in stages and len(stages) > 1:
        raise ValueError(f"grid point {point.label!r}: budget is a point of its own, not a stage")
    read = {p for s in stages for p in STAGE_PARAMS[s]}
    for name, value in point.params.items():
        if name not in read:
            raise ValueError(
                f"grid point {point.label!r}: parameter {name!r} is not read by "
                f"{point.method!r} (it reads {sorted(read) or 'nothing'})"
            )
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"grid point {point.label!r}: {name} must be an int, got {value!r}")
    return point


def parse_grid(text: str) -> list[GridPoint]:
    """The points of a grid string; ``name=v1,v2`` lists of one point are crossed.

    Args:
        text (str): e.g. ``"afm:rank=2,4;mec:M=4,8:K=256;afm+mec:rank=8:M=4;int8"``.

    Example::

        >>> [p.label for p in parse_grid("afm:rank=2,4;mec:M=4:K=16,256;int8")]
        ['afm rank=2', 'afm rank=4', 'mec M=4 K=16', 'mec M=4 K=256', 'int8']
    """
    points: list[GridPoint] = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        method, *assignments = entry.split(":")
        names, values = [], []
        for assignment in assignments:
            name, sep, value = assignment.partition("=")
            try:
                values.append([int(v) for v in value.split(",")])
            except ValueError:
                sep = ""
            if not sep:
                raise ValueError(
                    f"grid entry {entry!r}: expected name=INT[,INT...], got {assignment!r}"
                )
            names.append(name.strip())
        for combo in itertools.product(*values):
            points.append(
                _check_point(GridPoint(method.strip(), dict(zip(names, combo, strict=True))))
            )
    if not points:
        raise ValueError(f"grid {text!r} has no points")
    return points


def load_grid(spec: str) -> list[GridPoint]:
    """A grid string, or the path of a JSON file holding a list of ``{"method": ..., params}``."""
    if spec.endswith(".json"):
        with open(spec) as f:
            entries = json.load(f)
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"grid file {spec}: expected a non-empty JSON list of points")
        return [
            _check_point(GridPoint(e["method"], {k: v for k, v in e.items() if k != "method"}))
            for e in entries
        ]
    return parse_grid(spec)


def stage_configs(
    point: GridPoint, args: argparse.Namespace, total_bytes: int
) -> list[CompressionConfig]:
    """The config of each stage of ``point``; flags of ``examples.dlrm.main`` fill the rest."""
    configs: list[CompressionConfig] = []
    for stage in point.method.split("+"):
        if stage.startswith("int") or stage == "fp16":
            configs.append(RowWiseQuantConfig(bits=16 if stage == "fp16" else int(stage[3:])))
            continue
        rank = point.params.get("rank", args.rank)
        if stage in ("afm", "svd") and rank is None:
            raise ValueError(f"grid point {point.label!r}: {stage} needs rank= (or --rank)")
        flags = argparse.Namespace(
            **{
                **vars(args),
                "rank": rank,
                "explained_variance": None,
                "budget_ratio": None,
                "keep_embeddings": False,
                "compress_linear": False,
                "subspaces": point.params.get("M", args.subspaces),
                "centroids": point.params.get("K", args.centroids),
            }
        )
        configs.append(make_config(flags, total_bytes, stage))
    return configs


@dataclass
class SweepContext:
    """What every grid point shares: data, configs, the parsed flags, the device."""

    args: argparse.Namespace
    data: CTRDataset
    model_config: ModelConfig
    train_config: TrainConfig
    finetune_config: TrainConfig
    device: torch.device


def load_baseline(ctx: SweepContext) -> DistributedModelParallel:
    """A fresh sharded DLRM holding the checkpoint's weights."""
    model = build_model(ctx.data.schema, ctx.model_config, torch.device("meta"))
    attach_sparse_optimizer(model, ctx.train_config)
    model = shard_model(model, ctx.device, sharding_type=ctx.args.sharding_type)
    load_checkpoint(model, ctx.args.load_checkpoint)
    return model


def load_baseline_unsharded(ctx: SweepContext) -> torch.nn.Module:
    """The checkpoint's DLRM as a plain module on this process (the whole model on each)."""
    model = build_model(ctx.data.schema, ctx.model_config, torch.device("cpu"))
    load_checkpoint(model, ctx.args.load_checkpoint)
    return model


def evaluate_splits(model: torch.nn.Module, ctx: SweepContext) -> dict[str, dict[str, float]]:
    return {s: evaluate(model, ctx.data, s, ctx.train_config.eval_batch_size) for s in SPLITS}


def compress_point(
    point: GridPoint, ctx: SweepContext, work_dir: str
) -> tuple[torch.nn.Module, CompressionReport, list[CompressionConfig], bool]:
    """A fresh baseline compressed by ``point``'s stages: the model, its report, the configs and
    whether it ran unsharded (int4 / int2 rows)."""
    total = embedding_bytes(ctx.data.schema.num_embeddings, ctx.model_config.embedding_dim)
    configs = stage_configs(point, ctx.args, total)
    local = unshardable(configs)
    if (
        local
        and dist.get_world_size() > 1
        and not all(isinstance(c, RowWiseQuantConfig) for c in configs)
    ):
        raise ValueError(
            f"{point.label}: int4/int2 run unsharded, and on {dist.get_world_size()} processes "
            "each would calibrate its earlier stages on its own data; run this point on 1 process"
        )
    model: torch.nn.Module = load_baseline_unsharded(ctx) if local else load_baseline(ctx)
    stage_dirs = [os.path.join(work_dir, f"stage{i}") for i in range(len(configs))]
    model, report = compress_stages(
        model,
        configs,
        ctx.data,
        ctx.finetune_config,
        ctx.args,
        ctx.device,
        stage_dirs,
        reshard=not local,
    )
    return model, report, list(configs), local


def compress_budget_point(
    point: GridPoint, ctx: SweepContext, work_dir: str
) -> tuple[torch.nn.Module, CompressionReport, list[CompressionConfig], bool]:
    """``budget ratio=R``: the example's ``--compress budget --budget-ratio R`` on a fresh
    plain baseline (one process), then loaded sharded, so it fine-tunes."""
    flags = argparse.Namespace(
        **{**vars(ctx.args), "compress": "budget", "budget_ratio": point.params["ratio"]}
    )
    model, report, applied = compress_within_budget(
        load_baseline_unsharded(ctx),
        ctx.data,
        ctx.model_config,
        ctx.finetune_config,
        flags,
        ctx.device,
        work_dir,
    )
    return model, report, [applied.budget, *applied.stages], False


def run_point(point: GridPoint, ctx: SweepContext, work_dir: str) -> dict[str, Any]:
    """Compress a fresh baseline as ``point`` says, evaluate, fine-tune, evaluate again."""
    start = time.perf_counter()
    if point.method == "budget":
        model, report, configs, local = compress_budget_point(point, ctx, work_dir)
    else:
        model, report, configs, local = compress_point(point, ctx, work_dir)
    tables = [r for r in report.rows if r.kind == "table"]
    result: dict[str, Any] = {
        "configs": [c.to_dict() for c in configs],
        "bytes": sum(r.bytes_after for r in tables),
        "bytes_before": sum(r.bytes_before for r in tables),
        "report": report_dict(report),
        "kept_tables": sum(r.method == "kept" for r in tables),
        "before_finetune": evaluate_splits(model, ctx),
    }
    if local:
        result["note"] = NOT_FINETUNED
    if ctx.finetune_config.epochs > 0 and not local:
        fitted = finetune(
            model,
            ctx.data,
            ctx.finetune_config,
            CheckpointPolicy(os.path.join(work_dir, "finetune"), keep=0),
            {"sweep_point": point.label},
            ctx.args,
            start_auc=result["before_finetune"]["val"]["auc"],
        )
        result["finetune_history"] = fitted.history
        result["after_finetune"] = evaluate_splits(model, ctx)
    else:
        result["after_finetune"] = result["before_finetune"]
    result["seconds"] = time.perf_counter() - start
    return result


def parse_sweep_args(
    argv: Sequence[str] | None = None,
) -> tuple[argparse.Namespace, list[GridPoint]]:
    """The sweep's own flags, then every flag of ``examples.dlrm.main`` (with sweep defaults:
    ``--rank-multiple 1``, ``--out runs/sweep``; ``--finetune-epochs`` as there: 1 on the
    streaming synthetic default, else 0)."""
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other flag goes to examples.dlrm.main (python -m examples.dlrm.main --help).",
    )
    p.add_argument(
        "--grid", default=DEFAULT_GRID, help=f"grid string or JSON file ({DEFAULT_GRID})"
    )
    p.add_argument("--title", default=None, help="plot title (default: dataset and d)")
    p.add_argument(
        "--baselines",
        type=_kinds,
        default=[],
        help="also train DLRMs small from scratch at equal bytes, like the baseline (its --epochs, "
        "--patience, optimizers): 'hash' (hashing trick), 'qr' (quotient-remainder), or "
        "'hash,qr'; one per --baseline-ratios, else one per distinct size of the grid",
    )
    p.add_argument(
        "--baseline-ratios",
        type=lambda t: [float(x) for x in t.split(",") if x],
        default=[],
        help="sizes of the --baselines as fp32 table bytes / RATIO, e.g. 4,16,64",
    )
    p.add_argument(
        "--qr-combine",
        choices=COMBINES,
        default="mult",
        help="qr: multiply (default; 0.007-0.016 test AUC above sum on Frappe d=16) or add the "
        "quotient and remainder vectors",
    )
    p.add_argument(
        "--keep-work", action="store_true", help="keep each point's checkpoints in OUT/points"
    )
    p.add_argument(
        "--replot",
        metavar="OUT",
        default=None,
        help="only redraw OUT/sweep.md and OUT/sweep.png from OUT/sweep.json (no other flag needed)",
    )
    own, rest = p.parse_known_args(argv)
    if own.replot:
        return own, []
    defaults = ["--rank-multiple", "1", "--out", "runs/sweep"]
    args = parse_args([*defaults, *rest])
    if not args.load_checkpoint:
        p.error("--load-checkpoint is required (train one with python -m examples.dlrm.main)")
    if args.compress:
        p.error("--compress: the sweep takes its methods from --grid")
    for name, value in vars(own).items():
        setattr(args, name, value)
    if not args.grid.strip() and args.baselines and args.baseline_ratios:
        return args, []  # the trained-small baselines only
    return args, load_grid(args.grid)


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baseline {unknown[0]!r}; choose from {KINDS}")
    return kinds


def run(args: argparse.Namespace, grid: list[GridPoint]) -> dict[str, Any]:
    """Evaluate the baseline, then every grid point; rank 0 rewrites the outputs after each."""
    device = init_distributed(args.pg_timeout)
    world = dist.get_world_size()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    data = load_dataset(args)
    model_config, train_config, finetune_config = train_configs(args)
    ctx = SweepContext(args, data, model_config, train_config, finetune_config, device)
    os.makedirs(args.out, exist_ok=True)
    sweep: dict[str, Any] = {
        "title": args.title
        or default_title(args.dataset, args.data_path, args.arch, args.embedding_dim),
        "command": " ".join(sys.argv),
        "dataset": args.dataset,
        "world_size": world,
        "model": asdict(model_config),
        "finetune": asdict(finetune_config),
        "finetune_protocol": args.finetune_protocol,
        "checkpoint": args.load_checkpoint,
        "bytes_note": "compression report bytes after compression, embedding tables only",
        "grid": [p.label for p in grid],
        "baseline": {
            "bytes": embedding_bytes(data.schema.num_embeddings, model_config.embedding_dim),
            **evaluate_splits(load_baseline(ctx), ctx),
        },
        "points": [],
    }
    bar = tqdm(grid, desc="sweep", unit="point", disable=not is_main(), dynamic_ncols=True)
    for point in bar:
        bar.set_postfix_str(point.label)
        entry = {"label": point.label, "method": point.method, "params": point.params}
        work_dir = os.path.join(args.out, "points", point.slug)
        _record(sweep, entry, partial(run_point, point, ctx, work_dir), work_dir, args)
    for kind, target in baseline_runs(args, sweep):
        ratio = sweep["baseline"]["bytes"] / target
        entry = {"label": f"{kind} {ratio:.1f}x", "method": kind, "params": {}}
        work_dir = os.path.join(args.out, "points", f"{kind}_{target}")
        compute = partial(run_trained_small, kind, target, ctx, work_dir)
        _record(sweep, entry, compute, work_dir, args)
    if is_main() and not args.keep_work:
        shutil.rmtree(os.path.join(args.out, "points"), ignore_errors=True)
    return sweep


def _record(
    sweep: dict[str, Any],
    entry: dict[str, Any],
    compute: Callable[[], dict[str, Any]],
    work_dir: str,
    args: argparse.Namespace,
) -> None:
    """Run one point (a failure is recorded with its error, the sweep goes on), add it to
    ``sweep`` and, on rank 0, rewrite the outputs."""
    torch.manual_seed(args.seed)
    try:
        entry.update(status="ok", **compute())
    except Exception as e:  # a failed point is recorded, the sweep goes on
        logger.warning("point %s failed", entry["label"], exc_info=True)
        entry.update(status="failed", error=f"{type(e).__name__}: {e}")
    sweep["points"].append(entry)
    dist.barrier()
    if is_main():
        if not args.keep_work:
            shutil.rmtree(work_dir, ignore_errors=True)
        write_outputs(sweep, args.out)
        logger.info("%s: %s", entry["label"], _summary(entry))


def baseline_runs(args: argparse.Namespace, sweep: dict[str, Any]) -> list[tuple[str, int]]:
    """``(kind, target bytes)`` of every trained-small baseline ``--baselines`` asks for: at
    ``--baseline-ratios`` (the fp32 tables' bytes / ratio), else at each distinct size of the
    grid's points that ran, largest first."""
    if not args.baselines:
        return []
    base = sweep["baseline"]["bytes"]
    if args.baseline_ratios:
        targets = [int(base / r) for r in args.baseline_ratios]
    else:
        ok = [p["bytes"] for p in sweep["points"] if p["status"] == "ok"]
        targets = sorted({b for b in ok if b < base}, reverse=True)
    return [(kind, target) for kind in args.baselines for target in targets]


def run_trained_small(kind: str, target: int, ctx: SweepContext, work_dir: str) -> dict[str, Any]:
    """A hash or QR DLRM of ``target`` bytes of tables trained from scratch like the baseline
    (``examples.dlrm.baselines``), evaluated; it has no before / after fine-tuning."""
    start = time.perf_counter()
    model, plans, fitted = train_small(
        kind, target, ctx.data, ctx.model_config, ctx.train_config, ctx.args, ctx.device, work_dir
    )
    splits = evaluate_splits(model, ctx)
    return {
        "bytes": stored_bytes(plans, ctx.model_config.embedding_dim),
        "target_bytes": target,
        "tables": [asdict(p) for p in plans],
        "combine": ctx.args.qr_combine if kind == "qr" else None,
        "before_finetune": splits,
        "after_finetune": splits,
        "history": fitted.history,
        "best_epoch": fitted.best_epoch,
        "note": "trained from scratch",
        "seconds": time.perf_counter() - start,
    }


def _summary(entry: dict[str, Any]) -> str:
    if entry["status"] != "ok":
        return "failed: " + entry["error"]
    after = entry["after_finetune"]["test"]
    return (
        f"{human_bytes(entry['bytes'])}, test AUC {entry['before_finetune']['test']['auc']:.4f} -> "
        f"{after['auc']:.4f}, logloss {after['logloss']:.4f}, NE {after['ne']:.4f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args, grid = parse_sweep_args(argv)
    if args.replot:  # no process group, no logging set-up: a pure file operation
        with open(os.path.join(args.replot, "sweep.json")) as f:
            write_outputs(json.load(f), args.replot)
        return
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr, force=True
    )
    for name in ("examples", "torchrec_compress"):
        logging.getLogger(name).setLevel(logging.INFO)
    quiet_torchrec()
    try:
        run(args, grid)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
