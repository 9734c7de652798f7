"""examples.dlrm.baselines: hash and QR DLRMs trained small from scratch, at a byte budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrec import KeyedJaggedTensor

from examples.dlrm.baselines import (
    SmallEmbeddingBags,
    allocate_rows,
    build_small_model,
    hash_ids,
    plan_schema,
    plan_tables,
    qr_min_rows,
    stored_bytes,
)
from examples.dlrm.model import ModelConfig
from torchrec_compress.data import get_dataset
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.testing import run_multiprocess

ROOT = Path(__file__).resolve().parents[2]
SIZES = [5000, 1200, 300, 40, 7, 2]


@pytest.mark.parametrize("kind", ["hash", "qr"])
@pytest.mark.parametrize("ratio", [1.5, 4, 16, 64])
def test_tables_hold_the_budget_within_one_row(kind: str, ratio: float) -> None:
    dim = 16
    full = sum(SIZES) * dim * 4
    budget = int(full / ratio) + 7  # not a whole number of rows
    if kind == "qr" and ratio == 64:  # QR needs ~2 sqrt(n) rows per table: 268 of 6549 here
        with pytest.raises(ValueError, match=r"smallest reachable: 17152 bytes"):
            plan_tables(kind, SIZES, budget, dim)
        return
    plans = plan_tables(kind, SIZES, budget, dim)
    assert 0 <= budget - stored_bytes(plans, dim) < dim * 4
    for p, n in zip(plans, SIZES, strict=True):
        assert p.num_ids == n and p.stored_rows <= n
        assert p.kind in ("full", kind) and (p.kind != "full" or p.table_rows == (n,))
    # the cap leaves small tables whole: the 2-id table is never hashed or split at 4x
    if ratio <= 4:
        assert plans[-1].kind == "full"


def test_qr_gives_every_id_its_own_quotient_remainder_pair() -> None:
    for n in (2, 3, 10, 97, 1000, 4099):
        for rows in range(qr_min_rows(n), n, max(1, n // 37)):
            (plan,) = plan_tables("qr", [n], rows * 4, 1)
            if plan.kind == "full":
                continue
            ids = torch.arange(n)
            q, r = ids // plan.collisions, ids % plan.table_rows[1]
            assert int(q.max()) < plan.table_rows[0] and int(r.max()) < plan.table_rows[1]
            assert len(set(zip(q.tolist(), r.tolist(), strict=True))) == n, (n, plan)
            assert plan.table_rows[1] >= plan.collisions and plan.stored_rows == rows


def test_a_budget_out_of_reach_names_the_smallest_size() -> None:
    with pytest.raises(ValueError, match=r"qr baseline of 64 bytes at d=16: .*smallest reachable"):
        plan_tables("qr", SIZES, 64, 16)
    with pytest.raises(ValueError, match="out of reach"):
        allocate_rows([10, 10], [1, 1], 21)
    assert (hash_ids(torch.arange(10**6), 997) < 997).all()


def test_small_embedding_bags_look_up_and_combine_the_two_tables() -> None:
    torch.manual_seed(0)
    sizes, dim = [1000, 40], 4
    plans = [
        p.__class__(name, p.num_ids, p.kind, p.table_rows, p.collisions)
        for name, p in zip(["a", "b"], plan_tables("qr", sizes, 4 * dim * 200, dim), strict=True)
    ]
    assert plans[0].kind == "qr"
    ids = torch.tensor([999, 3, 17, 17, 0])
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=ids, lengths=torch.tensor([1, 2, 1, 1]))
    for combine in ("sum", "mult"):
        module = SmallEmbeddingBags(plans, dim, combine)
        tables = {n: m.weight for n, m in module.ebc.embedding_bags.items()}
        out = module(kjt).to_dict()
        assert list(out) == ["a", "b"] and out["a"].shape == (2, dim)
        m, r = plans[0].collisions, plans[0].table_rows[1]
        q_row, r_row = tables["t_a_q"][999 // m], tables["t_a_r"][999 % r]
        want = q_row + r_row if combine == "sum" else q_row * r_row
        torch.testing.assert_close(out["a"][0], want)
    # DLRM sees the original features
    data = get_dataset("synthetic", train_rows=64, val_rows=64, test_rows=64,
                       num_embeddings=(300, 20), pooling=(1, 3))  # fmt: skip
    config = ModelConfig(embedding_dim=8, dense_arch=[8], over_arch=[8])
    hashed = plan_tables("hash", [300, 20], 4 * 8 * 100, 8)
    named = [p.__class__(f, p.num_ids, p.kind, p.table_rows) for f, p in
             zip(data.schema.sparse_features, hashed, strict=True)]  # fmt: skip
    model = build_small_model(data.schema, config, named, torch.device("cpu"))
    batch = next(iter(data.batches("train", 32, 0, 1)))
    loss, _ = model(batch)
    loss.backward()
    assert torch.isfinite(loss)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_sweep_trains_hash_and_qr_at_each_grid_size(tmp_path: Path) -> None:
    from tests.examples.test_sweep import TINY

    base = tmp_path / "base"
    proc = _run([sys.executable, "-m", "examples.dlrm.main", *TINY, "--epochs", "1",
                 "--out", str(base)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "sweep"
    proc = _run([
        sys.executable, "-m", "examples.dlrm.sweep", *TINY, "--epochs", "1",
        "--load-checkpoint", str(base / "checkpoint"), "--grid", "int8",
        "--baselines", "hash,qr", "--out", str(out),
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())
    int8, hashed, qr = sweep["points"]
    assert [p["method"] for p in (hashed, qr)] == ["hash", "qr"]
    for p in (hashed, qr):
        assert p["status"] == "ok" and p["target_bytes"] == int8["bytes"]
        assert 0 <= int8["bytes"] - p["bytes"] < 8 * 4  # within one row of d=8
        assert len(p["history"]) == 1 and p["after_finetune"]["test"]["rows"] == 1000
        assert 0.0 < p["after_finetune"]["test"]["auc"] < 1.0
    assert {t["kind"] for t in qr["tables"]} <= {"qr", "full"} and qr["combine"] == "mult"
    table = (out / "sweep.md").read_text()
    assert "| hash 2.7x |" in table and "| qr 2.7x |" in table and "trained from scratch" in table


def test_trained_small_baselines_shard_row_wise_on_two_processes(tmp_path: Path) -> None:
    """The inner EBC of a hash / QR model is sharded by DMP like any table (here row-wise)."""
    from tests.examples.test_sweep import TINY

    base = tmp_path / "base"
    proc = _run([sys.executable, "-m", "examples.dlrm.main", *TINY, "--epochs", "1",
                 "--out", str(base)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "sweep2"
    proc = _run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "-m", "examples.dlrm.sweep", *TINY, "--epochs", "1", "--sharding-type", "row_wise",
        "--load-checkpoint", str(base / "checkpoint"), "--grid", "",
        "--baselines", "hash,qr", "--baseline-ratios", "2", "--out", str(out),
    ])  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["world_size"] == 2 and [p["label"] for p in sweep["points"]] == [
        "hash 2.0x", "qr 2.0x",
    ]  # fmt: skip
    for p in sweep["points"]:
        assert p["status"] == "ok" and p["bytes"] == sweep["baseline"]["bytes"] // 2
        assert p["after_finetune"]["test"]["rows"] == 1000 and len(p["history"]) == 1


def _sharded_small_models_match_unsharded(rank: int, world_size: int) -> dict[str, float]:
    """Per process: each hash / QR model sharded table- and row-wise against the same weights
    unsharded, on this process's batch (largest |difference| of the logits)."""
    data = get_dataset("synthetic", train_rows=64, val_rows=64, test_rows=128,
                       num_embeddings=(300, 20), pooling=(1, 3))  # fmt: skip
    config = ModelConfig(embedding_dim=8, dense_arch=[8], over_arch=[8])
    batch = next(iter(data.batches("test", 32, rank, world_size)))
    diffs = {}
    for kind in ("hash", "qr"):
        plans = plan_schema(kind, data.schema, 4 * 8 * 100, 8)
        torch.manual_seed(0)
        plain = build_small_model(data.schema, config, plans, torch.device("cpu"))
        with torch.no_grad():
            want = plain(batch)[1][1]
        for sharding_type in ("table_wise", "row_wise"):
            meta = build_small_model(data.schema, config, plans, torch.device("meta"))
            sharded = shard_model(meta, torch.device("cpu"), sharding_type=sharding_type)
            load_full_state_dict_(sharded, plain.state_dict())
            with torch.no_grad():
                got = sharded(batch)[1][1]
            diffs[f"{kind} {sharding_type}"] = float((got - want).abs().max())
    return diffs


def test_sharded_small_models_equal_the_unsharded_ones_on_two_processes() -> None:
    for diffs in run_multiprocess(_sharded_small_models_match_unsharded, world_size=2):
        assert set(diffs) == {"hash table_wise", "hash row_wise", "qr table_wise", "qr row_wise"}
        assert max(diffs.values()) <= 1e-5, diffs
