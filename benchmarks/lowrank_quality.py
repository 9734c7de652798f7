"""AFM vs SVD quality through the full DLRM pipeline, mean ± std over seeds.

For each seed: train the uncompressed baseline once, then, from its checkpoint, compress with
each method at each embedding compression ratio (one global byte budget, per-table ranks), and
the MLP hidden layers alone, fine-tune for at most ``--finetune-epochs`` epochs and evaluate.
Runs are subprocesses of ``examples.dlrm.main``; a run whose ``result.json`` exists is reused,
so the benchmark can be resumed.

Example::

    python benchmarks/lowrank_quality.py --dataset frappe --data-path ../shared/data/frappe \
        --embedding-dim 64 --seeds 0,1,2 --out runs/quality_frappe_d64
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import mean_std

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], out: Path) -> dict[str, Any]:
    result = out / "result.json"
    if not result.exists():
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "examples.dlrm.main", *args, "--out", str(out)]
        print("+", " ".join(cmd), flush=True)
        with open(out / "log.txt", "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"run failed ({proc.returncode}); see {out / 'log.txt'}")
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-path", default=None)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="afm,svd")
    p.add_argument("--ratios", default="4,8", help="embedding compression ratios (byte budgets)")
    p.add_argument(
        "--table-ranks", default="", help="also one uniform rank for all tables, e.g. 4,8"
    )
    p.add_argument(
        "--pq",
        default="",
        help="product-quantization variants MODE:M[:K[:RANK]], e.g. mec:16,pq:8:256,afm+mec:8:256:16 "
        "(afm+mec / afm+pq: MEC / PQ of the rank-RANK AFM factor tables; meclast: MEC ending "
        "with its last training state)",
    )
    p.add_argument(
        "--mlp-variance",
        type=float,
        default=None,
        help="also compress the MLP hidden layers alone at this explained variance",
    )
    p.add_argument("--mlp-rank", type=int, default=None, help="... or at this rank")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument(
        "--protocols",
        default="continue",
        help="fine-tuning protocols to run side by side: continue (fine-tune the compressed "
        "model), retrain (the MEC paper's: re-initialised MLPs trained again on the codes)",
    )
    p.add_argument(
        "--retrain-epochs",
        type=int,
        default=None,
        help="epochs of the retrain protocol (default: --epochs, as many as the baseline)",
    )
    p.add_argument("--out", default="runs/quality")
    p.add_argument(
        "main_args",
        nargs=argparse.REMAINDER,
        help="after --: extra arguments of examples.dlrm.main (architecture, lr, ...)",
    )
    a = p.parse_args(argv)
    extra = [x for x in a.main_args if x != "--"]
    common = ["--dataset", a.dataset, "--embedding-dim", str(a.embedding_dim), *extra]
    if a.data_path:
        common += ["--data-path", a.data_path]
    variants: dict[str, list[str]] = {}
    for method in filter(None, a.methods.split(",")):
        for ratio in filter(None, a.ratios.split(",")):
            variants[f"{method} {ratio}x tables"] = ["--compress", method, "--budget-ratio", ratio]
        for rank in filter(None, a.table_ranks.split(",")):
            variants[f"{method} rank {rank} tables"] = ["--compress", method, "--rank", rank]
    for spec in filter(None, a.pq.split(",")):
        mode, subspaces, centroids, rank = (spec.split(":") + ["256", ""])[:4]
        # meclast: MEC ending with its last training state (--mec-keep-last)
        compress = "mec" if mode == "meclast" else mode
        flags = ["--compress", compress, "--subspaces", subspaces, "--centroids", centroids]
        if mode == "meclast":
            flags.append("--mec-keep-last")
        name = f"{mode} M={subspaces} K={centroids}"
        if mode.startswith("afm+"):
            if not rank:
                p.error(f"--pq {spec}: {mode} needs a rank, MODE:M:K:RANK")
            flags += ["--rank", rank]
            name = f"{mode} k={rank} M={subspaces} K={centroids}"
        variants[f"{name} tables"] = flags
    if a.mlp_variance is not None or a.mlp_rank is not None:
        for method in filter(None, a.methods.split(",")):
            knob = (
                ["--linear-variance", str(a.mlp_variance)]
                if a.mlp_variance is not None
                else ["--linear-rank", str(a.mlp_rank)]
            )
            variants[f"{method} MLP"] = [
                "--compress",
                method,
                "--keep-embeddings",
                "--compress-linear",
                *knob,
            ]
    protocols = [x for x in a.protocols.split(",") if x]
    if unknown := set(protocols) - {"continue", "retrain"}:
        p.error(f"--protocols: unknown {sorted(unknown)}; choose from continue, retrain")
    retrain_epochs = a.epochs if a.retrain_epochs is None else a.retrain_epochs
    by_protocol: dict[str, list[str]] = {}
    for name, flags in variants.items():
        for protocol in protocols:
            if protocol == "continue":
                by_protocol[name] = [*flags, "--finetune-epochs", str(a.finetune_epochs)]
            else:
                by_protocol[f"{name} retrain"] = [
                    *flags,
                    "--finetune-protocol",
                    "retrain",
                    "--finetune-epochs",
                    str(retrain_epochs),
                ]
    rows: dict[str, dict[str, list[float]]] = {}
    start = time.time()
    for seed in a.seeds.split(","):
        base_dir = Path(a.out) / f"seed{seed}" / "baseline"
        base = _run([*common, "--seed", seed, "--epochs", str(a.epochs)], base_dir)
        rows.setdefault("uncompressed", {}).setdefault("test_auc", []).append(base["test"]["auc"])
        for name, flags in by_protocol.items():
            out = Path(a.out) / f"seed{seed}" / name.replace(" ", "_")
            r = _run(
                [
                    *common,
                    "--seed",
                    seed,
                    "--load-checkpoint",
                    str(base_dir / "checkpoint"),
                    "--eval-only",
                    *flags,
                ],
                out,
            )
            comp = r["compression"]
            row = rows.setdefault(name, {})
            kind = "linear" if "MLP" in name else "table"
            parts = [
                x for x in comp["report"]["rows"] if x["kind"] == kind and x["method"] != "kept"
            ]
            ratio = sum(x["bytes_before"] for x in parts) / max(
                1, sum(x["bytes_after"] for x in parts)
            )
            row.setdefault("ratio", []).append(ratio)
            row.setdefault("before_ft", []).append(comp["before_finetune"]["test"]["auc"])
            row.setdefault("test_auc", []).append(r["test"]["auc"])
            row.setdefault("delta", []).append(r["test"]["auc"] - base["test"]["auc"])
    print(
        f"\n{a.dataset}, d={a.embedding_dim}, seeds {a.seeds}, fine-tune ≤ {a.finetune_epochs} epochs, "
        f"retrain {retrain_epochs} epochs "
        f"({time.time() - start:.0f} s)\n"
    )
    print(
        "| variant | compressed part ratio | test AUC before fine-tune | test AUC | Δ vs uncompressed |"
    )
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {mean_std(row.get('ratio', []), 2)} | {mean_std(row.get('before_ft', []))} | "
            f"{mean_std(row['test_auc'])} | {mean_std(row.get('delta', []))} |"
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
