"""Where each paper's mechanism should show: error and AUC split by id popularity.

MEC weights rows by popularity and adds contrastive and balance terms so that rare ids keep
distinct codes; AFM fits each table to what it *outputs* under real lookups (popular rows count
more) where SVD treats every row alike.  So each should beat its baseline (plain PQ, SVD) where
its mechanism acts, at equal bytes.  This script loads one trained DLRM checkpoint (written by
``examples.dlrm.main --out DIR``), counts every row's lookups over the training split, compresses
a copy of the model with each method (unsharded ``compress_``, calibration on the training
split), and reports, before any fine-tuning:

* the relative reconstruction error ``||e_i - ê_i||² / ||e_i||²`` of the rows, by popularity
  bucket of the rows: head (the 10% most looked-up rows of each table), torso (the next 40%),
  tail (the other 50%; mostly rows no training lookup reached), pooled over tables;
* the same error weighted by lookups (what the model sees);
* test AUC by popularity bucket of the *examples*: an example's popularity is its rarest id's
  lookup count (the minimum over its features' ids); head / torso / tail are the terciles;
* how many rows' codes MEC training moved away from plain PQ's (the same k-means start).

Run it on several seeds' checkpoints (``--checkpoint`` repeated) for means ± std.

Example::

    python -m examples.dlrm.main --dataset frappe --data-path ../shared/data/frappe \\
        --embedding-dim 16 --dense-arch 16 --over-arch 400,400,400 --epochs 30 --patience 3 \\
        --sparse-lr 0.01 --threads 1 --out /tmp/pop/frappe16
    python benchmarks/popularity.py --dataset frappe --data-path ../shared/data/frappe \\
        --checkpoint /tmp/pop/frappe16/checkpoint --methods afm:4,svd:4,mec:4,pq:4
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from common import markdown_table, mean_std, run_header
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: examples/

from examples.dlrm.compression import train_forward  # noqa: E402
from examples.dlrm.metrics import auc  # noqa: E402
from examples.dlrm.model import ModelConfig, build_model  # noqa: E402
from torchrec_compress import (  # noqa: E402
    LowRankEmbeddingBagCollection,  # noqa: E402
    MECConfig,
    MECTraining,
    PQConfig,
    compress_,
)
from torchrec_compress.checkpoint import read_metadata  # noqa: E402
from torchrec_compress.config import CompressionConfig
from torchrec_compress.data import CTRDataset, get_dataset  # noqa: E402
from torchrec_compress.methods.lowrank.config import AFMConfig, SVDConfig
from torchrec_compress.methods.pq import decode  # noqa: E402
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
from torchrec_compress.statistics import count_lookups

BUCKETS = ("head", "torso", "tail")
EBC = "model.sparse_arch.embedding_bag_collection"


def method_config(spec: str) -> CompressionConfig:
    """``afm:8`` / ``svd:8`` (rank, exact) or ``mec:8`` / ``pq:8`` (M one-byte codes, K=256);
    ``meclast:8``: MEC ending with its last state instead of the best by validation MSE."""
    name, _, size = spec.partition(":")
    value = int(size)
    if name in ("afm", "svd"):
        return (AFMConfig if name == "afm" else SVDConfig)(rank=value, rank_multiple=1)
    if name == "mec":
        return MECConfig(num_subspaces=value)
    if name == "meclast":
        return MECConfig(num_subspaces=value, training=MECTraining(keep_best=False))
    if name == "pq":
        return PQConfig(num_subspaces=value)
    raise SystemExit(f"--methods: unknown method {spec!r} (afm:K, svd:K, mec:M, pq:M)")


def load_model(data: CTRDataset, checkpoint: str) -> nn.Module:
    """The checkpoint's DLRM, unsharded on CPU (a DCP checkpoint loads without a process group)."""
    metadata = read_metadata(checkpoint)
    if not metadata and os.path.exists(os.path.join(checkpoint, "run.json")):
        with open(os.path.join(checkpoint, "run.json")) as f:  # written before checkpoint.save
            metadata = json.load(f)
    model_config = ModelConfig(**metadata["model"])
    model = build_model(data.schema, model_config, torch.device("cpu"))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)
    model.load_state_dict(state["model"])
    return model


