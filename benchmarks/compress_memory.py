"""Peak memory and wall time of ``compress_`` on one large table, today's code next to a baseline.

Every case runs in a fresh Python process: it builds an ``EmbeddingBagCollection`` with one
``rows x dim`` float32 table (low-rank structure plus noise, written block by block) and a tiny
second table, draws a few calibration batches of Zipf-distributed ids, and times
``compress_(model, AFMConfig(rank=...))``, ``compress_(model, MECConfig())`` or
``compress_(model, PQConfig())`` (defaults; ``--methods afm,mec,pq``).  The child reports its own
peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``, read right after ``compress_``) and the
resident set after its imports, so the table is judged against what compression adds:
``peak - imports``, next to the table's bytes (and the factor table's, for AFM).  For MEC and PQ
it also reports the time spent in k-means (``ProductQuantizer.train``) and, after the peak is
read, the reconstruction MSE of table ``big`` (every row alike, and weighted by the calibration
lookups), regenerated block by block.

With ``--baseline-src DIR`` (a checkout of an older commit, its compiled ``_C*.so`` copied in) the
same cases run with that ``torchrec_compress`` first, then with this one, one process at a time,
and the results are compared (codes, factor tables, metrics, time and peak ratios), e.g.::

    git worktree add ../base 40805dd && cp torchrec_compress/_C*.so ../base/torchrec_compress/
    python benchmarks/compress_memory.py --rows 20000000 --baseline-src ../base

``--repeats N`` runs every case N times, baseline and today alternating (a burst of load from
elsewhere hits both), and reports the median times.

Each child saves its compressed table to ``--save-dir`` after measuring (``--save-dir ''`` skips
it) so the parent can count differing codes and compare the factor tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from common import markdown_table, run_header, zipf_ids

GIB = 2**30


def current_rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def build_model(rows: int, dim: int, seed: int) -> torch.nn.Module:
    """``nn.Sequential(EBC)``: table ``big`` (``rows x dim``) and table ``small`` (100 rows)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    tables = [
        EmbeddingBagConfig(
            name="big", embedding_dim=dim, num_embeddings=rows, feature_names=["f_big"]
        ),
        EmbeddingBagConfig(
            name="small", embedding_dim=dim, num_embeddings=100, feature_names=["f_small"]
        ),
    ]
    ebc = EmbeddingBagCollection(tables)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = ebc.embedding_bags["big"].weight
        for start, block in big_table_blocks(rows, dim, gen):
            weight[start : start + block.shape[0]] = block
        ebc.embedding_bags["small"].weight.normal_(generator=gen)
    return torch.nn.Sequential(ebc)


def big_table_blocks(
    rows: int, dim: int, gen: torch.Generator
) -> Iterator[tuple[int, torch.Tensor]]:
    """Table ``big`` in blocks of 65536 rows (no table-sized temporaries): 8 latent directions
    plus noise; the same blocks again for the same seed (the quality check regenerates them)."""
    directions = torch.randn(8, dim, generator=gen)
    for start in range(0, rows, 1 << 16):
        latent = torch.randn(min(1 << 16, rows - start), 8, generator=gen)
        yield start, latent @ directions + 0.3 * torch.randn(latent.shape[0], dim, generator=gen)


def calibration_batches(rows: int, args: argparse.Namespace) -> list:
    """``--batches`` KJTs: ``--pooling`` Zipf ids per bag of ``big``, one id per bag of ``small``."""
    from torchrec import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = []
    for _ in range(args.batches):
        size = args.batch_size
        big = zipf_ids(size * args.pooling, rows, 1.05, gen)
        small = torch.randint(100, (size,), generator=gen)
        lengths = torch.cat([torch.full((size,), args.pooling), torch.ones(size, dtype=torch.long)])
        batches.append(
            KeyedJaggedTensor.from_lengths_sync(
                keys=["f_big", "f_small"], values=torch.cat([big, small]), lengths=lengths
            )
        )
    return batches


