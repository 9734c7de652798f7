"""Planner storage of a billion-row table, fp32 vs MEC product-quantized codes.

Builds, on the ``meta`` device (nothing allocated), one 1,000,000,000 x 128 table twice: as a
torchrec ``EmbeddingBagCollection`` (fp32) and as a ``PQEmbeddingBagCollection`` with M=16
uint8 codes per row (K=256).  Both are planned by TorchRec's ``EmbeddingShardingPlanner`` for a
hypothetical cluster (default 64 GPUs, 8 per host, 80 GiB each), the codes through
``PQEmbeddingBagCollectionSharder``, which shows the planner the ``[rows, M]`` uint8 codes.  The
script prints both plans, with the planner's own storage estimate of every chosen sharding option
(``plan_storage``), their totals and the ratio (ideal ``4 * d / M`` = 32 for d=128, M=16).  The
codebooks (``M * K * d / M`` floats) are replicated dense parameters, outside the embedding plan:
their size is printed separately.

Usage::

    python benchmarks/plan_pq.py --rows 1000000000 --dim 128 --subspaces 16 --world-size 64
"""

import argparse
import time

import torch
from common import add_topology_arguments, planning_topology
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.planner import Topology

from torchrec_compress.distributed.planning import PlanStorage, default_sharders, plan_storage
from torchrec_compress.methods.pq import code_dtype
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
from torchrec_compress.methods.pq.sharded import PQEmbeddingBagCollectionSharder


def meta_pq(table: EmbeddingBagConfig, num_subspaces: int, ksub: int) -> PQEmbeddingBagCollection:
    """``table`` as uninitialised PQ codes and codebooks on ``meta`` (no memory)."""
    meta = torch.device("meta")
    codes = torch.empty(table.num_embeddings, num_subspaces, dtype=code_dtype(ksub), device=meta)
    books = torch.empty(num_subspaces, ksub, table.embedding_dim // num_subspaces, device=meta)
    return PQEmbeddingBagCollection([table], {table.name: codes}, {table.name: books})


def compare(
    rows: int, dim: int, num_subspaces: int, ksub: int, topology: Topology
) -> tuple[PlanStorage, PlanStorage]:
    """Plans the fp32 table and its PQ codes; returns both storage reports."""
    table = EmbeddingBagConfig(
        name="t0", embedding_dim=dim, num_embeddings=rows, feature_names=["f0"]
    )
    sharders: list = [PQEmbeddingBagCollectionSharder(), *default_sharders()]
    fp32: nn.Module = EmbeddingBagCollection(tables=[table], device=torch.device("meta"))
    pq = meta_pq(table, num_subspaces, ksub)
    return plan_storage(fp32, topology, sharders=sharders), plan_storage(
        pq, topology, sharders=sharders
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--subspaces", type=int, default=16, help="M: codes per row")
    parser.add_argument("--centroids", type=int, default=256, help="K: codewords per subspace")
    add_topology_arguments(parser)
    args = parser.parse_args()
    topology = planning_topology(args)
    start = time.perf_counter()
    fp32, pq = compare(args.rows, args.dim, args.subspaces, args.centroids, topology)
    elapsed = time.perf_counter() - start
    codebook_bytes = args.dim * args.centroids * 4
    print(f"== fp32 {args.rows} x {args.dim} on {args.world_size} x {args.hbm_gib:g} GiB ==")
    print(fp32.plan)
    print(fp32)
    print(f"\n== MEC codes M={args.subspaces}, K={args.centroids} ==")
    print(pq.plan)
    print(pq)
    print(
        f"codebooks (replicated, dense): {codebook_bytes / 2**10:.0f} KiB per process, "
        f"{codebook_bytes * args.world_size / 2**20:.1f} MiB over {args.world_size}"
    )
    print(
        f"\nplanner storage: {fp32.hbm / 2**30:.1f} GiB -> {pq.hbm / 2**30:.2f} GiB hbm, ratio "
        f"{fp32.hbm / pq.hbm:.1f}x (ideal 4 d / M = {4 * args.dim / args.subspaces:g}x); "
        f"both planned in {elapsed:.1f} s"
    )


if __name__ == "__main__":
    main()
