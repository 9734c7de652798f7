"""Quality of product quantization on a trained DLRM's tables: plain PQ vs MEC, with and without
popularity weighting and the balance term.

Loads the tables of a DLRM checkpoint written by ``examples.dlrm.main --out DIR`` (a DCP
checkpoint ``DIR/checkpoint`` with its metadata) into an unsharded model, counts the lookups
of every row over the training split, and quantizes every table in three modes:

* ``pq``: popularity-weighted k-means only (``MECConfig(mode="pq")``);
* ``mec-plain``: MEC training without popularity weighting and without the balance term;
* ``mec-full``: MEC with both (the paper's setting, ``MECConfig()`` defaults);
* ``mec-full-last``: the same run ending with its last state instead of the best one by
  validation MSE (``keep_best=False``): what training alone does to the k-means start.

Per table and mode it prints the codebook usage perplexity (min / mean over subspaces, every
row counted once and rows weighted by their lookup counts), its ratio to ``K' = min(K, rows)``
(``K`` is capped at the table's rows: a table of 7 rows can use at most 7 codewords, so the
perplexity target ``>= 0.5 K`` is judged against ``K'``), the distinct code tuples, and the
reconstruction MSE per element weighted by lookup counts (what the CTR model sees), by the
popularity weights ``max(1, floor(log2 n))`` (what PQ/MEC optimise) and unweighted, and the
share of rows whose MEC codes differ from the ``pq`` mode's (the same k-means start): whether MEC
training moved the codes at all.

Example::

    python -m examples.dlrm.main --dataset frappe --data-path ../shared/data/frappe \\
        --embedding-dim 64 --dense-arch 64 --over-arch 400,400,400 --epochs 30 --patience 3 \\
        --sparse-lr 0.01 --threads 1 --out /tmp/pqq/frappe64
    python benchmarks/pq_quality.py --dataset frappe --data-path ../shared/data/frappe \\
        --checkpoint /tmp/pqq/frappe64/checkpoint
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from common import markdown_table, run_header

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.dlrm.model import ModelConfig, build_model  # noqa: E402
from torchrec_compress.checkpoint import read_metadata  # noqa: E402
from torchrec_compress.data import get_dataset  # noqa: E402
from torchrec_compress.discovery import find_embedding_bag_collections  # noqa: E402
from torchrec_compress.methods.pq import (  # noqa: E402
    reconstruction_mse,
    row_weights,
    train_pq_table,
)
from torchrec_compress.methods.pq.config import MECConfig, MECTraining
from torchrec_compress.statistics import count_lookups

# mode -> (MECConfig fields, MECTraining fields)
MODES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "pq": ({"mode": "pq"}, {}),
    "mec-plain": ({"popularity_weighting": False}, {"balance_weight": 0.0}),
    "mec-full": ({}, {}),
    "mec-full-last": ({}, {"keep_best": False}),
}


@dataclass
class Row:
    table: str
    rows: int
    mode: str
    ksub: int
    perplexity_min: float
    perplexity_mean: float
    count_perplexity_min: float
    count_perplexity_mean: float
    distinct: int
    count_mse: float
    popularity_mse: float
    mse: float
    seconds: float
    # share of rows whose codes differ from the same table's "pq" mode codes (same k-means
    # start): how far MEC training moved the codes; None without a "pq" row before it
    codes_changed: float | None = None


def load_tables(
    dataset: str, data_path: str | None, checkpoint: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Table name -> (trained weight, lookup counts over the training split)."""
    data = get_dataset(dataset, path=data_path)
    model_config = ModelConfig(**read_metadata(checkpoint)["model"])
    model = build_model(data.schema, model_config, torch.device("cpu"))
    # A DCP checkpoint loads into a plain (unsharded) state dict without a process group.
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)
    model.load_state_dict(state["model"])
    (ebc,) = find_embedding_bag_collections(model).values()
    counts = count_lookups(ebc.embedding_bag_configs(), data.batches("train", 8192))
    return {
        t.name: (ebc.embedding_bags[t.name].weight.detach().clone(), counts[t.name])
        for t in ebc.embedding_bag_configs()
    }


