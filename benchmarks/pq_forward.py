"""Pooled forward of a product-quantized table vs TorchRec's float EmbeddingBagCollection.

One table (default 10M x 128, M=16, K=256), one feature, batch 4096, pooling factor 20, uniform
and Zipf ids, for each thread count.  The float EBC and both PQ paths run interleaved in the same
process; the table prints medians (and minima) in ms and the speed ratios ``float / PQ`` (>= 1.0:
PQ is no slower).  ``PQ kernel`` is the module with the C++ operator
(``torch.ops.torchrec_compress.pq_pooled_lookup``), ``PQ torch`` the same module on its pure-torch
fallback (one ``embedding_bag`` over the stacked codebooks).

Usage::

    python benchmarks/pq_forward.py --rows 2000000 --threads 1,2
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import zipf_ids
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress.methods.pq import kernels as _ops
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection


def on_torch_path(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Runs ``fn`` with the C++ kernels hidden, i.e. on the pure-torch fallback."""
    # lookup_kernel_applies asks kernels_built() (a function, so that TorchScript can read it)
    has_kernels, kernels_built = _ops.HAS_KERNELS, _ops.kernels_built
    _ops.HAS_KERNELS = False
    _ops.kernels_built = lambda: False
    try:
        return fn()
    finally:
        _ops.HAS_KERNELS, _ops.kernels_built = has_kernels, kernels_built


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
    id_sets = {
        "uniform": torch.randint(args.rows, (num_ids,), generator=gen),
        "zipf": zipf_ids(num_ids, args.rows, args.zipf, gen),
    }
    if not _ops.HAS_KERNELS:
        print("C++ kernels not built: 'PQ kernel' is the torch path too")
    print(
        f"table {args.rows} x {args.dim}, M={args.subspaces}, K={args.centroids}, batch {args.batch}, "
        f"pooling {args.pooling}; medians (min) of {args.repeats} interleaved runs in ms"
    )
    print(
        f"{'ids':8s} {'thr':>3s} {'float EBC':>15s} {'PQ kernel':>15s} {'ratio':>6s} "
        f"{'PQ torch':>15s} {'ratio':>6s}"
    )
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for dist, ids in id_sets.items():
            kjt = KeyedJaggedTensor.from_lengths_sync(["f"], ids, lengths)
            runs: dict[str, Callable[[], object]] = {
                "float": lambda kjt=kjt: float_ebc(kjt),
                "kernel": lambda kjt=kjt: pq_ebc(kjt),
                "torch": lambda kjt=kjt: on_torch_path(lambda: pq_ebc(kjt).values()),
            }
            with torch.no_grad():
                torch.testing.assert_close(
                    runs["torch"](), pq_ebc(kjt).values(), atol=1e-5, rtol=1e-5
                )
                times: dict[str, list[float]] = {name: [] for name in runs}
                for _ in range(2):  # warm-up
                    for fn in runs.values():
                        fn()
                for _ in range(args.repeats):
                    for name, fn in runs.items():
                        times[name].append(_time(fn))
            med = {name: statistics.median(values) for name, values in times.items()}
            low = {name: min(values) for name, values in times.items()}
            cell = {name: f"{med[name]:.2f} ({low[name]:.2f})" for name in runs}
            print(
                f"{dist:8s} {threads:3d} {cell['float']:>15s} {cell['kernel']:>15s} "
                f"{med['float'] / med['kernel']:6.2f} {cell['torch']:>15s} "
                f"{med['float'] / med['torch']:6.2f}"
            )


if __name__ == "__main__":
    main()
