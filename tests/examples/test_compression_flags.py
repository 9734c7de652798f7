"""Flags of examples.dlrm.main that choose the data, how compression trains and fine-tunes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples.dlrm.compression import make_config
from examples.dlrm.main import load_dataset, parse_args, train_configs
from torchrec_compress import MECConfig, RowWiseQuantConfig
from torchrec_compress.data import get_dataset

ROOT = Path(__file__).resolve().parents[2]


def test_mec_keep_last_flag_keeps_the_last_training_state() -> None:
    default = make_config(parse_args(["--compress", "mec"]), 1 << 20)
    last = make_config(parse_args(["--compress", "mec", "--mec-keep-last"]), 1 << 20)
    assert isinstance(default, MECConfig) and isinstance(last, MECConfig)
    assert default.training.keep_best and not last.training.keep_best


def test_retrain_protocol_trains_at_the_full_learning_rates() -> None:
    flags = ["--compress", "mec", "--lr", "0.002", "--sparse-lr", "0.04"]
    _, _, cont = train_configs(parse_args(flags))
    _, _, retrain = train_configs(parse_args([*flags, "--finetune-protocol", "retrain"]))
    assert (cont.lr, cont.sparse_lr) == (0.002 * 0.1, 0.04 * 0.1)
    assert (retrain.lr, retrain.sparse_lr) == (0.002, 0.04)
    assert retrain.data_epoch_offset == cont.data_epoch_offset == 10  # after the baseline's


def test_finetune_epochs_default_to_where_fine_tuning_paid() -> None:
    assert parse_args([]).finetune_epochs == 1  # the streaming synthetic default
    assert parse_args(["--data-opt", "fresh_train_rows=0"]).finetune_epochs == 0
    assert parse_args(["--dataset", "frappe"]).finetune_epochs == 0
    assert parse_args(["--dataset", "criteo", "--finetune-epochs", "2"]).finetune_epochs == 2


def test_row_wise_int8_and_int4_are_compress_choices() -> None:
    for name, bits in (("int8", 8), ("int4", 4)):
        config = make_config(parse_args(["--compress", name]), 1 << 20)
        assert isinstance(config, RowWiseQuantConfig) and config.bits == bits


def test_an_unknown_data_option_lists_the_valid_ones() -> None:
    with pytest.raises(SystemExit, match=r"unknown option\(s\) 'train_row' for dataset 'synthetic'"
                       r"; valid options: .*train_rows, val_rows, test_rows"):  # fmt: skip
        load_dataset(parse_args(["--data-opt", "train_row=5"]))
    with pytest.raises(ValueError, match="valid options: val_fraction, split_seed"):
        get_dataset("frappe", path="/nonexistent", val_fractions=0.1)


def test_compress_int8_and_int4_from_the_command_line(tmp_path: Path) -> None:
    tiny = [
        sys.executable, "-m", "examples.dlrm.main", "--dataset", "synthetic",
        "--data-opt", "train_rows=2000", "val_rows=1000", "test_rows=1000",
        "num_embeddings=300,200,100", "pooling=1,2,1", "--embedding-dim", "8",
        "--dense-arch", "16", "--over-arch", "16", "--batch-size", "256", "--threads", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*tiny, "--epochs", "1", "--compress", "int4", "--out", str(tmp_path / "int4")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    int4 = json.loads((tmp_path / "int4" / "result.json").read_text())
    # 8 dims of 4 bits + a 2-byte scale and bias per row: 8 of 32 bytes; not fine-tuned
    assert int4["compression"]["report"]["ratio"] == 4.0
    assert "not fine-tuned" in int4["compression"]["note"]
    assert int4["test"] == int4["compression"]["before_finetune"]["test"]
    proc = subprocess.run(
        [*tiny, "--load-checkpoint", str(tmp_path / "int4" / "checkpoint_baseline"), "--eval-only",
         "--compress", "int8", "--out", str(tmp_path / "int8")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    int8 = json.loads((tmp_path / "int8" / "result.json").read_text())
    assert int8["compression"]["config"]["bits"] == 8 and "finetune_history" in int8["compression"]
    assert abs(int8["baseline"]["test"]["auc"] - int4["baseline"]["test"]["auc"]) < 1e-6
    assert (tmp_path / "int8" / "checkpoint").is_dir()
