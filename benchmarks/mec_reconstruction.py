"""Can MEC's training beat its k-means start?  Reconstruction error of one table, three weightings.

Trains the quantizers of one table of a trained DLRM checkpoint (``examples.dlrm.main --out DIR``)
with plain k-means (PQ, also MEC's starting point) and with MEC variants that end with their last
training state, and prints each one's error relative to the rows' norms, ``Σ w_i ||e_i - ê_i||² /
Σ w_i ||e_i||²``, weighted three ways: by ``max(1, ⌊log2 n_i⌋)`` (what MEC's training samples by),
by the lookup counts ``n_i`` (what the CTR model reads), and uniformly.  Lookups are counted over
``--batches`` training batches.

Example::

    python -m examples.dlrm.main --dataset synthetic --epochs 2 --out /tmp/syn
    python benchmarks/mec_reconstruction.py --checkpoint /tmp/syn/checkpoint --table t_f8
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from common import run_header
from popularity import EBC, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from torchrec_compress import MECConfig, MECTraining  # noqa: E402
from torchrec_compress.data import get_dataset  # noqa: E402
from torchrec_compress.methods.pq.fitting import fit_quantizer
from torchrec_compress.methods.pq.quantizer import decode  # noqa: E402
from torchrec_compress.methods.pq.training import MECQuantizer, row_weights
from torchrec_compress.statistics import count_lookups

RECONSTRUCTION_ONLY = {"contrastive_weight": 0.0, "balance_weight": 0.0, "commitment_weight": 0.0}


def variants(subspaces: int) -> dict[str, MECConfig]:
    def mec(**training: float) -> MECConfig:
        return MECConfig(num_subspaces=subspaces, training=MECTraining(keep_best=False, **training))

    return {
        "k-means (PQ, also MEC's start)": MECConfig(num_subspaces=subspaces, mode="pq"),
        "MEC, reconstruction loss only": mec(**RECONSTRUCTION_ONLY),
        "MEC, reconstruction only, learning rate 1e-4": mec(
            learning_rate=1e-4, **RECONSTRUCTION_ONLY
        ),
        "MEC, reconstruction only, no re-seeding": mec(reseed_interval=0, **RECONSTRUCTION_ONLY),
        "MEC default (contrastive + balance)": mec(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-path", default=None)
    p.add_argument("--checkpoint", required=True, help="DCP checkpoint of examples.dlrm.main")
    p.add_argument("--seed", type=int, default=0, help="the data seed it was trained with")
    p.add_argument("--table", default="t_f8")
    p.add_argument("--subspaces", type=int, default=8)
    p.add_argument("--batches", type=int, default=50, help="training batches of 8192 counted")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = get_dataset(args.dataset, path=args.data_path, seed=args.seed)
    ebc = load_model(data, args.checkpoint).get_submodule(EBC)
    counts = count_lookups(
        ebc.embedding_bag_configs(), islice(data.batches("train", 8192), args.batches)
    )[args.table]
    weight = ebc.embedding_bags[args.table].weight.detach()
    n = counts.double()
    log2 = row_weights(counts, weight.shape[0]).double()
    norms = weight.double().pow(2).sum(1)
    print(run_header(f"MEC vs its k-means start on {args.table} ({weight.shape[0]} rows)"))
    print(f"rows never looked up: {float((n == 0).double().mean()):.2f}\n")
    print(
        "| quantizer (last state) | log2 n-weighted error | lookup-weighted error | uniform error | s |"
    )
    print("|---|---|---|---|---|")
    for name, config in variants(args.subspaces).items():
        start = time.time()
        quantizer = fit_quantizer(weight, counts, config, args.table)
        codes = quantizer.compute_codes(weight)
        with torch.no_grad():
            books = (
                quantizer.decoded_codebooks()
                if isinstance(quantizer, MECQuantizer)
                else quantizer.codebooks
            )
            errors = (weight - decode(codes, books.detach())).pow(2).sum(1).double()
        print(
            f"| {name} | {float(log2 @ errors / (log2 @ norms)):.4f} "
            f"| {float(n @ errors / (n @ norms)):.4f} | {float(errors.sum() / norms.sum()):.4f} "
            f"| {time.time() - start:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
