"""Encoding throughput and memory of the product quantizer on a large table.

Trains a ``ProductQuantizer`` (weighted k-means on a row sample) and encodes every row of a
``rows x dim`` float32 table chunk by chunk; prints rows/s and the peak resident memory above the
table's own size (encoding must stay under ~1 GB extra whatever the row count).  On the first
``--compare-rows`` rows, the C++ encoder (``torch.ops.torchrec_compress.pq_encode``) and the
pure-torch path (chunked ``baddbmm`` + ``min``) run interleaved ``--repeats`` times in this
process; medians (and minima) give both throughputs and the speed-up.  When faiss is installed,
its ``ProductQuantizer`` encodes the same table for comparison.

With ``--isa-compare avx2,avx512`` it times the C++ encoder alone on every row of the table under
each named instruction set (``pq_set_kernel_isa``), interleaved ``--repeats`` times in this
process, and checks that every instruction set gives the same codes bit for bit.

With ``--kmeans-compare`` it times the weighted k-means alone instead (popularity-like integer
weights 1..11 on the ``--train-rows`` sample): this code at its default tolerance, at ``1e-4`` and
at fixed iteration counts; the code of ``--baseline-src`` (a checkout of an older commit, its
``quantizer.py`` loaded beside this one); faiss's weighted ``Clustering`` per subspace when faiss
is installed (no subsampling: the same rows).  Runs are interleaved ``--repeats`` times; the table
gives the median (min) seconds, the iterations, the weighted MSE on the sample (what k-means
minimises) and the MSE on the first ``--compare-rows`` rows of the table.

Usage::

    python benchmarks/pq_encode.py --rows 10000000 --threads 1
    python benchmarks/pq_encode.py --rows 1000000 --kmeans-compare --baseline-src ../base
    python benchmarks/pq_encode.py --dim 32 --subspaces 8 --isa-compare avx2,avx512 --repeats 3
"""

import argparse
import importlib.util
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import markdown_table, run_header, time_interleaved

from torchrec_compress.methods.pq import ProductQuantizer, reconstruction_mse
from torchrec_compress.methods.pq import kernels as _ops