def compressed_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What ``compress_`` made of table ``big``: codes and codebooks, or factors and projection."""
    module = model[0]
    if hasattr(module, "codes"):
        return {"codes": module.codes.big, "codebooks": module.codebooks["big"].detach()}
    return {
        "factors": module.factor_ebc.embedding_bags["big"].weight.detach(),
        "projection": module.projection["big"].detach(),
    }


def reconstruction_errors(
    model: torch.nn.Module, args: argparse.Namespace, batches: list
) -> dict[str, float]:
    """MSE per element of table ``big`` against its regenerated rows: every row alike, and
    weighted by the calibration lookups (``mse``, ``weighted_mse``)."""
    module = model[0]
    codes, books = module.codes.big, module.codebook("big").detach()
    counts = torch.zeros(args.rows, dtype=torch.float64)
    for batch in batches:
        counts += torch.bincount(batch["f_big"].values(), minlength=args.rows).double()
    offsets = torch.arange(books.shape[0]) * books.shape[1]
    squared, weighted = 0.0, 0.0
    for start, block in big_table_blocks(
        args.rows, args.dim, torch.Generator().manual_seed(args.seed)
    ):
        part = codes[start : start + block.shape[0]].long() + offsets
        decoded = books.reshape(-1, books.shape[2])[part].reshape(block.shape)
        per_row = (decoded - block).pow(2).sum(1).double()
        squared += float(per_row.sum())
        weighted += float(per_row @ counts[start : start + block.shape[0]])
    return {
        "mse": squared / (args.rows * args.dim),
        "weighted_mse": weighted / (float(counts.sum()) * args.dim),
    }


def timed_kmeans() -> list[float]:
    """Wraps ``ProductQuantizer.train`` of whichever ``torchrec_compress`` was imported: the
    returned list collects the seconds of every call."""
    from torchrec_compress.methods.pq.quantizer import ProductQuantizer

    seconds: list[float] = []
    train = ProductQuantizer.train

    def timed(self: ProductQuantizer, *a: object, **kw: object) -> None:
        start = time.perf_counter()
        train(self, *a, **kw)  # type: ignore[arg-type]
        seconds.append(time.perf_counter() - start)

    ProductQuantizer.train = timed  # type: ignore[method-assign]
    return seconds


def child(args: argparse.Namespace) -> None:
    """One case in this process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    import warnings

    import torchrec_compress
    from torchrec_compress import AFMConfig, MECConfig, PQConfig, compress_

    warnings.simplefilter("ignore")
    import_rss = current_rss_bytes()
    start = time.perf_counter()
    model = build_model(args.rows, args.dim, args.seed)
    batches = calibration_batches(args.rows, args)
    build_seconds = time.perf_counter() - start
    config = {"afm": AFMConfig(rank=args.rank), "mec": MECConfig(), "pq": PQConfig()}[args.method]
    kmeans_seconds = timed_kmeans()
    start = time.perf_counter()
    report = compress_(model, config, calibration=batches)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = next(r for r in report.rows if r.name == "big")
    result = {
        "source": os.path.dirname(os.path.dirname(torchrec_compress.__file__)),
        "import_rss": import_rss,
        "peak_rss": peak,
        "seconds": seconds,
        "build_seconds": build_seconds,
        "bytes_after": row.bytes_after,
        "perplexity": row.perplexity,
        "explained_variance": row.explained_variance,
        "kmeans_seconds": sum(kmeans_seconds),
    }
    if args.method != "afm":  # after the peak was read: regenerating rows does not count
        result.update(reconstruction_errors(model, args, batches))
    if args.save:
        torch.save(compressed_tensors(model), args.save)
    print(json.dumps(result), flush=True)


