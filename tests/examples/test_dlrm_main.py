"""End-to-end runs of examples/dlrm: one process, and two processes through the torchx launcher."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--dataset", "synthetic",
    "--data-opt", "train_rows=6000", "val_rows=2000", "test_rows=2000",
    "--embedding-dim", "8", "--dense-arch", "16", "--over-arch", "16",
    "--batch-size", "512", "--eval-batch-size", "1024",
]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ)
    # torchx's local_cwd scheduler must find this interpreter's torchrun.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _main(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "examples.dlrm.main", *TINY, *args])


def test_dcn_train_then_reload_and_compress_at_full_rank(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _main("--arch", "dcn", "--epochs", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 1
    assert result["test"]["rows"] == 2000 and result["val"]["rows"] == 2000
    assert 0.0 <= result["test"]["auc"] <= 1.0
    # below 1: better than predicting the click rate (0.964 measured)
    assert 0.0 < result["test"]["ne"] < 1.0 and result["history"][0]["val_ne"] > 0.0
    assert "examples/s" in proc.stderr and "val NE " in proc.stderr
    # Reload the saved best checkpoint without training, and compress it with SVD at full rank
    # (8 of 8): the reloaded baseline reproduces the run, the compressed model reproduces it.
    proc = _main(
        "--arch", "dcn", "--load-checkpoint", str(out / "checkpoint"), "--eval-only",
        "--compress", "svd", "--rank", "8", "--finetune-epochs", "0", "--out", str(tmp_path / "svd"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    svd = json.loads((tmp_path / "svd" / "result.json").read_text())
    summary = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert summary["test"] == svd["test"] and "ne" in summary["test"]
    assert summary["baseline_test_ne"] == svd["baseline"]["test"]["ne"]
    assert summary["before_finetune_test_ne"] == svd["compression"]["before_finetune"]["test"]["ne"]
    assert svd["baseline"]["val"]["auc"] == pytest.approx(result["val"]["auc"], abs=1e-9)
    assert svd["compression"]["before_finetune"]["test"]["auc"] == pytest.approx(
        result["test"]["auc"], abs=2e-4
    )
    # Two stages from the same checkpoint: AFM rank 4, then PQ of the factor tables.
    proc = _main(
        "--arch", "dcn", "--load-checkpoint", str(out / "checkpoint"), "--eval-only",
        "--compress", "afm+pq", "--rank", "4", "--subspaces", "2", "--centroids", "16",
        "--finetune-epochs", "1", "--out", str(tmp_path / "afm_pq"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "afm_pq" / "result.json").read_text())
    report = two["compression"]["report"]
    assert {(r["method"], r["rank"], r["shape"][1]) for r in report["rows"]} == {("AFM+PQ", 4, 8)}
    # 8 floats per row become 2 one-byte codes; codebooks, projections and means cost the rest
    assert report["ratio"] > 8
    assert two["compression"]["config"]["quantizer"]["num_subspaces"] == 2
    assert two["test"]["auc"] > 0.5
    # The MEC paper's protocol: codes frozen, MLPs re-initialised and trained again; the
    # compressed weights do not compete as epoch -1 (they hold the old MLPs).
    proc = _main(
        "--arch", "dcn", "--load-checkpoint", str(out / "checkpoint"), "--eval-only",
        "--compress", "pq", "--subspaces", "2", "--centroids", "16",
        "--finetune-protocol", "retrain", "--finetune-epochs", "1", "--out", str(tmp_path / "re"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retrain protocol: re-initialised" in proc.stderr
    retrained = json.loads((tmp_path / "re" / "result.json").read_text())
    assert retrained["compression"]["finetune_protocol"] == "retrain"
    assert len(retrained["compression"]["finetune_history"]) == 1
    before = retrained["compression"]["before_finetune"]["test"]["auc"]
    assert retrained["test"]["auc"] != pytest.approx(before, abs=1e-6)
    # One byte budget for the whole model: the example compresses a plain copy and loads it
    # sharded; the report meets the budget.
    proc = _main(
        "--arch", "dcn", "--load-checkpoint", str(out / "checkpoint"), "--eval-only",
        "--compress", "budget", "--budget-ratio", "8", "--budget-subspaces", "2,4",
        "--finetune-epochs", "0",
        "--out", str(tmp_path / "budget"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    budget = json.loads((tmp_path / "budget" / "result.json").read_text())["compression"]
    assert budget["report"]["bytes_after"] <= budget["config"]["budget"]["memory_budget_bytes"]
    assert budget["report"]["ratio"] >= 8
    # Two processes: the library plans and compresses the sharded model where its rows live
    # (before: "--compress budget runs on one process"), with the default objective on several
    # processes (the squared error weighed by the loss's gradient per table; fisher on one)
    proc = _run([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "examples.dlrm.main", *TINY, "--arch", "dcn", "--load-checkpoint",
        str(out / "checkpoint"), "--eval-only", "--compress", "budget", "--budget-ratio", "8",
        "--budget-subspaces", "2,4", "--finetune-epochs", "0", "--out", str(tmp_path / "budget2"),
    ])  # fmt: skip
    # a gloo worker can abort at interpreter exit after writing its result ("terminate called
    # without an active exception": the exit-time SIGABRT of BENCHMARKS' kill loop, left open):
    # that alone is not this test's failure; any other error is
    exit_abort = "terminate called without an active exception" in proc.stderr
    assert proc.returncode == 0 or exit_abort, (proc.stdout + proc.stderr)[-3000:]
    two = json.loads((tmp_path / "budget2" / "result.json").read_text())
    assert two["world_size"] == 2
    sharded = two["compression"]
    assert sharded["config"]["budget"]["loss_sensitivity"] is True
    assert sharded["report"]["bytes_after"] <= sharded["config"]["budget"]["memory_budget_bytes"]
    assert sharded["report"]["ratio"] >= 8
    assert two["test"]["auc"] > 0.5


def test_torchx_local_cwd_two_processes_train_compress_finetune(tmp_path: Path) -> None:
    out = tmp_path / "run2"
    proc = _run([
        sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd",
        "launchers/components.py:train", "-j", "1x2", "--",
        *TINY, "--epochs", "1", "--sharding-type", "row_wise", "--out", str(out),
        "--compress", "afm", "--rank", "4", "--finetune-epochs", "1",
    ])  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["test"]["rows"] == 2000
    tables = [r for r in result["compression"]["report"]["rows"] if r["kind"] == "table"]
    assert tables and all(r["rank"] == 4 and r["shape"][1] == 8 for r in tables)
    assert result["compression"]["report"]["ratio"] > 1.9


def test_missing_dataset_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-frappe"
    proc = _run([
        sys.executable, "-m", "examples.dlrm.main", "--dataset", "frappe",
        "--data-path", str(missing), "--out", str(tmp_path / "x"),
    ])  # fmt: skip
    assert proc.returncode != 0
    assert "FileNotFoundError" in proc.stderr and str(missing) in proc.stderr


def test_parquet_dataset_with_multi_hot_lists_trains(tmp_path: Path) -> None:
    """--dataset parquet end to end: string and int columns, multi-hot string lists (bags > 1)."""
    rng = np.random.default_rng(0)
    rows = 3000
    words = np.array([f"w{i}" for i in range(30)])
    tags = [list(rng.choice(words, rng.integers(1, 5))) for _ in range(rows)]
    # The label depends on the bags, so a trained model beats chance.
    click = [int(("w1" in bag) or ("w2" in bag) or rng.random() < 0.1) for bag in tags]
    table = pa.table({
        "click": click, "price": rng.normal(size=rows),
        "user": [f"u{u}" for u in rng.integers(0, 100, rows)],
        "item": rng.integers(0, 40, rows), "tags": tags,
    })  # fmt: skip
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "part-0.parquet", row_group_size=500)
    (tmp_path / "columns.json").write_text(json.dumps({
        "label": "click", "dense": ["price"],
        "sparse": [
            {"name": "user", "num_embeddings": 64},
            {"name": "item", "num_embeddings": 40, "mapping": "identity"},
            {"name": "tags", "num_embeddings": 32},
        ],
    }))  # fmt: skip
    out = tmp_path / "run"
    proc = _run([
        sys.executable, "-m", "examples.dlrm.main", "--dataset", "parquet",
        "--data-path", str(tmp_path / "data"),
        "--data-opt", f"columns={tmp_path / 'columns.json'}", "split_fractions=0.8,0.1,0.1",
        "--embedding-dim", "8", "--dense-arch", "16", "--over-arch", "16",
        "--batch-size", "128", "--eval-batch-size", "1024", "--epochs", "3", "--lr", "0.01",
        "--out", str(out),
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["dataset"] == "parquet"
    assert result["val"]["rows"] == 300 and result["test"]["rows"] == 300
    assert result["test"]["auc"] > 0.7, result  # 0.79 measured
