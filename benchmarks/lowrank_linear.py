"""Forward of ``LowRankLinear`` vs the ``nn.Linear`` it replaces.

Default: 400 -> 400 at rank 64, batch 4096 (issue target: ``nn.Linear ms / LowRankLinear ms >=
1.5``), for each thread count, interleaved in one process under ``torch.no_grad``.  The
dense layer holds the product of the two factors, so both compute the same function; the script
checks that before timing.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lowrank_linear.py --threads 1,2
"""

from __future__ import annotations

import argparse

import torch
from common import markdown_table, parse_threads, run_header, time_interleaved
from torch import nn

from torchrec_compress import LowRankLinear


@torch.no_grad()
def dense_equivalent(layer: LowRankLinear) -> nn.Linear:
    """``nn.Linear`` with ``W = W_up W_down`` and ``b = W_up b_down + b_up``: the same function."""
    dense = nn.Linear(layer.in_features, layer.out_features)
    dense.weight.copy_(layer.up.weight @ layer.down.weight)
    dense.bias.copy_(layer.up(layer.down.bias))
    return dense


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=400, help="in and out features")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=101)
    args = parser.parse_args()
    # taken first: the load average it records is the one the timings ran under
    title = run_header("LowRankLinear vs nn.Linear forward")

    torch.manual_seed(0)
    lowrank = LowRankLinear(in_features=args.dim, rank=args.rank, out_features=args.dim)
    dense = dense_equivalent(lowrank)
    x = torch.randn(args.batch, args.dim)
    with torch.no_grad():
        torch.testing.assert_close(lowrank(x), dense(x), atol=1e-4, rtol=1e-4)
    rows = []
    for threads in parse_threads(args.threads):
        t = time_interleaved(
            {"dense": lambda: dense(x), "lowrank": lambda: lowrank(x)},
            threads=threads,
            repeats=args.repeats,
        )
        rows.append(
            [
                threads,
                t["dense"].median_ms,
                t["lowrank"].median_ms,
                t["dense"].median_ms / t["lowrank"].median_ms,
                f"{t['dense'].min_ms:.2f} / {t['lowrank'].min_ms:.2f}",
            ]
        )
    print(title)
    print(
        f"{args.dim} -> {args.dim}, rank {args.rank}, batch {args.batch}; medians of "
        f"{args.repeats} interleaved repeats (ms), `speedup` = nn.Linear / LowRankLinear\n"
    )
    header = ["threads", "nn.Linear", "LowRankLinear", "speedup", "min nn.Linear / LowRankLinear"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