_PQ_CODES: dict[str, torch.Tensor] = {}


def measure(
    name: str, weight: torch.Tensor, counts: torch.Tensor, mode: str, config: MECConfig
) -> Row:
    start = time.perf_counter()
    codes, codebooks, metrics = train_pq_table(weight, counts, config, name)
    if mode == "pq":
        _PQ_CODES[name] = codes
    changed = None
    if name in _PQ_CODES and mode != "pq":
        changed = float((codes != _PQ_CODES[name]).any(1).float().mean())
    seconds = time.perf_counter() - start
    ksub = codebooks.shape[1]
    perplexity = torch.tensor(metrics.perplexity)
    count_perplexity = torch.tensor(metrics.weighted_perplexity)
    popularity = row_weights(counts, weight.shape[0])
    return Row(
        table=name,
        rows=weight.shape[0],
        mode=mode,
        ksub=ksub,
        perplexity_min=float(perplexity.min()),
        perplexity_mean=float(perplexity.mean()),
        count_perplexity_min=float(count_perplexity.min()),
        count_perplexity_mean=float(count_perplexity.mean()),
        distinct=metrics.distinct_codes,
        count_mse=metrics.weighted_mse,
        popularity_mse=reconstruction_mse(weight, codes, codebooks, popularity),
        mse=metrics.mse,
        seconds=seconds,
        codes_changed=changed,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=["synthetic", "frappe", "criteo"], default="synthetic")
    p.add_argument("--data-path", default=None)
    p.add_argument(
        "--checkpoint", required=True, help="DCP checkpoint dir written by examples.dlrm"
    )
    p.add_argument("--num-subspaces", type=int, default=8)
    p.add_argument("--num-centroids", type=int, default=256)
    p.add_argument("--steps", type=int, default=MECTraining.steps)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--tables", default="", help="comma-separated subset (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tables = load_tables(args.dataset, args.data_path, args.checkpoint)
    if args.tables:
        tables = {name: tables[name] for name in args.tables.split(",")}
    rows: list[Row] = []
    for name, (weight, counts) in tables.items():
        for mode in args.modes.split(","):
            config = MECConfig(
                num_subspaces=args.num_subspaces,
                num_centroids=args.num_centroids,
                training=MECTraining(steps=args.steps, **MODES[mode][1]),
                **MODES[mode][0],
            )
            rows.append(measure(name, weight, counts, mode, config))
            print(rows[-1], file=sys.stderr, flush=True)

    print(run_header(f"PQ / MEC quality on {args.dataset} tables (d={weight.shape[1]})"))
    print(
        f"M={args.num_subspaces}, K={args.num_centroids} (K' = min(K, rows)), "
        f"MEC steps={args.steps}; lookup counts from the training split.\n"
    )
    header = (
        "table",
        "rows",
        "mode",
        "K'",
        "ppl min/mean",
        "ppl min / K'",
        "count-w. ppl min/mean",
        "distinct tuples",
        "count-w. MSE",
        "pop.-w. MSE",
        "MSE",
        "codes != PQ",
        "s",
    )
    print(
        markdown_table(
            header,
            [
                (
                    r.table,
                    r.rows,
                    r.mode,
                    r.ksub,
                    f"{r.perplexity_min:.1f} / {r.perplexity_mean:.1f}",
                    f"{r.perplexity_min / r.ksub:.2f}",
                    f"{r.count_perplexity_min:.1f} / {r.count_perplexity_mean:.1f}",
                    r.distinct,
                    f"{r.count_mse:.4e}",
                    f"{r.popularity_mse:.4e}",
                    f"{r.mse:.4e}",
                    "-" if r.codes_changed is None else f"{r.codes_changed:.1%}",
                    f"{r.seconds:.1f}",
                )
                for r in rows
            ],
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
