"""Flags of examples.dlrm.main that choose how compression trains and fine-tunes."""

from examples.dlrm.compression import make_config
from examples.dlrm.main import parse_args, train_configs
from torchrec_compress import MECConfig


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
