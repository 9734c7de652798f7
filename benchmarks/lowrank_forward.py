"""Pooled inference forward of a low-rank table vs TorchRec's float EmbeddingBagCollection.

One table (default 10M x 128, rank k=32), one feature, batch 4096, fixed bag length 20, uniform
and Zipf ids, for each thread count.  Three paths run interleaved in one process under
``torch.no_grad``:

* ``float EBC``: ``EmbeddingBagCollection`` with the full ``rows x dim`` float32 table;
* ``low-rank``: ``LowRankEmbeddingBagCollection`` (pooling on k-dim factors, projection, mean);
  without gradients it runs the fused C++ kernel ``lowrank_pooled_lookup`` (k-dim pooling and
  the mean row's coefficient in one pass) and one GEMM, when the extension is built;
* ``bare k-dim``: the module's own k-dim factor EBC (TorchRec / ``nn.EmbeddingBag``) plus one
  matmul, without the mean term and the KeyedTensor bookkeeping: what an ordinary k-dim EBC gives.

``speedup`` is ``float ms / low-rank ms`` (issue target: >= 1.5 in every cell).  Each cell cycles
through ``--batches`` distinct id batches, as consecutive serving batches would.  The low-rank
output is checked against a direct ``A[ids] B + mu`` computation for the first bags before timing.

Usage (``OMP_WAIT_POLICY=PASSIVE``: see ``benchmarks/common.py``; 10M rows need ~7 GB)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lowrank_forward.py --rows 2000000 --threads 1,2
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
from common import markdown_table, parse_threads, run_header, time_interleaved, zipf_ids
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress import LowRankEmbeddingBagCollection


@torch.no_grad()
def build_modules(
    table: EmbeddingBagConfig, rank: int, gen: torch.Generator
) -> tuple[EmbeddingBagCollection, LowRankEmbeddingBagCollection]:
    """Both collections with random weights, allocated once (no ``rows x dim`` temporaries)."""
    meta = torch.device("meta")
    float_ebc = EmbeddingBagCollection([table], device=meta).to_empty(device="cpu")
    float_ebc.embedding_bags[table.name].weight.uniform_(-0.01, 0.01, generator=gen)
    lowrank = LowRankEmbeddingBagCollection([table], {table.name: rank}, device=meta)
    lowrank = lowrank.to_empty(device="cpu")
    lowrank.factor_ebc.embedding_bags[table.name].weight.uniform_(-0.01, 0.01, generator=gen)
    lowrank.projection[table.name].normal_(generator=gen)
    lowrank.mean[table.name].normal_(generator=gen)
    return float_ebc, lowrank


@torch.no_grad()
def check_lowrank_output(
    lowrank: LowRankEmbeddingBagCollection, kjt: KeyedJaggedTensor, name: str, bags: int = 64
) -> None:
    """The module's first ``bags`` pooled rows equal ``sum_bag (A_i B + mu)`` computed directly."""
    factor = lowrank.factor_ebc.embedding_bags[name].weight
    lengths = kjt.lengths()[:bags]
    ids = kjt.values()[: int(lengths.sum())]
    rows = factor[ids] @ lowrank.projection[name] + lowrank.mean[name]
    expected = torch.segment_reduce(rows, "sum", lengths=lengths)
    actual = lowrank(kjt).values()[:bags]
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pooling", type=int, default=20, help="ids per bag (fixed)")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=201)
    parser.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of skewed ids")
    parser.add_argument(
        "--batches", type=int, default=8, help="distinct id batches per cell, used in turn"
    )
    args = parser.parse_args()
    # taken first: the load average it records is the one the timings ran under
    title = run_header("Low-rank pooled forward vs float EmbeddingBagCollection")

    gen = torch.Generator().manual_seed(0)
    table = EmbeddingBagConfig(
        name="t", embedding_dim=args.dim, num_embeddings=args.rows, feature_names=["f"]
    )
    float_ebc, lowrank = build_modules(table, args.rank, gen)
    factor_ebc, projection = lowrank.factor_ebc, lowrank.projection["t"].detach()
    num_ids = args.batch * args.pooling
    lengths = torch.full((args.batch,), args.pooling)
    draws: dict[str, Callable[[], torch.Tensor]] = {
        "uniform": lambda: torch.randint(args.rows, (num_ids,), generator=gen),
        f"zipf {args.zipf}": lambda: zipf_ids(num_ids, args.rows, args.zipf, gen),
    }
    batch_sets = {
        dist: [
            KeyedJaggedTensor.from_lengths_sync(["f"], draw(), lengths) for _ in range(args.batches)
        ]
        for dist, draw in draws.items()
    }
    for kjts in batch_sets.values():
        check_lowrank_output(lowrank, kjts[0], "t")
    rows = []
    for threads in parse_threads(args.threads):
        for dist, kjts in batch_sets.items():
            # Every call takes the next batch of one shared cycle.  Timing one fixed batch would
            # let the low-rank module and the bare path (same factor table) each find the other's
            # rows in cache, favouring whichever runs second.
            batches = itertools.cycle(kjts)
            t = time_interleaved(
                {
                    "float": lambda b=batches: float_ebc(next(b)),
                    "lowrank": lambda b=batches: lowrank(next(b)),
                    "bare": lambda b=batches: factor_ebc(next(b)).values() @ projection,
                },
                threads=threads,
                repeats=args.repeats,
            )
            rows.append(
                [
                    dist,
                    threads,
                    t["float"].median_ms,
                    t["lowrank"].median_ms,
                    t["bare"].median_ms,
                    t["float"].median_ms / t["lowrank"].median_ms,
                    t["float"].median_ms / t["bare"].median_ms,
                    f"{t['float'].min_ms:.2f} / {t['lowrank'].min_ms:.2f} / {t['bare'].min_ms:.2f}",
                ]
            )
    print(title)
    print(
        f"table {args.rows:,} x {args.dim}, rank {args.rank}, batch {args.batch}, "
        f"pooling {args.pooling}; medians of {args.repeats} interleaved repeats (ms), "
        f"`speedup` = float / low-rank\n"
    )
    header = [
        "ids",
        "threads",
        "float EBC",
        "low-rank",
        "bare k-dim + mm",
        "speedup",
        "float / bare",
        "min float / low-rank / bare",
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