def row_buckets(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row indices of head (top 10% by lookups), torso (next 40%) and tail (other 50%)."""
    order = torch.argsort(counts, descending=True, stable=True)
    n = len(order)
    head, torso = max(1, n // 10), max(1, n // 2)
    return {"head": order[:head], "torso": order[head:torso], "tail": order[torso:]}


def reconstructed_rows(model: nn.Module, name: str) -> torch.Tensor:
    """The rows a compressed collection serves for table ``name`` (``N x d``)."""
    ebc = model.get_submodule(EBC)
    if isinstance(ebc, LowRankEmbeddingBagCollection):
        factors = ebc.factor_rows(name).detach()  # (N, k), packed tables too
        if name not in ebc.ranks():
            return factors
        return factors @ ebc.projection[name].detach() + ebc.mean[name].detach()
    if isinstance(ebc, PQEmbeddingBagCollection):
        return decode(getattr(ebc.codes, name), ebc.codebook(name).detach())
    return ebc.embedding_bags[name].weight.detach()


@dataclass
class Result:
    """One method on one checkpoint."""

    ratio: float
    error: dict[str, float]
    weighted_error: float
    auc: dict[str, float]
    codes_changed: float | None = None


def errors(
    original: dict[str, torch.Tensor], model: nn.Module, counts: dict[str, torch.Tensor]
) -> tuple[dict[str, float], float]:
    """Relative squared error per bucket (rows pooled over tables) and lookup-weighted."""
    sums = {b: [0.0, 0.0] for b in BUCKETS}
    weighted = [0.0, 0.0]
    for name, rows in original.items():
        err = (reconstructed_rows(model, name) - rows).pow(2).sum(1).double()
        norm = rows.pow(2).sum(1).double()
        for bucket, index in row_buckets(counts[name]).items():
            sums[bucket][0] += float(err[index].sum())
            sums[bucket][1] += float(norm[index].sum())
        weighted[0] += float((counts[name] * err).sum())
        weighted[1] += float((counts[name] * norm).sum())
    relative = {b: s[0] / max(s[1], 1e-30) for b, s in sums.items()}
    return relative, weighted[0] / max(weighted[1], 1e-30)


def example_popularity(
    data: CTRDataset, counts: dict[str, torch.Tensor], batch_size: int
) -> Iterator[tuple[object, torch.Tensor]]:
    """Test batches with each example's rarest-id lookup count (an empty bag counts as +inf)."""
    tables = [f"t_{f}" for f in data.schema.sparse_features]
    for batch in data.batches("test", batch_size):
        features = batch.sparse_features.to_dict()
        rarest = torch.full((batch.labels.numel(),), float("inf"), dtype=torch.float64)
        for feature, table in zip(data.schema.sparse_features, tables, strict=True):
            bags = features[feature]
            looked = counts[table][bags.values()]
            minimum = torch.segment_reduce(looked, "min", lengths=bags.lengths(), unsafe=True)
            rarest = torch.minimum(rarest, torch.nan_to_num(minimum, posinf=float("inf")))
        yield batch, rarest


def bucket_aucs(
    model: nn.Module, data: CTRDataset, counts: dict[str, torch.Tensor], batch_size: int
) -> dict[str, float]:
    """Test AUC of the terciles of examples by their rarest id's popularity, and overall."""
    model.eval()
    logits, labels, popularity = [], [], []
    with torch.no_grad():
        for batch, rarest in example_popularity(data, counts, batch_size):
            _, (_, batch_logits, batch_labels) = model(batch)
            logits.append(batch_logits.flatten().float())
            labels.append(batch_labels.flatten().float())
            popularity.append(rarest)
    scores, targets, pop = torch.cat(logits), torch.cat(labels), torch.cat(popularity)
    order = torch.argsort(pop, descending=True, stable=True)
    parts = torch.tensor_split(order, 3)
    out = {b: auc(scores[idx], targets[idx]) for b, idx in zip(BUCKETS, parts, strict=True)}
    out["all"] = auc(scores, targets)
    return out


def measure(
    baseline: nn.Module,
    spec: str,
    data: CTRDataset,
    counts: dict[str, torch.Tensor],
    args: argparse.Namespace,
) -> tuple[Result, nn.Module]:
    model = copy.deepcopy(baseline)
    calibration = data.batches("train", args.batch_size)
    if args.calibration_batches:
        calibration = (
            b for _, b in zip(range(args.calibration_batches), calibration, strict=False)
        )
    report = compress_(
        model, method_config(spec), calibration=calibration, forward_fn=train_forward
    )
    ebc = baseline.get_submodule(EBC)
    original = {
        t.name: ebc.embedding_bags[t.name].weight.detach() for t in ebc.embedding_bag_configs()
    }
    error, weighted = errors(original, model, counts)
    result = Result(
        ratio=report.compression_ratio,
        error=error,
        weighted_error=weighted,
        auc=bucket_aucs(model, data, counts, args.batch_size),
    )
    return result, model


def codes_changed(models: dict[str, nn.Module], mec: str, pq: str) -> float:
    """Share of rows (all tables) whose MEC codes differ from plain PQ's."""
    a, b = models[mec].get_submodule(EBC), models[pq].get_submodule(EBC)
    changed = total = 0
    for t in a.embedding_bag_configs():
        ca, cb = getattr(a.codes, t.name), getattr(b.codes, t.name)
        changed += int((ca != cb).any(1).sum())
        total += ca.shape[0]
    return changed / max(total, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=["synthetic", "frappe", "criteo"], default="synthetic")
    p.add_argument("--data-path", default=None)
    p.add_argument(
        "--checkpoint", action="append", required=True, help="DCP checkpoint dir (repeat: seeds)"
    )
    p.add_argument(
        "--seeds",
        default=None,
        help="data seed of each checkpoint, in order (the --seed it was trained with; the "
        "synthetic data depends on it), e.g. 0,1,2; default 0 for all",
    )
    p.add_argument("--methods", default="afm:4,svd:4,mec:4,pq:4")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--calibration-batches", type=int, default=0, help="0: the whole train split")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the per-checkpoint results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = args.methods.split(",")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [0] * len(args.checkpoint)
    if len(seeds) != len(args.checkpoint):
        p.error(f"--seeds has {len(seeds)} seeds for {len(args.checkpoint)} --checkpoint")
    runs: list[dict[str, Result]] = []
    for checkpoint, seed in zip(args.checkpoint, seeds, strict=True):
        data = get_dataset(args.dataset, path=args.data_path, seed=seed)
        baseline = load_model(data, checkpoint)
        ebc = baseline.get_submodule(EBC)
        counts = count_lookups(ebc.embedding_bag_configs(), data.batches("train", args.batch_size))
        results = {"baseline": Result(1.0, dict.fromkeys(BUCKETS, 0.0), 0.0, {})}
        results["baseline"].auc = bucket_aucs(baseline, data, counts, args.batch_size)
        models = {}
        for spec in specs:
            results[spec], models[spec] = measure(baseline, spec, data, counts, args)
            print(spec, results[spec], file=sys.stderr, flush=True)
        for spec in specs:
            pq = "pq:" + spec.partition(":")[2]
            if spec.startswith("mec") and pq in models:
                results[spec].codes_changed = codes_changed(models, spec, pq)
        runs.append(results)
    print(run_header(f"Error and AUC by id popularity on {args.dataset} ({len(runs)} checkpoints)"))
    header = ("method", "ratio", *(f"rel. error {b}" for b in BUCKETS), "lookup-w. error")
    header += (*(f"Δ AUC {b}" for b in BUCKETS), "Δ AUC all", "codes ≠ PQ")
    rows = []
    for name in ["baseline", *specs]:
        per = [r[name] for r in runs]
        base = [r["baseline"] for r in runs]
        rows.append(
            (
                name,
                f"{statistics.mean(x.ratio for x in per):.2f}",
                *(mean_std([x.error[b] for x in per]) for b in BUCKETS),
                mean_std([x.weighted_error for x in per]),
                *(
                    mean_std([x.auc[b] - y.auc[b] for x, y in zip(per, base, strict=True)])
                    for b in (*BUCKETS, "all")
                ),
                "-"
                if per[0].codes_changed is None
                else mean_std([x.codes_changed for x in per], 3),
            )
        )
    print(markdown_table(header, rows))
    print(
        "\nbaseline test AUC by bucket: "
        + ", ".join(
            f"{b} {mean_std([r['baseline'].auc[b] for r in runs])}" for b in (*BUCKETS, "all")
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: vars(v) for k, v in r.items()} for r in runs], f, indent=2)


if __name__ == "__main__":
    main()
