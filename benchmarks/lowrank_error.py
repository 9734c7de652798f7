"""AFM vs SVD at equal rank: frequency-weighted output error of a trained model's tables.

AFM fits its basis to the lookup-weighted, mean-centred outputs of each table on the training
split; SVD fits the raw rows. The error is measured on a *different* split's lookups:
``err = Σ n_i ||e_i − ê_i||² / Σ n_i`` with ``n_i`` the lookup counts of that split, reported
per table and over all tables (relative to the same split's output variance).

Example::

    python benchmarks/lowrank_error.py --checkpoint runs/frappe_d64/checkpoint \
        --dataset frappe --data-path ../shared/data/frappe --ranks 2,4,8,16
"""

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: examples/

from examples.dlrm.model import ModelConfig, build_model  # noqa: E402
from torchrec_compress.checkpoint import read_metadata  # noqa: E402
from torchrec_compress.data import get_dataset  # noqa: E402
from torchrec_compress.methods.lowrank.factors import afm_basis, svd_basis, table_moments  # noqa: E402
from torchrec_compress.statistics import count_lookups


def weighted_error(
    weight: torch.Tensor, counts: torch.Tensor, mean: torch.Tensor, directions: torch.Tensor
) -> float:
    """Σ n_i ||e_i − ê_i||² with ê = mean + (e − mean) U Uᵀ, over looked-up rows only."""
    rows = counts.nonzero().squeeze(1)
    e = weight[rows].double() - mean
    residual = e - (e @ directions) @ directions.T
    return float((counts[rows] * residual.pow(2).sum(1)).sum())


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint", required=True, help="DCP checkpoint written by examples.dlrm.main"
    )
    p.add_argument("--dataset", default="frappe")
    p.add_argument("--data-path", default=None)
    p.add_argument("--ranks", default="2,4,8,16")
    p.add_argument("--fit-split", default="train")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--batch-size", type=int, default=8192)
    a = p.parse_args(argv)
    meta = read_metadata(a.checkpoint)
    data = get_dataset(a.dataset, path=a.data_path)
    model = build_model(data.schema, ModelConfig(**meta["model"]), torch.device("cpu"))
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=a.checkpoint)
    model.load_state_dict(state["model"])
    ebc = model.model.sparse_arch.embedding_bag_collection
    tables = ebc.embedding_bag_configs()
    fit_counts = count_lookups(tables, data.batches(a.fit_split, a.batch_size))
    eval_counts = count_lookups(tables, data.batches(a.eval_split, a.batch_size))
    ranks = [int(r) for r in a.ranks.split(",")]
    totals = {(m, r): 0.0 for m in ("afm", "svd") for r in ranks}
    total_variance = 0.0
    print(
        f"{a.dataset}: fit on {a.fit_split} lookups, error on {a.eval_split} lookups; "
        f"checkpoint {a.checkpoint}\n"
    )
    print("| table | rows × d | rank | AFM error | SVD error | AFM / SVD |")
    print("|---|---|---|---|---|---|")
    for config in tables:
        weight = ebc.embedding_bags[config.name].weight.detach()
        afm = afm_basis(table_moments(weight, fit_counts[config.name], config.name), config.name)
        svd = svd_basis(table_moments(weight, None, config.name), config.name)
        counts = eval_counts[config.name]
        looked = counts.sum()
        mean_out = (counts[:, None] * weight.double()).sum(0) / looked
        total_variance += weighted_error(
            weight, counts, mean_out, torch.zeros(weight.shape[1], 0).double()
        )
        for r in ranks:
            if r > config.embedding_dim:
                continue
            e_afm = weighted_error(weight, counts, afm.mean, afm.eigenvectors[:, :r])
            e_svd = weighted_error(
                weight, counts, torch.zeros_like(afm.mean), svd.eigenvectors[:, :r]
            )
            totals[("afm", r)] += e_afm
            totals[("svd", r)] += e_svd
            exact = max(e_afm, e_svd) / looked < 1e-20  # both reproduce the table (rank ≥ rows)
            ratio = "both exact" if exact else f"{e_afm / max(e_svd, 1e-300):.3f}"
            print(
                f"| {config.name} | {config.num_embeddings}×{config.embedding_dim} | {r} | "
                f"{e_afm / looked:.4g} | {e_svd / looked:.4g} | {ratio} |"
            )
    print("\nAll tables (error relative to the output variance of the evaluation lookups):\n")
    print("| rank | AFM | SVD | AFM / SVD |")
    print("|---|---|---|---|")
    for r in ranks:
        afm_t, svd_t = totals[("afm", r)], totals[("svd", r)]
        print(
            f"| {r} | {afm_t / total_variance:.4f} | {svd_t / total_variance:.4f} | {afm_t / svd_t:.3f} |"
        )


if __name__ == "__main__":
    main()