def run_case(args: argparse.Namespace, source: str, method: str, save: str) -> dict:
    """Runs one case in a fresh interpreter with ``source`` first on ``PYTHONPATH``."""
    command = [sys.executable, __file__, "--child", "--method", method, "--save", save]
    for flag in ("rows", "dim", "rank", "batches", "batch_size", "pooling", "seed", "threads"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} with {source} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    print(f"{method:4s} {source}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def compare(method: str, old_path: str, new_path: str) -> str:
    """How far today's compressed table is from the baseline's (same inputs, same seeds)."""
    old, new = torch.load(old_path), torch.load(new_path)
    if method != "afm":
        differing = int((old["codes"] != new["codes"]).any(1).sum())
        books = float((old["codebooks"] - new["codebooks"]).abs().max())
        return f"{differing} of {old['codes'].shape[0]} rows with other codes; codebooks differ by ≤ {books:.2e}"
    factors = float((old["factors"] - new["factors"]).abs().max())
    projection = float((old["projection"] - new["projection"]).abs().max())
    return f"factor tables differ by ≤ {factors:.2e}, projections by ≤ {projection:.2e}"


def summary(results: list[dict]) -> dict:
    """The repeats of one case: median times, the largest peak, the first run's quality (every
    run of a case computes the same tables)."""
    worst = max(results, key=lambda r: r["peak_rss"] - r["import_rss"])
    return {
        **results[0],
        "seconds": statistics.median(r["seconds"] for r in results),
        "kmeans_seconds": statistics.median(r["kmeans_seconds"] for r in results),
        "peak_rss": worst["peak_rss"],
        "import_rss": worst["import_rss"],
        "all_seconds": [round(r["seconds"], 2) for r in results],
    }


def added_target(method: str, args: argparse.Namespace) -> tuple[float, float]:
    """What compression added to the resident set may reach: table + 1 GB (MEC, PQ), table +
    factor table + 0.5 GB (AFM), in bytes; and the table's bytes."""
    table = args.rows * args.dim * 4
    factor = args.rows * args.rank * 4
    return table + (factor + 0.5e9 if method == "afm" else 1e9), table


def table_row(label: str, method: str, result: dict, args: argparse.Namespace) -> list:
    """One line of the result table; targets in decimal GB as the issue states them."""
    target, table = added_target(method, args)
    added = result["peak_rss"] - result["import_rss"]
    if method == "afm":
        quality = f"explained variance {result['explained_variance']:.4f}"
    else:
        quality = (
            f"perplexity {result['perplexity']:.1f}; MSE {result['mse']:.5f}, "
            f"lookup-weighted {result['weighted_mse']:.5f}"
        )
    return [
        f"{method.upper()} {label}",
        f"{result['peak_rss'] / GIB:.2f}",
        f"{result['peak_rss'] / table:.2f}x",
        f"{added / GIB:.2f}",
        f"{target / GIB:.2f} {'✔' if added <= target else '✘'}",
        f"{result['seconds']:.1f} ({', '.join(f'{t:.1f}' for t in result['all_seconds'])})",
        f"{result['kmeans_seconds']:.2f}" if method != "afm" else "-",
        quality,
    ]


def ratios(method: str, old: dict, new: dict, args: argparse.Namespace) -> str:
    """Today against the baseline: speed-ups, peaks against the target, quality."""
    target, _ = added_target(method, args)
    added = [(r["peak_rss"] - r["import_rss"]) / GIB for r in (old, new)]
    line = (
        f"- {method.upper()}: compress_ {old['seconds']:.1f} s -> {new['seconds']:.1f} s "
        f"(**{old['seconds'] / new['seconds']:.2f}x** faster, medians)"
    )
    if method != "afm":
        line += (
            f"; k-means {old['kmeans_seconds']:.2f} s -> {new['kmeans_seconds']:.2f} s "
            f"({old['kmeans_seconds'] / max(new['kmeans_seconds'], 1e-9):.1f}x); MSE "
            f"{old['mse']:.5f} -> {new['mse']:.5f} ({new['mse'] / old['mse'] - 1:+.2%}), "
            f"lookup-weighted {old['weighted_mse']:.5f} -> {new['weighted_mse']:.5f} "
            f"({new['weighted_mse'] / old['weighted_mse'] - 1:+.2%})"
        )
    within = ["within" if a * GIB <= target else "OVER" for a in added]
    return line + (
        f"; peak - imports {added[0]:.2f} GiB ({within[0]}) -> {added[1]:.2f} GiB ({within[1]}) "
        f"of the {target / GIB:.2f} GiB bound"
    )


def run_method(
    args: argparse.Namespace, sources: dict[str, str], method: str
) -> tuple[list[list], list[str]]:
    """Every source's runs of ``method`` (alternating, ``--repeats`` rounds): its table rows and
    the lines comparing today with the baseline."""
    saved: dict[str, str] = {}
    results: dict[str, list[dict]] = {label: [] for label in sources}
    for repeat in range(args.repeats):
        for label, source in sources.items():
            save = ""
            if args.save_dir and repeat == 0:
                save = saved[label] = os.path.join(args.save_dir, f"{method}_{label}.pt")
            results[label].append(run_case(args, source, method, save))
    summaries = {label: summary(runs) for label, runs in results.items()}
    rows = [table_row(label, method, summaries[label], args) for label in sources]
    notes = []
    if len(sources) == 2:
        notes.append(ratios(method, summaries["baseline"], summaries["today"], args))
    if len(saved) == 2:
        notes.append(f"  - {compare(method, saved['baseline'], saved['today'])}")
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8, help="AFM rank")
    parser.add_argument("--methods", default="afm,mec", help="comma-separated: afm, mec, pq")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--pooling", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (median times)")
    parser.add_argument("--baseline-src", default=None, help="checkout of the baseline commit")
    parser.add_argument("--save-dir", default="/tmp/compress_memory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="mec", help=argparse.SUPPRESS)
    parser.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    header = run_header(f"compress_ memory and time: one {args.rows:,} x {args.dim} table")
    sources = {"today": str(Path(__file__).resolve().parent.parent)}
    if args.baseline_src:
        sources = {"baseline": str(Path(args.baseline_src).resolve()), **sources}
    if args.save_dir:
        os.makedirs(args.save_dir, exist_ok=True)
    rows, notes = [], []
    for method in args.methods.split(","):
        method_rows, method_notes = run_method(args, sources, method)
        rows += method_rows
        notes += method_notes
    table_gib = args.rows * args.dim * 4 / GIB
    print(header)
    print(
        f"- table: {table_gib:.2f} GiB float32; targets: MEC and PQ table + 1 GB, AFM table + "
        f"factor table ({args.rows * args.rank * 4 / GIB:.2f} GiB at rank {args.rank}) + 0.5 GB; "
        "MEC, PQ: MECConfig(), PQConfig() defaults; "
        f"{args.batches} calibration batches of {args.batch_size} x {args.pooling} ids; "
        f"{args.threads} torch thread(s); {args.repeats} run(s) per case"
        + (", baseline and today alternating\n" if len(sources) == 2 else "\n")
    )
    print(
        markdown_table(
            [
                "case",
                "peak RSS GiB",
                "peak / table",
                "peak - imports GiB",
                "target GiB (peak - imports)",
                "compress_ s: median (runs)",
                "k-means s",
                "quality (table big)",
            ],
            rows,
        )
    )
    if notes:
        print("\nToday against the baseline:\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
