"""Planner bytes per row of a billion-row table: float, AFM factors, fp16/int8/int4/int2 on top.

Builds torchrec's ``DLRM`` on the ``meta`` device with one 1,000,000,000 x 128 table and a few
small ones (``benchmarks/plan_lowrank.py``'s model), then plans with TorchRec's
``EmbeddingShardingPlanner`` (default 64 GPUs, 8 per host, 80 GiB each):

* the original model; the model with fp16 (trainable) or row-wise int8 / int4 / int2 tables;
* the AFM model (k=16 factor tables, ``lowrank_skeleton_``) and the same with fp16 or row-wise
  quantized factor tables (``compress_(model, RowWiseQuantConfig(bits))``; no data needed).

For each it prints the planner's storage estimate of the big table per row (weights and the
planner's I/O buffers, optimizer state not attached).  Issue target: AFM k=16 x int8 of a
128-dim table at <= 32 bytes per row (float factors 64, the original 512).  Measured
(torchrec 1.8.0): original 512.13, fp16 256.07, int8 132.27, int4 68.00, int2 36.00;
AFM k=16 64.02, AFM x fp16 32.01, x int8 20.00, x int4 12.00, x int2 8.00.  TorchRec's quantized sharder offers more kernels
to weigh, so each quantized plan takes ~10 s (the float ones < 1 s).

Usage::

    python benchmarks/plan_rowwise_quant.py --rows 1000000000 --rank 16
"""

import argparse
import sys
from pathlib import Path

from torch import nn
from torchrec.distributed.planner import Topology

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/

from common import add_topology_arguments, planning_topology  # noqa: E402

from benchmarks.plan_lowrank import meta_dlrm  # noqa: E402
from torchrec_compress.api import compress_  # noqa: E402
from torchrec_compress.distributed.planning import plan_storage  # noqa: E402
from torchrec_compress.methods.lowrank.sharded_driver import lowrank_skeleton_
from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig

BIG_TABLE = "t0"


def bytes_per_row(model: nn.Module, topology: Topology, rows: int) -> float:
    """The planner's storage (hbm + ddr, all shards) of the big table, per row."""
    (big,) = [t for t in plan_storage(model, topology).tables if t.table == BIG_TABLE]
    return (big.hbm + big.ddr) / rows


def _name(bits: int) -> str:
    return "fp16" if bits == 16 else f"int{bits}"


def variants(rows: int, dim: int, rank: int) -> dict[str, nn.Module]:
    """Name -> meta model: original, int-n tables, AFM factors, AFM x int-n factors."""
    models: dict[str, nn.Module] = {"original fp32": meta_dlrm(rows, dim)}
    for bits in (16, 8, 4, 2):
        model = meta_dlrm(rows, dim)
        compress_(model, RowWiseQuantConfig(bits=bits))
        models[_name(bits)] = model
    for bits in (None, 16, 8, 4, 2):
        model = meta_dlrm(rows, dim)
        tables = model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
        lowrank_skeleton_(model, {t.name: rank for t in tables})
        if bits is not None:
            compress_(model, RowWiseQuantConfig(bits=bits))
        models[f"AFM k={rank}" + ("" if bits is None else f" x {_name(bits)}")] = model
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000_000, help="rows of the big table")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    add_topology_arguments(parser)
    args = parser.parse_args()
    topology = planning_topology(args)
    print(f"{args.rows:,} x {args.dim} table on {args.world_size} x {args.hbm_gib:g} GiB")
    for name, model in variants(args.rows, args.dim, args.rank).items():
        print(f"{name:<20} {bytes_per_row(model, topology, args.rows):8.2f} bytes per row")


if __name__ == "__main__":
    main()
