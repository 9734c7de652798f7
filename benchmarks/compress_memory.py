"""Peak memory and wall time of ``compress_`` on one large table, today's code next to a baseline.

Every case runs in a fresh Python process: it builds an ``EmbeddingBagCollection`` with one
``rows x dim`` float32 table (low-rank structure plus noise, written block by block) and a tiny
second table, draws a few calibration batches of Zipf-distributed ids, and times
``compress_(model, AFMConfig(rank=...))`` or ``compress_(model, MECConfig())`` (defaults).  The
child reports its own peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``, read right after
``compress_``) and the resident set after its imports, so the table is judged against what
compression adds: ``peak - imports``, next to the table's bytes (and the factor table's, for AFM).

With ``--baseline-src DIR`` (a checkout of an older commit, its compiled ``_C*.so`` copied in) the
same cases run with that ``torchrec_compress`` first, then with this one, one process at a time,
and the results are compared (codes, factor tables, metrics), e.g.::

    git worktree add ../base 40805dd && cp torchrec_compress/_C*.so ../base/torchrec_compress/
    python benchmarks/compress_memory.py --rows 20000000 --baseline-src ../base

Each child saves its compressed table to ``--save-dir`` after measuring (``--save-dir ''`` skips
it) so the parent can count differing codes and compare the factor tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
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
    directions = torch.randn(8, dim, generator=gen)
    with torch.no_grad():
        weight = ebc.embedding_bags["big"].weight
        for start in range(0, rows, 1 << 16):  # small blocks: no table-sized temporaries
            block = weight[start : start + (1 << 16)]
            latent = torch.randn(block.shape[0], 8, generator=gen)
            block.copy_(latent @ directions + 0.3 * torch.randn(block.shape, generator=gen))
        ebc.embedding_bags["small"].weight.normal_(generator=gen)
    return torch.nn.Sequential(ebc)


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


def child(args: argparse.Namespace) -> None:
    """One case in this process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    import warnings

    import torchrec_compress
    from torchrec_compress import AFMConfig, MECConfig, compress_

    warnings.simplefilter("ignore")
    import_rss = current_rss_bytes()
    start = time.perf_counter()
    model = build_model(args.rows, args.dim, args.seed)
    batches = calibration_batches(args.rows, args)
    build_seconds = time.perf_counter() - start
    config = AFMConfig(rank=args.rank) if args.method == "afm" else MECConfig()
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
    }
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
    if method == "mec":
        differing = int((old["codes"] != new["codes"]).any(1).sum())
        books = float((old["codebooks"] - new["codebooks"]).abs().max())
        return f"{differing} of {old['codes'].shape[0]} rows with other codes; codebooks differ by ≤ {books:.2e}"
    factors = float((old["factors"] - new["factors"]).abs().max())
    projection = float((old["projection"] - new["projection"]).abs().max())
    return f"factor tables differ by ≤ {factors:.2e}, projections by ≤ {projection:.2e}"


def table_row(label: str, method: str, result: dict, args: argparse.Namespace) -> list:
    """One line of the result table; targets in decimal GB as the issue states them."""
    table = args.rows * args.dim * 4
    added = result["peak_rss"] - result["import_rss"]
    factor = args.rows * args.rank * 4
    target = table + (factor + 0.5e9 if method == "afm" else 1e9)
    quality = (
        f"perplexity {result['perplexity']:.1f}"
        if method == "mec"
        else f"explained variance {result['explained_variance']:.4f}"
    )
    return [
        f"{method.upper()} {label}",
        f"{result['peak_rss'] / GIB:.2f}",
        f"{result['peak_rss'] / table:.2f}x",
        f"{added / GIB:.2f}",
        f"{target / GIB:.2f} {'✔' if added <= target else '✘'}",
        f"{result['seconds']:.0f}",
        quality,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8, help="AFM rank")
    parser.add_argument("--methods", default="afm,mec")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--pooling", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
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
        saved = {}
        for label, source in sources.items():
            save = os.path.join(args.save_dir, f"{method}_{label}.pt") if args.save_dir else ""
            rows.append(table_row(label, method, run_case(args, source, method, save), args))
            saved[label] = save
        if args.save_dir and len(saved) == 2:
            notes.append(
                f"- {method.upper()}: {compare(method, saved['baseline'], saved['today'])}"
            )
    table_gib = args.rows * args.dim * 4 / GIB
    print(header)
    print(
        f"- table: {table_gib:.2f} GiB float32; targets: MEC table + 1 GB, AFM table + factor "
        f"table ({args.rows * args.rank * 4 / GIB:.2f} GiB at rank {args.rank}) + 0.5 GB; "
        "MEC: MECConfig() defaults; "
        f"{args.batches} calibration batches of {args.batch_size} x {args.pooling} ids; "
        f"{args.threads} torch thread(s)\n"
    )
    print(
        markdown_table(
            [
                "case",
                "peak RSS GiB",
                "peak / table",
                "peak - imports GiB",
                "target GiB (peak - imports)",
                "compress_ s",
                "quality",
            ],
            rows,
        )
    )
    if notes:
        print("\nToday against the baseline:\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
