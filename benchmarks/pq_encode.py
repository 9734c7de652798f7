"""Encoding throughput and memory of the product quantizer on a large table.

Trains a ``ProductQuantizer`` (weighted k-means on a row sample) and encodes every row of a
``rows x dim`` float32 table chunk by chunk; prints rows/s and the peak resident memory above the
table's own size (encoding must stay under ~1 GB extra whatever the row count).  On the first
``--compare-rows`` rows, the C++ encoder (``torch.ops.torchrec_compress.pq_encode``) and the
pure-torch path (chunked ``baddbmm`` + ``min``) run interleaved ``--repeats`` times in this
process; medians (and minima) give both throughputs and the speed-up.  When faiss is installed,
its ``ProductQuantizer`` encodes the same table for comparison.

Usage::

    python benchmarks/pq_encode.py --rows 10000000 --threads 1
"""

import argparse
import resource
import statistics
import time

import torch

from torchrec_compress.methods.pq import ProductQuantizer, reconstruction_mse
from torchrec_compress.methods.pq import kernels as _ops


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Current resident set size (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--subspaces", type=int, default=16)
    parser.add_argument("--centroids", type=int, default=256)
    parser.add_argument("--train-rows", type=int, default=65536)
    parser.add_argument("--kmeans-iterations", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare-rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    baseline_rss = peak_rss_bytes()
    # Rows with structure (a few hundred directions plus noise) rather than pure noise.
    table = torch.empty(args.rows, args.dim)
    directions = torch.randn(512, args.dim, generator=gen)
    # Small generation chunks keep temporaries out of the peak that encoding is judged by.
    for start in range(0, args.rows, 1 << 16):
        part = table[start : start + (1 << 16)]
        picks = torch.randint(512, (part.shape[0],), generator=gen)
        torch.randn(part.shape, generator=gen, out=part).mul_(0.3).add_(directions[picks])
    table_bytes = table.numel() * table.element_size()
    after_table_rss = current_rss_bytes()

    pq = ProductQuantizer(args.dim, args.subspaces, args.centroids)
    start = time.perf_counter()
    sample = table[torch.randint(args.rows, (args.train_rows,), generator=gen)]
    pq.train(sample, niter=args.kmeans_iterations, generator=gen, chunk_size=args.chunk_size)
    train_s = time.perf_counter() - start
    head = table[: args.compare_rows]
    seconds: dict[str, list[float]] = {"kernel": [], "torch": []}
    head_codes: dict[str, torch.Tensor] = {}
    has_kernels = _ops.HAS_KERNELS
    for _ in range(args.repeats):
        for path in seconds:
            _ops.HAS_KERNELS = has_kernels and path == "kernel"
            start = time.perf_counter()
            head_codes[path] = pq.compute_codes(head, chunk_size=args.chunk_size)
            seconds[path].append(time.perf_counter() - start)
    _ops.HAS_KERNELS = has_kernels
    agree = float((head_codes["kernel"] == head_codes["torch"]).float().mean())
    rate = {path: head.shape[0] / statistics.median(times) for path, times in seconds.items()}
    best = {path: head.shape[0] / min(times) for path, times in seconds.items()}

    start = time.perf_counter()
    codes = pq.compute_codes(table, chunk_size=args.chunk_size)
    encode_s = time.perf_counter() - start
    peak = peak_rss_bytes()
    mse = reconstruction_mse(table[: 1 << 20], codes[: 1 << 20], pq.codebooks)

    print(
        f"table {args.rows} x {args.dim} ({table_bytes / 2**30:.2f} GiB), M={args.subspaces}, "
        f"K={args.centroids}, threads={args.threads}, chunk={args.chunk_size}"
    )
    print(
        f"k-means on {args.train_rows} rows x {args.kmeans_iterations} iterations: {train_s:.1f} s"
    )
    print(
        f"first {head.shape[0]} rows, median (best) of {args.repeats} interleaved runs: "
        f"{'C++ kernel' if has_kernels else 'kernel NOT BUILT, torch'} {rate['kernel']:,.0f} "
        f"({best['kernel']:,.0f}) rows/s, torch path {rate['torch']:,.0f} ({best['torch']:,.0f}) "
        f"rows/s, speed-up {rate['kernel'] / rate['torch']:.1f}x; codes agree on {agree:.4%}"
    )
    print(
        f"encode (all rows, {'C++ kernel' if has_kernels else 'torch path'}): {encode_s:.1f} s = {args.rows / encode_s:,.0f} rows/s; codes "
        f"{codes.numel() * codes.element_size() / 2**20:.0f} MiB ({codes.dtype}); "
        f"MSE (first 1M rows) {mse:.4f}"
    )
    extra = peak - after_table_rss
    print(
        f"peak RSS {peak / 2**30:.2f} GiB: interpreter {baseline_rss / 2**30:.2f} GiB + table "
        f"{(after_table_rss - baseline_rss) / 2**30:.2f} GiB + training/encoding {extra / 2**30:.2f} "
        f"GiB ({'within' if extra < 2**30 else 'OVER'} the 1 GiB allowance)"
    )
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        print("faiss not installed: skipped")
        return
    faiss.omp_set_num_threads(args.threads)
    reference = faiss.ProductQuantizer(args.dim, args.subspaces, args.centroids.bit_length() - 1)
    reference.train(sample.numpy())
    start = time.perf_counter()
    reference.compute_codes(table.numpy())
    faiss_s = time.perf_counter() - start
    print(f"faiss encode: {faiss_s:.1f} s = {args.rows / faiss_s:,.0f} rows/s")


if __name__ == "__main__":
    main()
