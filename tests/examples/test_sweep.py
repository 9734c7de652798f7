"""examples.dlrm.sweep: grid parsing, the Pareto front, and end-to-end sweeps of a tiny checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples.dlrm.sweep import GridPoint, load_grid, main, parse_grid
from examples.dlrm.sweep_report import mark_pareto, markdown_table, pareto_front

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--dataset", "synthetic",
    "--data-opt", "train_rows=3000", "val_rows=1000", "test_rows=1000",
    "num_embeddings=300,200,100", "pooling=1,2,1",
    "--embedding-dim", "8", "--dense-arch", "16", "--over-arch", "16",
    "--batch-size", "256", "--eval-batch-size", "1024", "--threads", "1",
]  # fmt: skip


def test_pareto_front_keeps_the_points_nothing_beats() -> None:
    points = [(100, 0.90), (10, 0.80), (50, 0.85), (60, 0.84), (10, 0.79), (50, 0.85), (200, 0.9)]
    # (60, .84) is beaten by (50, .85); (10, .79) by (10, .80); (200, .9) by (100, .9);
    # the two equal points (50, .85) are both kept.
    assert pareto_front(points) == [1, 2, 5, 0]
    losses = [(100, 0.30), (10, 0.50), (50, 0.60), (20, 0.45)]
    assert pareto_front(losses, higher_is_better=False) == [1, 3, 0]
    assert pareto_front([]) == []


def test_mark_pareto_ignores_failed_points() -> None:
    def ok(size: int, auc: float, loss: float) -> dict:
        return {
            "status": "ok",
            "bytes": size,
            "after_finetune": {"test": {"auc": auc, "logloss": loss}},
        }

    points = [ok(10, 0.8, 0.5), {"status": "failed", "error": "x"}, ok(20, 0.7, 0.4)]
    mark_pareto(points)
    assert [p["pareto_auc"] for p in points] == [True, False, False]
    assert [p["pareto_logloss"] for p in points] == [True, False, True]


def test_markdown_table_has_an_ne_column_and_reads_sweeps_written_before_it() -> None:
    split = {"auc": 0.8, "logloss": 0.45, "ne": 0.9123, "rows": 10.0}
    point = {
        "label": "afm rank=2", "status": "ok", "bytes": 10, "pareto_auc": True,
        "before_finetune": {"test": split}, "after_finetune": {"test": split, "val": split},
    }  # fmt: skip
    sweep = {"baseline": {"bytes": 40, "test": split, "val": split}, "points": [point]}
    header, _, base, row = markdown_table(sweep).splitlines()
    assert "| test logloss after FT | test NE after FT | val AUC after FT |" in header
    assert "| 0.4500 | 0.9123 | 0.8000 |" in base and "| 0.4500 | 0.9123 | 0.8000 | ★ |" in row
    old = {k: v for k, v in split.items() if k != "ne"}
    sweep = {
        "baseline": {"bytes": 40, "test": old, "val": old},
        "points": [{**point, "after_finetune": {"test": old, "val": old}}],
    }
    assert "| 0.4500 | — | 0.8000 | ★ |" in markdown_table(sweep).splitlines()[-1]


def test_grid_string_crosses_lists_and_names_bad_entries(tmp_path: Path) -> None:
    grid = parse_grid("afm:rank=2,4; mec:M=4,8:K=16 ;afm+mec:rank=8:M=2;int8;;")
    assert [p.label for p in grid] == [
        "afm rank=2", "afm rank=4", "mec M=4 K=16", "mec M=8 K=16", "afm+mec rank=8 M=2", "int8",
    ]  # fmt: skip
    assert [p.label for p in parse_grid("fp16;int2")] == ["fp16", "int2"]  # TorchRec row-wise
    with pytest.raises(ValueError, match="unknown method 'lora'"):
        parse_grid("afm:rank=2;lora:rank=4")
    with pytest.raises(ValueError, match="parameter 'M' is not read by 'afm'"):
        parse_grid("afm:M=4")
    with pytest.raises(ValueError, match="expected name=INT"):
        parse_grid("mec:M=four")
    path = tmp_path / "grid.json"
    path.write_text(json.dumps([{"method": "afm+pq", "rank": 8, "M": 4}, {"method": "int4"}]))
    assert load_grid(str(path)) == [GridPoint("afm+pq", {"rank": 8, "M": 4}), GridPoint("int4")]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("baseline")
    proc = _run(
        [sys.executable, "-m", "examples.dlrm.main", *TINY, "--epochs", "1", "--out", str(out)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "checkpoint"


def test_sweep_writes_table_json_plot_and_records_a_failed_point(
    checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    proc = _run([
        sys.executable, "-m", "examples.dlrm.sweep", *TINY, "--load-checkpoint", str(checkpoint),
        "--grid", "afm:rank=2;afm:rank=0;mec:M=2:K=16;int4", "--mec-steps", "10", "--out", str(out),
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep: 100%" in proc.stderr  # the progress bar
    sweep = json.loads((out / "sweep.json").read_text())
    base = sweep["baseline"]
    assert base["bytes"] == (300 + 200 + 100) * 8 * 4
    labels = [p["label"] for p in sweep["points"]]
    assert labels == ["afm rank=2", "afm rank=0", "mec M=2 K=16", "int4"]
    afm, failed, mec, int4 = sweep["points"]
    assert failed["status"] == "failed"
    assert failed["error"] == "ValueError: AFMConfig.rank must be a positive int, got 0"
    for p in (afm, mec):
        assert p["status"] == "ok"
        assert p["bytes"] < base["bytes"]
        assert p["finetune_history"] and p["after_finetune"]["test"]["rows"] == 1000
    # rank 2 of 8 (exact rank: --rank-multiple 1 by default), float32 factors + B + mu per table
    assert afm["bytes"] == sum(r * 2 * 4 + (2 * 8 + 8) * 4 for r in (300, 200, 100))
    assert (
        len(afm["configs"]) == 1
        and afm["configs"][0]["rank"] == 2
        and afm["configs"][0]["rank_multiple"] == 1
    )
    pairs = [(p["bytes"], p["after_finetune"]["test"]["auc"]) for p in (afm, mec, int4)]
    front = set(pareto_front(pairs))
    assert [p["pareto_auc"] for p in (afm, mec, int4)] == [i in front for i in range(3)]
    assert failed["pareto_auc"] is False
    # int4 cannot go through a DCP checkpoint in torchrec 1.8 (the DMP route and fine-tuning
    # need one): it is compressed unsharded and evaluated, not fine-tuned, and says so
    assert int4["status"] == "ok" and "not fine-tuned" in int4["note"]
    assert int4["after_finetune"] == int4["before_finetune"] and "finetune_history" not in int4
    # 8 dims of 4 bits + a 2-byte scale and bias per row: 8 of 32 bytes
    assert int4["bytes"] == base["bytes"] / 4 and int4["before_finetune"]["test"]["auc"] > 0.5
    assert 0.0 < afm["after_finetune"]["test"]["ne"] < 1.5 and "ne" in base["test"]
    table = (out / "sweep.md").read_text().splitlines()
    assert len(table) == 2 + 1 + 4
    assert f"| {afm['after_finetune']['test']['ne']:.4f} |" in table[3]
    assert "not fine-tuned" in table[-1]
    assert table[2].startswith("| baseline (fp32) |")
    assert table[4].startswith("| afm rank=0 |") and "**failed**: ValueError" in table[4]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "points").exists()  # per-point checkpoints are removed
    # --replot redraws the table and the plot from sweep.json alone
    (out / "sweep.png").unlink()
    (out / "sweep.md").unlink()
    main(["--replot", str(out)])
    assert (out / "sweep.md").read_text().splitlines() == table
    assert (out / "sweep.png").stat().st_size > 10_000


def test_sweep_budget_points_meet_their_bytes_and_join_the_front(
    checkpoint: Path, tmp_path: Path
) -> None:
    assert [p.label for p in parse_grid("budget:ratio=4,8")] == ["budget ratio=4", "budget ratio=8"]
    with pytest.raises(ValueError, match="budget is a point of its own"):
        parse_grid("afm+budget:rank=2:ratio=4")
    out = tmp_path / "sweep"
    proc = _run([
        sys.executable, "-m", "examples.dlrm.sweep", *TINY, "--load-checkpoint", str(checkpoint),
        "--grid", "budget:ratio=2,8;int8", "--budget-subspaces", "2,4", "--out", str(out),
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())
    budget, unreachable, _ = sweep["points"]
    assert budget["status"] == "ok", budget.get("error")
    limit = budget["configs"][0]["memory_budget_bytes"]
    assert limit == sweep["baseline"]["bytes"] // 2 and budget["bytes"] <= limit
    assert "pareto_auc" in budget and budget["after_finetune"]["test"]["auc"] > 0.0
    assert "| budget ratio=2 |" in (out / "sweep.md").read_text()
    # 8x is below what these tiny tables can reach: the point fails naming the smallest size
    assert unreachable["status"] == "failed" and "give a budget of at least" in unreachable["error"]


def test_sweep_two_processes_goes_on_after_a_failed_point(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep2"
    proc = _run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "-m", "examples.dlrm.sweep", *TINY, "--load-checkpoint", str(checkpoint),
        "--sharding-type", "row_wise", "--grid", "afm:rank=0;svd:rank=4;int4;afm+int4:rank=4",
        "--finetune-epochs", "0", "--out", str(out),
    ])  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["world_size"] == 2
    failed, svd, int4, afm_int4 = sweep["points"]
    assert failed["status"] == "failed" and svd["status"] == "ok"
    # int4 runs unsharded on every process (the same model), evaluated on all test rows
    assert int4["status"] == "ok" and int4["before_finetune"]["test"]["rows"] == 1000
    # ... but not after a stage that each process would calibrate on its own data
    assert afm_int4["status"] == "failed" and "run this point on 1 process" in afm_int4["error"]
    # rank 4 factors, B (4 x 8) and a (zero) mean of 8 per table
    assert svd["bytes"] == sum(r * 4 * 4 + (4 * 8 + 8) * 4 for r in (300, 200, 100))
    # no fine-tuning: the points after are the points before
    assert svd["after_finetune"] == svd["before_finetune"]
    assert svd["before_finetune"]["test"]["rows"] == 1000


def test_plot_styles_are_fixed_per_method_and_labels_do_not_collide(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from examples.dlrm.sweep_plot import METHOD_STYLES, method_style, place_labels, point_label
    from examples.dlrm.sweep_report import default_title

    # one colour and marker per method, whatever the order; MEC and PQ differ in both
    assert method_style("pq") == METHOD_STYLES["pq"] and method_style("afm") == ("tab:blue", "o")
    assert all(a != b for a, b in zip(method_style("mec"), method_style("pq"), strict=True))
    assert method_style("lora") == method_style("lora")  # unknown: stable, from the name
    assert point_label({"label": "int8", "params": {}}) == "int8"
    assert point_label({"label": "afm+mec rank=8 M=2", "params": {"rank": 8, "M": 2}}) == (
        "rank=8 M=2"
    )
    assert default_title("frappe", "../shared/data/frappe", "dlrm", 16) == "Frappe, DLRM d=16"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_xscale("log")
    ax.set_xlim(1e3, 1e6)
    ax.set_ylim(0.90, 0.95)
    # six points on top of one another, two more close by
    items = [(1e4, 0.93, f"label {i}", "k") for i in range(6)]
    items += [(1.05e4, 0.9302, "near a", "r"), (1.1e4, 0.9298, "near b", "b")]
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    place_labels(ax, renderer, items)
    fig.canvas.draw()  # an Annotation takes its place when drawn
    # the labels alone (an Annotation's own extent includes its leader line)
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]
    assert len(boxes) == len(items)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    plt.close(fig)


def test_markdown_table_has_a_five_digit_delta_auc_column() -> None:
    split = {"auc": 0.93615, "logloss": 0.3, "ne": 0.9, "rows": 10.0}
    after = {**split, "auc": 0.935}
    point = {
        "label": "pq M=4", "status": "ok", "bytes": 10, "pareto_auc": False,
        "before_finetune": {"test": after}, "after_finetune": {"test": after, "val": after},
    }  # fmt: skip
    table = markdown_table(
        {"baseline": {"bytes": 40, "test": split, "val": split}, "points": [point]}
    )
    header, _, base, row = table.splitlines()
    assert "| test AUC after FT | Δ test AUC | test logloss after FT |" in header
    assert "| 0.9350 | -0.00115 | 0.3000 |" in row and "| 0.9362 | 0 | 0.3000 |" in base
