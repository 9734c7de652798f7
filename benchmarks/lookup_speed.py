"""Pooled lookup speed of every compressed table against TorchRec's float EBC, in one run (issue 17).

For each table size (default 1M and 8M rows x 128), one feature, batch 4096, pooling 20, uniform
and Zipf ids, these collections run interleaved in one process under ``torch.no_grad``:

* ``float``: TorchRec's ``EmbeddingBagCollection`` (``rows x 128`` float32), the baseline;
* ``low-rank``: ``LowRankEmbeddingBagCollection`` at rank k=32 (C++ ``lowrank_pooled_lookup``
  over the ``rows x 32`` factor table, then one GEMM);
* ``PQ``: ``PQEmbeddingBagCollection``, M=16 one-byte codes per row, K=256 (``pq_pooled_lookup``);
* ``int8 fbgemm``: what ``compress_(model, RowWiseQuantConfig(bits=8))`` makes (TorchRec's
  quantized EBC: fbgemm's n-bit TBE, one thread);
* ``int8 kernel``: the same rows after ``torchrec_compress.kernels.use_int8_kernel_`` (the
  C++ ``int8_pooled_lookup``, bags over all threads).

Each collection exists twice: as built (4 KiB pages) and after
``torchrec_compress.kernels.use_huge_pages_`` (2 MiB pages; same outputs, checked).  With more
than one thread only the float and int8 collections run (``--multi-thread-methods``): the shared
2-core machine is kept to one thread otherwise.  Each call takes the next of ``--batches``
distinct id batches.  Ratios divide the float EBC's median in 4 KiB pages (TorchRec as it ships)
by the method's, same ``time_interleaved`` call; in brackets, the float EBC in 2 MiB pages.

Usage (``OMP_WAIT_POLICY=PASSIVE``: see ``benchmarks/common.py``; 8M rows need ~15 GB)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lookup_speed.py --rows 1000000,8000000 --threads 1,2
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import itertools
import os
from collections.abc import Callable, Iterator

import torch
from common import markdown_table, parse_threads, run_header, time_interleaved, zipf_ids
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress import (
    LowRankEmbeddingBagCollection,
    PQEmbeddingBagCollection,
    RowWiseQuantConfig,
    compress_,
)
from torchrec_compress.kernels import huge_pages_unavailable, use_huge_pages_, use_int8_kernel_

METHODS = {
    "float": "float EBC",
    "lowrank": "low-rank k=32",
    "pq": "PQ M=16",
    "int8": "int8 fbgemm",
    "int8k": "int8 kernel",
}
# (method, threads, issue 17's target speed-up over the float EBC)
TARGETS = [("lowrank", 1, 3.0), ("pq", 1, 5.0), ("int8", 2, 1.5), ("int8k", 2, 1.5)]


class _Holder(nn.Module):
    """A parent for ``compress_`` to swap the collection in."""

    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc


def _next_batch(module: nn.Module, batches: Iterator[KeyedJaggedTensor]) -> object:
    """One lookup on the next batch of a cycle shared by every collection of a cell.  (Timing
    one fixed batch would let collections over the same rows find them cached by another.)"""
    return module(next(batches))


def int8_collection(float_ebc: EmbeddingBagCollection, kernel: bool) -> nn.Module:
    """What ``compress_(model, RowWiseQuantConfig(bits=8))`` makes of ``float_ebc`` (its rows
    pooled by the C++ kernel when ``kernel``)."""
    holder = _Holder(float_ebc)
    compress_(holder, RowWiseQuantConfig(bits=8))
    if kernel and use_int8_kernel_(holder) != 1:
        raise RuntimeError("the int8 kernel does not apply (C++ extension not built?)")
    return holder.ebc


@torch.no_grad()
def build_collections(
    args: argparse.Namespace, rows: int, gen: torch.Generator
) -> dict[str, nn.Module]:
    """Every collection over one ``rows x dim`` table, random weights, allocated once."""
    table = EmbeddingBagConfig(
        name="t", embedding_dim=args.dim, num_embeddings=rows, feature_names=["f"]
    )
    meta = torch.device("meta")
    float_ebc = EmbeddingBagCollection([table], device=meta).to_empty(device="cpu")
    float_ebc.embedding_bags["t"].weight.uniform_(-0.01, 0.01, generator=gen)
    lowrank = LowRankEmbeddingBagCollection([table], {"t": args.rank}, device=meta)
    lowrank = lowrank.to_empty(device="cpu")
    lowrank.factor_ebc.embedding_bags["t"].weight.uniform_(-0.01, 0.01, generator=gen)
    lowrank.projection["t"].normal_(generator=gen)
    lowrank.mean["t"].normal_(generator=gen)
    codes = torch.randint(args.centroids, (rows, args.subspaces), dtype=torch.uint8, generator=gen)
    books = torch.randn(args.subspaces, args.centroids, args.dim // args.subspaces, generator=gen)
    pq = PQEmbeddingBagCollection([table], {"t": codes}, {"t": books})
    return {
        "float": float_ebc,
        "lowrank": lowrank,
        "pq": pq,
        "int8": int8_collection(float_ebc, kernel=False),
        "int8k": int8_collection(float_ebc, kernel=True),
    }


def huge_page_collections(built: dict[str, nn.Module], rows: int) -> dict[str, nn.Module]:
    """Second instances of ``built``, their large tensors moved into 2 MiB pages."""
    copies = {name: copy.deepcopy(built[name]) for name in ("float", "lowrank", "pq")}
    # fbgemm's TBE holds TorchScript objects that deepcopy refuses: quantize again (same rows)
    copies["int8"] = int8_collection(built["float"], kernel=False)
    copies["int8k"] = int8_collection(built["float"], kernel=True)
    for name, module in copies.items():
        moved = use_huge_pages_(module)
        # the largest storage: the table, factor table, codes or int8 rows
        largest = max(
            t.untyped_storage().nbytes() for t in [*module.parameters(), *module.buffers()]
        )
        print(
            f"{rows:,} rows, {METHODS[name]}: {sum(moved.values()) >> 20} MiB in 2 MiB pages "
            f"(its largest tensor: {largest >> 20} MiB)"
        )
    return copies


def target_lines(results: dict[tuple[str, str, int, str], float], pages: tuple[str, ...]) -> str:
    """Per issue-17 target: the range of its speed-up over the sizes and id distributions."""
    lines = []
    for method, threads, goal in TARGETS:
        for page in pages:
            ratios = [
                results[(f, d, t, "float 4K")] / value
                for (f, d, t, m), value in results.items()
                if m == f"{method} {page}" and t == threads
            ]
            if ratios:
                met = "met" if min(ratios) >= goal else "missed"
                lines.append(
                    f"- {METHODS[method]}, {threads} thread(s), {page} pages: "
                    f"{min(ratios):.2f}-{max(ratios):.2f}x the float EBC (4K pages); "
                    f"target >= {goal}x {met}"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1000000,8000000", help="comma-separated table sizes")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--subspaces", type=int, default=16)
    parser.add_argument("--centroids", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pooling", type=int, default=20, help="ids per bag (fixed)")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument(
        "--multi-thread-methods",
        default="int8,int8k",
        help="methods timed (with the float EBC) at more than one thread",
    )
    parser.add_argument("--repeats", type=int, default=51)
    parser.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of skewed ids")
    parser.add_argument("--batches", type=int, default=8, help="distinct id batches per cell")
    args = parser.parse_args()
    title = run_header("Pooled lookup: low-rank, PQ and int8 against TorchRec's float EBC")
    unavailable = huge_pages_unavailable()
    pages = ("4K",) if unavailable else ("4K", "2M")
    if unavailable:
        print(f"huge pages unavailable ({unavailable}): 4 KiB pages only")
    gen = torch.Generator().manual_seed(0)
    num_ids = args.batch * args.pooling
    lengths = torch.full((args.batch,), args.pooling)
    multi = {"float", *args.multi_thread_methods.split(",")}
    results: dict[tuple[str, str, int, str], float] = {}  # (rows, ids, threads, "method pages")
    for rows in [int(r) for r in args.rows.split(",")]:
        built = build_collections(args, rows, gen)
        copies = huge_page_collections(built, rows) if "2M" in pages else {}
        modules = {f"{m} 4K": built[m] for m in METHODS} | {f"{m} 2M": copies[m] for m in copies}
        draws: dict[str, Callable[[], torch.Tensor]] = {
            "uniform": functools.partial(torch.randint, rows, (num_ids,), generator=gen),
            f"zipf {args.zipf}": functools.partial(zipf_ids, num_ids, rows, args.zipf, gen),
        }
        for dist, draw in draws.items():
            kjts = [
                KeyedJaggedTensor.from_lengths_sync(["f"], draw(), lengths)
                for _ in range(args.batches)
            ]
            with torch.no_grad():  # pages move memory, never values; the kernel gives fbgemm's
                expected = {m: modules[f"{m} 4K"](kjts[0]).values() for m in METHODS}
                for name, module in modules.items():
                    method = name.split()[0]
                    reference = expected["int8" if method == "int8k" else method]
                    torch.testing.assert_close(module(kjts[0]).values(), reference)
            for threads in parse_threads(args.threads):
                batches = itertools.cycle(kjts)
                runs = {
                    name: functools.partial(_next_batch, module, batches)
                    for name, module in modules.items()
                    if threads == 1 or name.split()[0] in multi
                }
                timings = time_interleaved(runs, threads=threads, repeats=args.repeats)
                for name, timing in timings.items():
                    results[(f"{rows:,}", dist, threads, name)] = timing.median_ms
        del built, copies, modules
        gc.collect()
    print(title)
    print(
        f"tables {args.rows} x {args.dim}, low-rank k={args.rank}, PQ M={args.subspaces} "
        f"K={args.centroids}, int8 rows; batch {args.batch}, pooling {args.pooling}; medians of "
        f"{args.repeats} interleaved repeats (ms)\n"
    )
    cells = sorted({key[:3] for key in results}, key=lambda k: (int(k[0].replace(",", "")), k[1:]))
    ms_rows, ratio_rows = [], []
    for rows_label, dist, threads in cells:
        for page in pages:
            row = [results.get((rows_label, dist, threads, f"{m} {page}")) for m in METHODS]
            ms_rows.append([rows_label, dist, threads, page, *(v if v else "-" for v in row)])
            base = results[(rows_label, dist, threads, "float 4K")]
            base_same = results[(rows_label, dist, threads, f"float {page}")]
            ratio_rows.append(
                [rows_label, dist, threads, page]
                + [
                    "-"
                    if v is None
                    else f"{base / v:.2f}" + (f" ({base_same / v:.2f})" if page != "4K" else "")
                    for v in row[1:]
                ]
            )
    header = ["rows", "ids", "threads", "pages"]
    print(markdown_table([*header, *METHODS.values()], ms_rows))
    print(
        "\nspeed-up = float EBC in 4 KiB pages (as TorchRec ships) / method; in brackets: "
        "float EBC in 2 MiB pages / method\n"
    )
    print(markdown_table([*header, *list(METHODS.values())[1:]], ratio_rows))
    print("\n" + target_lines(results, pages))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average at the end (1, 5, 15 min): {load}")


if __name__ == "__main__":
    main()