Trainer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Current resident set size (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def ours(args: argparse.Namespace, source: str | None, niter: int, tol: float | None) -> Trainer:
    """``ProductQuantizer.train`` of this code (``source=None``) or of the checkout ``source``;
    ``tol=None``: a quantizer without the option (the baseline)."""
    module = ProductQuantizer.__module__
    quantizer_class = ProductQuantizer
    if source is not None:
        path = Path(source) / "torchrec_compress/methods/pq/quantizer.py"
        spec = importlib.util.spec_from_file_location(f"baseline_{module}", path)
        assert spec is not None and spec.loader is not None
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        quantizer_class = loaded.ProductQuantizer

    def train(sample: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, int]:
        pq = quantizer_class(args.dim, args.subspaces, args.centroids)
        options = {} if tol is None else {"tol": tol}
        pq.train(
            sample, weights, niter=niter, generator=torch.Generator().manual_seed(0), **options
        )
        return pq.codebooks, len(getattr(pq, "iteration_errors", [])) or niter

    return train


def faiss_trainer(args: argparse.Namespace, niter: int) -> Trainer:
    """faiss's weighted k-means, one ``Clustering`` per subspace, on every sample row."""
    import faiss  # type: ignore[import-not-found]

    faiss.omp_set_num_threads(args.threads)
    dsub = args.dim // args.subspaces

    def train(sample: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, int]:
        books = torch.empty(args.subspaces, args.centroids, dsub)
        for m in range(args.subspaces):
            clustering = faiss.Clustering(dsub, args.centroids)
            clustering.niter, clustering.seed = niter, 1234 + m
            clustering.max_points_per_centroid = sample.shape[0]  # no subsampling
            part = sample[:, m * dsub : (m + 1) * dsub].contiguous().numpy()
            clustering.train(part, faiss.IndexFlatL2(dsub), weights.numpy())
            centroids = faiss.vector_to_array(clustering.centroids)
            books[m] = torch.from_numpy(centroids).view(args.centroids, dsub)
        return books, niter

    return train


def compare_kmeans(args: argparse.Namespace, table: torch.Tensor, sample: torch.Tensor) -> None:
    """Times the k-mean trainers interleaved and prints their iterations and errors."""
    weights = torch.randint(1, 12, (sample.shape[0],), generator=torch.Generator().manual_seed(1))
    weights = weights.float()
    trainers = {
        "this, tol 1e-3 (default), <= 50 it.": ours(args, None, 50, 1e-3),
        "this, tol 1e-4, <= 200 it.": ours(args, None, 200, 1e-4),
        "this, 5 it.": ours(args, None, 5, 0.0),
        "this, 20 it.": ours(args, None, 20, 0.0),
    }
    if args.baseline_src:
        for niter in (5, 20):
            trainers[f"baseline, {niter} it."] = ours(args, args.baseline_src, niter, None)
    try:
        for niter in (5, 10, 20, 25):
            trainers[f"faiss, {niter} it."] = faiss_trainer(args, niter)
    except ImportError:
        print("faiss not installed: skipped")
    results: dict[str, tuple[torch.Tensor, int]] = {}

    def run(name: str) -> Callable[[], None]:
        return lambda: results.__setitem__(name, trainers[name](sample, weights))

    timings = time_interleaved({n: run(n) for n in trainers}, args.threads, args.repeats, 1)
    head = table[: args.compare_rows]
    rows = []
    for name, (books, iterations) in results.items():
        pq = ProductQuantizer(args.dim, args.subspaces, args.centroids)
        pq.codebooks = books
        sample_mse = reconstruction_mse(sample, pq.compute_codes(sample), books, weights)
        head_mse = reconstruction_mse(head, pq.compute_codes(head), books)
        timing = timings[name]
        seconds = f"{timing.median_ms / 1e3:.2f} ({timing.min_ms / 1e3:.2f})"
        rows.append([name, iterations, seconds, f"{sample_mse:.5f}", f"{head_mse:.5f}"])
    print(run_header(f"weighted k-means: {sample.shape[0]} x {args.dim} rows, M={args.subspaces}"))
    print(f"- K={args.centroids}, {args.threads} thread(s), {args.repeats} interleaved runs\n")
    header = ["k-means", "iterations", "s: median (min)", "weighted MSE (sample)", "MSE (head)"]
    print(markdown_table(header, rows))


def compare_isas(args: argparse.Namespace, pq: ProductQuantizer, table: torch.Tensor) -> None:
    """The C++ encoder on every row under each ISA of ``--isa-compare``, interleaved."""
    ops = torch.ops.torchrec_compress
    isas = args.isa_compare.split(",")
    books = pq.codebooks.float()
    seconds: dict[str, list[float]] = {isa: [] for isa in isas}
    codes: dict[str, torch.Tensor] = {}
    try:
        for _ in range(args.repeats):
            for isa in isas:
                ops.pq_set_kernel_isa(isa)
                start = time.perf_counter()
                codes[isa] = ops.pq_encode(table, books, pq.code_dtype)
                seconds[isa].append(time.perf_counter() - start)
    finally:
        ops.pq_set_kernel_isa("auto")
    print(
        f"pq_encode on {args.rows} x {args.dim} (M={args.subspaces}, K={args.centroids}, "
        f"dsub={args.dim // args.subspaces}), threads={args.threads}, {args.repeats} interleaved "
        "runs:"
    )
    first = isas[0]
    for isa in isas:
        median = statistics.median(seconds[isa])
        runs = ", ".join(f"{t:.3f}" for t in seconds[isa])
        differ = int((codes[isa] != codes[first]).sum())
        print(
            f"  {isa}: median {median:.3f} s ({runs}) = {args.rows / median:,.0f} rows/s, "
            f"{statistics.median(seconds[first]) / median:.2f}x {first}; "
            f"{differ} of {codes[isa].numel()} codes differ from {first}'s"
        )


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
    parser.add_argument("--kmeans-compare", action="store_true", help="time k-means only")
    parser.add_argument(
        "--isa-compare", default="", help="time the encoder alone on these ISAs, e.g. avx2,avx512"
    )
    parser.add_argument("--baseline-src", default=None, help="older checkout for --kmeans-compare")
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
    if args.kmeans_compare:
        compare_kmeans(args, table, sample)
        return
    pq.train(sample, niter=args.kmeans_iterations, generator=gen, chunk_size=args.chunk_size)
    train_s = time.perf_counter() - start
    if args.isa_compare:
        compare_isas(args, pq, table)
        return
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
