"""examples/dlrm loads its own compressed checkpoints: evaluate, fine-tune, compress further, re-shard.

One compressed run (train, AFM rank 4, fine-tune) writes ``OUT/compressed_init`` and
``OUT/checkpoint`` (its final, compressed model, with the compression layout in its metadata).
Then, without rebuilding anything by hand: ``--load-checkpoint OUT/compressed_init --eval-only``
(which failed with "Missing key in checkpoint state_dict: ...embedding_bags.t_f0.weight"),
fine-tuning the compressed checkpoint, compressing it further with PQ of its factor tables, and
evaluating that AFM+PQ checkpoint in 2 processes (written by 1).
"""

import json
import sys
from pathlib import Path

import pytest

from tests.examples.test_dlrm_main import TINY, _main, _run
from torchrec_compress.checkpoint import read_metadata

pytestmark = pytest.mark.filterwarnings("ignore")
EBC = "model.sparse_arch.embedding_bag_collection"


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def _layout(checkpoint: Path) -> dict:
    return read_metadata(str(checkpoint))["compression_layout"]


@pytest.fixture(scope="module")
def afm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("afm") / "run"
    proc = _main(
        "--epochs", "1", "--compress", "afm", "--rank", "4", "--finetune-epochs", "1",
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_compressed_run_checkpoint_holds_the_compressed_model(afm_run: Path) -> None:
    layout = _layout(afm_run / "checkpoint")
    entry = layout["modules"][EBC]
    assert entry["kind"] == "lowrank" and set(entry["ranks"].values()) == {4}
    assert [c["class"] for c in layout["configs"]] == ["AFMConfig"]
    assert entry["config"]["options"]["rank"] == 4


def test_eval_only_loads_the_compressed_init_checkpoint(afm_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    proc = _main("--load-checkpoint", str(afm_run / "compressed_init"), "--eval-only",
                 "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = _result(afm_run)["compression"]["before_finetune"]
    assert _result(out)["test"]["auc"] == pytest.approx(before["test"]["auc"], abs=1e-9)
    assert _result(out)["val"]["auc"] == pytest.approx(before["val"]["auc"], abs=1e-9)


def test_fine_tune_a_compressed_checkpoint(afm_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "finetune"
    proc = _main("--load-checkpoint", str(afm_run / "checkpoint"), "--epochs", "1",
                 "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _result(out)["epochs_run"] == 1
    assert (
        _layout(out / "checkpoint")["modules"][EBC]["ranks"]
        == _layout(afm_run / "checkpoint")["modules"][EBC]["ranks"]
    )


def test_compress_further_then_reshard_on_two_processes(afm_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "afm_pq"
    proc = _main(
        "--load-checkpoint", str(afm_run / "checkpoint"), "--eval-only", "--compress", "pq",
        "--subspaces", "2", "--centroids", "16", "--finetune-epochs", "0", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _result(out)
    # the loaded AFM checkpoint evaluates as the AFM run ended
    assert result["baseline"]["val"]["auc"] == pytest.approx(
        _result(afm_run)["val"]["auc"], abs=1e-9
    )
    layout = _layout(out / "checkpoint")
    entry = layout["modules"][EBC]
    assert entry["kind"] == "composite" and entry["factors"]["kind"] == "pq"
    assert entry["factors"]["tables"]["t_f0"] == {"num_subspaces": 2, "num_centroids": 16}
    assert [c["class"] for c in layout["configs"]] == ["AFMConfig", "MECConfig"]

    # written by 1 process, evaluated by 2 (DCP re-shards it into the 2-process plan)
    two = tmp_path / "two"
    proc = _run([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "examples.dlrm.main", *TINY, "--load-checkpoint", str(out / "checkpoint"),
        "--eval-only", "--out", str(two),
    ])  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert _result(two)["world_size"] == 2
    assert _result(two)["val"]["auc"] == pytest.approx(result["val"]["auc"], abs=1e-6)
    assert _result(two)["test"]["auc"] == pytest.approx(result["test"]["auc"], abs=1e-6)
    assert _result(two)["test"]["ne"] == pytest.approx(result["test"]["ne"], abs=1e-6)
