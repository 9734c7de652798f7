"""Pooled forward of a product-quantized table vs TorchRec's float EmbeddingBagCollection.

One table (default 10M x 128, M=16, K=256), one feature, batch 4096, pooling factor 20, uniform
and Zipf ids, for each thread count.  Both modules run interleaved in the same process and the
table prints medians and the speed ratio ``float ms / PQ ms`` (>= 1.0: PQ is no slower).  Two
alternative PQ paths are timed next to the module's fused path so that the choice stays measured:
``int64`` (same layout, int64 indices) and ``decode`` (materialise the looked-up rows, then pool).

Usage::

    python benchmarks/pq_forward.py --rows 2000000 --threads 1,2
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress.modules.pq_embedding_bag import PQEmbeddingBagCollection
from torchrec_compress.pq import decode


def zipf_ids(num_ids: int, num_rows: int, exponent: float, gen: torch.Generator) -> torch.Tensor:
    """Ids whose popularity rank follows a (continuous) Zipf law, ranks scattered over the table."""
    u = torch.rand(num_ids, dtype=torch.float64, generator=gen)
    one_minus_s = 1.0 - exponent
    ranks = ((num_rows**one_minus_s - 1.0) * u + 1.0).pow(1.0 / one_minus_s).long() - 1
    # An odd multiplier co-prime with the table size scatters ranks without a permutation array.
    multiplier = 2654435761
    while torch.gcd(torch.tensor(multiplier), torch.tensor(num_rows)) != 1:
        multiplier += 2
    return (ranks.clamp_(0, num_rows - 1) * multiplier) % num_rows


def pq_int64_path(
    codes: torch.Tensor, books: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """The fused layout with int64 indices (what a plain ``.long()`` widening gives)."""
    num_subspaces, ksub, dsub = books.shape
    n, num_bags = ids.numel(), offsets.numel() - 1
    indices = torch.empty(num_subspaces, n, dtype=torch.int64)
    indices.copy_(codes.index_select(0, ids).t())
    indices.add_(torch.arange(0, num_subspaces * ksub, ksub).unsqueeze(1))
    bag_offsets = torch.cat(
        [
            (offsets[:-1] + (torch.arange(num_subspaces) * n).unsqueeze(1)).reshape(-1),
            torch.tensor([num_subspaces * n]),
        ]
    )
    pooled = F.embedding_bag(
        indices.view(-1), books.view(-1, dsub), bag_offsets, mode="sum", include_last_offset=True
    )
    return pooled.view(num_subspaces, num_bags, dsub).transpose(0, 1).reshape(num_bags, -1)


def pq_decode_path(
    codes: torch.Tensor, books: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Materialise every looked-up row (``[n, d]``), then pool with ``segment_reduce``."""
    rows = decode(codes.index_select(0, ids), books)
    return torch.segment_reduce(rows, "sum", offsets=offsets, unsafe=True)


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--subspaces", type=int, default=16)
    parser.add_argument("--centroids", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pooling", type=int, default=20, help="ids per bag")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the skewed ids")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    table = EmbeddingBagConfig(
        name="t", embedding_dim=args.dim, num_embeddings=args.rows, feature_names=["f"]
    )
    float_ebc = EmbeddingBagCollection([table])  # allocated once: rows x dim float32
    codes = torch.randint(
        args.centroids, (args.rows, args.subspaces), dtype=torch.uint8, generator=gen
    )
    books = torch.randn(args.subspaces, args.centroids, args.dim // args.subspaces, generator=gen)
    pq_ebc = PQEmbeddingBagCollection([table], {"t": codes}, {"t": books})
    num_ids = args.batch * args.pooling
    lengths = torch.full((args.batch,), args.pooling)
    offsets = torch.arange(0, num_ids + 1, args.pooling)
    id_sets = {
        "uniform": torch.randint(args.rows, (num_ids,), generator=gen),
        "zipf": zipf_ids(num_ids, args.rows, args.zipf, gen),
    }
    codes_buffer, books_param = pq_ebc.codes.t, pq_ebc.codebooks["t"].detach()
    print(
        f"table {args.rows} x {args.dim}, M={args.subspaces}, K={args.centroids}, batch {args.batch}, "
        f"pooling {args.pooling}; medians of {args.repeats} interleaved runs (ms)"
    )
    header = f"{'ids':8s} {'thr':>3s} {'float EBC':>10s} {'PQ fused':>9s} {'ratio':>6s} {'PQ int64':>9s} {'PQ decode':>10s}"
    print(header)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for dist, ids in id_sets.items():
            kjt = KeyedJaggedTensor.from_lengths_sync(["f"], ids, lengths)
            runs: dict[str, Callable[[], object]] = {
                "float": lambda kjt=kjt: float_ebc(kjt),
                "pq": lambda kjt=kjt: pq_ebc(kjt),
                "int64": lambda ids=ids: pq_int64_path(codes_buffer, books_param, ids, offsets),
                "decode": lambda ids=ids: pq_decode_path(codes_buffer, books_param, ids, offsets),
            }
            with torch.no_grad():
                expected = pq_ebc(kjt).values()
                torch.testing.assert_close(runs["int64"](), expected, atol=1e-4, rtol=1e-5)
                torch.testing.assert_close(runs["decode"](), expected, atol=1e-4, rtol=1e-5)
                times: dict[str, list[float]] = {name: [] for name in runs}
                for _ in range(2):  # warm-up
                    for fn in runs.values():
                        fn()
                for _ in range(args.repeats):
                    for name, fn in runs.items():
                        times[name].append(_time(fn))
            med = {name: statistics.median(values) for name, values in times.items()}
            print(
                f"{dist:8s} {threads:3d} {med['float']:10.2f} {med['pq']:9.2f} "
                f"{med['float'] / med['pq']:6.2f} {med['int64']:9.2f} {med['decode']:10.2f}"
            )


if __name__ == "__main__":
    main()
