"""AUC of AFM factor tables stored as row-wise int8 (and int4) against the float factors.

For each dataset: ``examples.dlrm.main`` trains the baseline and compresses it with AFM at one
rank (``--finetune-epochs 0``; reused when its ``result.json`` exists); then, in one process, the
compressed checkpoint is loaded into an unsharded model and evaluated as it is (float factors)
and after ``compress_(model, RowWiseQuantConfig(bits=...))`` of its factor tables, with the same
evaluation code, so the AUC difference is the quantization's alone (no fine-tuning).

Example::

    python benchmarks/int8_factors.py --dataset frappe --data-path ../shared/data/frappe \
        --epochs 3 --out runs/int8_factors/frappe_d64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.dlrm.main import quiet_torchrec  # noqa: E402
from examples.dlrm.model import ModelConfig, build_model  # noqa: E402
from examples.dlrm.train import evaluate, load_checkpoint  # noqa: E402
from torchrec_compress.api import compress_  # noqa: E402
from torchrec_compress.data import get_dataset  # noqa: E402
from torchrec_compress.methods.lowrank.sharded_driver import lowrank_skeleton_  # noqa: E402
from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig  # noqa: E402
from torchrec_compress.testing import run_multiprocess  # noqa: E402


def _train_and_compress(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    result = out / "result.json"
    if not result.exists():
        out.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "examples.dlrm.main", "--dataset", args.dataset,
            "--embedding-dim", str(args.embedding_dim), "--epochs", str(args.epochs),
            "--seed", str(args.seed), "--compress", "afm", "--rank", str(args.rank),
            "--finetune-epochs", "0", "--out", str(out),
        ]  # fmt: skip
        if args.data_path:
            cmd += ["--data-path", args.data_path]
        print("+", " ".join(cmd), flush=True)
        with open(out / "log.txt", "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"run failed ({proc.returncode}); see {out / 'log.txt'}")
    return json.loads(result.read_text())


def _evaluate(rank: int, world_size: int, args: argparse.Namespace, out: str) -> dict[str, Any]:
    quiet_torchrec()
    result = json.loads(Path(out, "result.json").read_text())
    data = get_dataset(args.dataset, path=args.data_path, seed=args.seed)
    ranks = {r["name"]: r["rank"] for r in result["compression"]["report"]["rows"]}
    ranks = {name: k for name, k in ranks.items() if k is not None}
    cpu = torch.device("cpu")
    model = build_model(data.schema, ModelConfig(embedding_dim=args.embedding_dim), cpu)
    lowrank_skeleton_(model, ranks, device=cpu)
    load_checkpoint(model, os.path.join(out, "compressed_init"))
    rows: dict[str, Any] = {"float": evaluate(model, data, "test", 8192)}
    for bits in [int(b) for b in args.bits.split(",")]:
        quantized = build_model(data.schema, ModelConfig(embedding_dim=args.embedding_dim), cpu)
        lowrank_skeleton_(quantized, ranks, device=cpu)
        quantized.load_state_dict(model.state_dict())
        report = compress_(quantized, RowWiseQuantConfig(bits=bits))
        rows[f"int{bits}"] = {
            **evaluate(quantized, data, "test", 8192),
            "factor_bytes": report.bytes_after,
            "float_factor_bytes": report.bytes_before,
        }
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-path", default=None)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", default="8,4")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    result = _train_and_compress(args, out)
    rows = run_multiprocess(_evaluate, world_size=1, timeout_s=3600.0, args=args, out=str(out))[0]
    print(f"command: {' '.join(sys.argv)}")
    print(f"baseline test AUC {result['baseline']['test']['auc']:.4f}")
    print("| factors | test AUC | Δ vs float factors | test logloss | factor bytes (float) |")
    print("|---|---|---|---|---|")
    base = rows["float"]["auc"]
    for name, row in rows.items():
        size = "-"
        if "factor_bytes" in row:
            size = f"{row['factor_bytes']:,} ({row['float_factor_bytes']:,})"
        print(
            f"| {name} | {row['auc']:.4f} | {row['auc'] - base:+.4f} | "
            f"{row['logloss']:.4f} | {size} |"
        )


if __name__ == "__main__":
    main()
