"""TorchRec's row-wise int8 / int4 / int2 table quantization of a trained DLRM: bytes and test AUC.

The comparison point for product quantization at comparable bytes: each row is stored as
``d`` 8/4/2-bit integers plus a per-row fp16 scale and bias (fbgemm's
``IntNBitTableBatchedEmbeddingBagsCodegen``), through ``torchrec.inference.modules.quantize_embeddings``.

Example::

    python benchmarks/rowwise_quant.py --dataset frappe --data-path ../shared/data/frappe \
        --checkpoints runs/q/frappe_d64/seed0/baseline/checkpoint,...
"""

import argparse
import statistics
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torchrec.inference.modules import quantize_embeddings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: examples/

from examples.dlrm.metrics import auc  # noqa: E402
from examples.dlrm.model import ModelConfig, build_model  # noqa: E402
from torchrec_compress.checkpoint import read_metadata  # noqa: E402
from torchrec_compress.data import get_dataset  # noqa: E402

DTYPES = {"int8": torch.qint8, "int4": torch.quint4x2, "int2": torch.quint2x4}


def _table_bytes(sparse_arch: torch.nn.Module) -> int:
    """Bytes the tables really occupy: fbgemm's buffers for a quantized collection (its state
    dict shows padded views), the weights for a float one."""
    ebc = sparse_arch.embedding_bag_collection
    modules = getattr(ebc, "_emb_modules", None)
    if modules:
        return sum(
            getattr(m, name).numel() * getattr(m, name).element_size()
            for m in modules
            for name in ("weights_host", "weights_dev", "weights_uvm")
        )
    return sum(t.numel() * t.element_size() for t in ebc.parameters())


@torch.no_grad()
def _test_auc(model: torch.nn.Module, data, batch_size: int) -> float:
    logits, labels = [], []
    for batch in data.batches("test", batch_size):
        logits.append(model.model(batch.dense_features, batch.sparse_features).flatten())
        labels.append(batch.labels)
    return auc(torch.cat(logits), torch.cat(labels))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoints", required=True, help="comma-separated DCP checkpoints (one per seed)"
    )
    p.add_argument("--dataset", default="frappe")
    p.add_argument("--data-path", default=None)
    p.add_argument("--dtypes", default="int8,int4,int2")
    p.add_argument("--batch-size", type=int, default=8192)
    a = p.parse_args(argv)
    data = get_dataset(a.dataset, path=a.data_path)
    results: dict[str, list[tuple[float, float, float]]] = {}
    for checkpoint in a.checkpoints.split(","):
        meta = read_metadata(checkpoint)
        for name in ["fp32", *a.dtypes.split(",")]:
            model = build_model(data.schema, ModelConfig(**meta["model"]), torch.device("cpu"))
            state = {"model": model.state_dict()}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(state, checkpoint_id=checkpoint)
            model.load_state_dict(state["model"])
            model.eval()
            before = _table_bytes(model.model.sparse_arch)
            if name != "fp32":
                quantize_embeddings(model.model.sparse_arch, dtype=DTYPES[name], inplace=True)
            after = _table_bytes(model.model.sparse_arch)
            results.setdefault(name, []).append(
                (before / after, _test_auc(model, data, a.batch_size), 0.0)
            )

    def sd(values: list[float]) -> str:
        return f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""

    base = [r[1] for r in results["fp32"]]
    print(f"{a.dataset}: TorchRec row-wise quantization of {len(base)} trained baselines\n")
    print("| tables | ratio | test AUC | Δ vs fp32 |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        ratios = [r[0] for r in rows]
        aucs = [r[1] for r in rows]
        deltas = [x - b for x, b in zip(aucs, base, strict=True)]
        print(
            f"| {name} | {statistics.mean(ratios):.2f} | {statistics.mean(aucs):.4f}{sd(aucs)} | "
            f"{statistics.mean(deltas):+.4f}{sd(deltas)} |"
        )


if __name__ == "__main__":
    main()
