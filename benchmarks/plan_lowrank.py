"""Planner storage of a billion-row DLRM, original vs low-rank (AFM/SVD) compressed.

Builds a torchrec ``DLRM`` on the ``meta`` device (no memory) with one 1,000,000,000 x 128 table
and a few small ones, and the same model with every table replaced by a rank-k factor table
(``LowRankEmbeddingBagCollection``, k=16 by default).  Both are planned with TorchRec's
``EmbeddingShardingPlanner`` for a hypothetical cluster (default 64 GPUs, 8 per host, 80 GiB
each) and the script prints both plans and the planner's own total storage estimate of each,
and their ratio (ideal d/k = 8 for the big table).

Usage::

    python benchmarks/plan_lowrank.py --rows 1000000000 --rank 16 --world-size 64
"""

import argparse
import time

import torch
from common import add_topology_arguments, planning_topology
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.planner import Topology
from torchrec.models.dlrm import DLRM

from torchrec_compress.distributed.planning import PlanStorage, plan_storage
from torchrec_compress.methods.lowrank.sharded_driver import lowrank_skeleton_

SMALL_TABLE_ROWS = (1_000, 50_000, 2_000_000)


def meta_dlrm(big_rows: int, dim: int, small_rows: tuple[int, ...] = SMALL_TABLE_ROWS) -> nn.Module:
    """A torchrec DLRM on ``meta`` with one ``big_rows`` x ``dim`` table and a few small ones."""
    rows = (big_rows, *small_rows)
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"f{i}"]
        )
        for i, n in enumerate(rows)
    ]
    meta = torch.device("meta")
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=tables, device=meta),
        dense_in_features=13,
        dense_arch_layer_sizes=[512, 256, dim],
        over_arch_layer_sizes=[1024, 1024, 512, 256, 1],
        dense_device=meta,
    )


def compare(
    big_rows: int, dim: int, rank: int, topology: Topology
) -> tuple[PlanStorage, PlanStorage]:
    """Plans the original and the rank-``rank`` model; returns both storage reports."""
    original = meta_dlrm(big_rows, dim)
    compressed = meta_dlrm(big_rows, dim)
    tables = compressed.sparse_arch.embedding_bag_collection.embedding_bag_configs()
    lowrank_skeleton_(compressed, {t.name: rank for t in tables})
    return plan_storage(original, topology), plan_storage(compressed, topology)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000_000, help="rows of the big table")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    add_topology_arguments(parser)
    args = parser.parse_args()
    topology = planning_topology(args)
    start = time.perf_counter()
    original, compressed = compare(args.rows, args.dim, args.rank, topology)
    elapsed = time.perf_counter() - start
    print(f"== original (d={args.dim}) on {args.world_size} x {args.hbm_gib:g} GiB ==")
    print(original)
    print(f"\n== low-rank k={args.rank} ==")
    print(compressed)
    print(
        f"\nplanner storage: {original.hbm / 2**30:.1f} GiB -> {compressed.hbm / 2**30:.1f} GiB "
        f"hbm, ratio {original.hbm / compressed.hbm:.2f}x "
        f"(ideal d/k = {args.dim / args.rank:g}x); both planned in {elapsed:.1f} s"
    )


if __name__ == "__main__":
    main()
