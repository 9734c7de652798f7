"""examples/dlrm fails loud: a frozen peer, a non-finite loss or gradient, non-finite input."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.examples.test_dlrm_main import ROOT, TINY, _env
from torchrec_compress.testing import run_multiprocess


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_frozen_peer_ends_the_job_after_pg_timeout(tmp_path: Path) -> None:
    """SIGSTOP on one of 2 gloo processes once training starts: the other one blocked for
    torch's 30-minute default; with ``--pg-timeout 10`` it fails with a timeout error."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = _env() | dict(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
            LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        )  # fmt: skip
        args = [sys.executable, "-m", "examples.dlrm.main", *TINY, "--epochs", "3"]
        args += ["--pg-timeout", "10", "--out", str(tmp_path / "run")]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
    lines: list[str] = []
    planned = threading.Event()

    def read() -> None:
        assert procs[0].stderr is not None
        for line in procs[0].stderr:
            lines.append(line)
            if "plan:" in line:
                planned.set()
        planned.set()  # the process ended before training

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        planned.wait(180)
        assert procs[0].poll() is None, "".join(lines)[-3000:]
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        code = procs[0].wait(timeout=150)
        elapsed = time.monotonic() - stopped
    finally:
        for p in procs:
            p.kill()
            p.wait()
    reader.join(timeout=10)
    text = "".join(lines)
    assert code != 0, text[-3000:]
    assert "Timed out" in text or "timed out" in text, text[-3000:]
    assert elapsed < 120


def _train(rank: int, world_size: int, poison: str, skip: bool, every: bool = False) -> dict:
    """One epoch of the example's DLRM (sharded by DMP) with a poisoned loss or gradient (at
    step 2, or from step 2 on with ``every``)."""
    import logging

    import torch

    from examples.dlrm.model import ModelConfig, build_model
    from examples.dlrm.train import (
        TrainConfig,
        attach_sparse_optimizer,
        build_optimizer,
        train_epoch,
    )
    from torchrec_compress.data import get_dataset
    from torchrec_compress.distributed.planning import shard_model

    torch.manual_seed(0)
    data = get_dataset("synthetic", seed=0, train_rows=256, val_rows=64, test_rows=64)
    config = TrainConfig(epochs=1, batch_size=32, **({"skip_nonfinite": True} if skip else {}))
    model_config = ModelConfig(embedding_dim=8, dense_arch=[16], over_arch=[16])
    model = build_model(data.schema, model_config, torch.device("meta"))
    attach_sparse_optimizer(model, config)
    model = shard_model(model, torch.device("cpu"))
    calls: list[int] = []

    def poisoned(value: torch.Tensor) -> torch.Tensor:
        """NaN at the third call (step 2): an overflow that ``check_batch`` cannot see."""
        calls.append(1)
        hit = len(calls) >= 3 if every else len(calls) == 3
        return value * float("nan") if hit else value

    if poison == "gradient":
        (bias,) = [p for n, p in model.named_parameters() if n.endswith("over_arch.model.1.bias")]
        bias.register_hook(poisoned)
    elif rank == world_size - 1:
        (over_arch,) = [m for n, m in model.named_modules() if n.endswith("model.over_arch")]
        over_arch.register_forward_hook(lambda module, inputs, out: poisoned(out))
    optimizer = build_optimizer(model, config)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("examples.dlrm.train").addHandler(handler)
    try:
        loss = train_epoch(model, optimizer, data, config, epoch=0)
    except FloatingPointError as e:
        return {"error": str(e)}
    local = [s.tensor for p in model.parameters() for s in getattr(p, "local_shards", list)()]
    finite = all(bool(torch.isfinite(t).all()) for t in [*model.parameters(), *local])
    return {"loss": loss, "finite": finite, "log": records}


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_nonfinite_loss_stops_training_naming_epoch_step_and_batch(world_size: int) -> None:
    """The loss overflowed and training went on (a run saved a checkpoint and exited 0 with
    ``val logloss nan``); every process now stops at the step, naming the process's batch."""
    results = run_multiprocess(_train, world_size=world_size, poison="loss", skip=False)
    for r in results:
        assert "error" in r, r
        expected = rf"epoch 0, step 2: non-finite loss.* from batch 2 of process\(es\) \[{world_size - 1}\]"
        assert re.search(expected, r["error"]), r["error"]
    assert re.search(r"loss \((nan|inf) here\)", results[-1]["error"]), results[-1]["error"]


def test_a_nonfinite_gradient_stops_training_naming_the_parameter() -> None:
    (r,) = run_multiprocess(_train, world_size=1, poison="gradient", skip=False)
    assert "error" in r, r
    assert re.search(
        r"epoch 0, step 2: non-finite gradient of '\S*over_arch.model.1.bias'", r["error"]
    )


def test_skip_nonfinite_skips_and_counts_the_batch() -> None:
    results = run_multiprocess(_train, world_size=2, poison="loss", skip=True)
    for r in results:
        assert "error" not in r, r
        assert r["finite"] and r["loss"] == r["loss"]  # weights and mean loss untouched by it
    assert "epoch 0: skipped 1 batches with a non-finite loss or gradient" in results[0]["log"]


def _evaluate_broken(rank: int, world_size: int) -> dict[str, str]:
    """``evaluate`` of a split with one label only, and of a model with a NaN weight."""
    import torch

    from examples.dlrm.model import ModelConfig, build_model
    from examples.dlrm.train import evaluate
    from torchrec_compress.data import get_dataset
    from torchrec_compress.distributed.planning import shard_model

    torch.manual_seed(0)
    data = get_dataset("synthetic", seed=0, train_rows=64, val_rows=64, test_rows=64)
    model = build_model(
        data.schema,
        ModelConfig(embedding_dim=8, dense_arch=[16], over_arch=[16]),
        torch.device("meta"),
    )
    model = shard_model(model, torch.device("cpu"))

    class OneLabel:
        schema = data.schema

        def batches(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            for batch in data.batches(*args, **kwargs):
                batch.labels.zero_()
                yield batch

    def error(dataset: Any) -> str:
        try:
            evaluate(model, dataset, "val", 32)
        except (ValueError, FloatingPointError) as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    one_label = error(OneLabel())
    (weight,) = [p for n, p in model.named_parameters() if n.endswith("over_arch.model.1.weight")]
    with torch.no_grad():
        weight.fill_(float("nan"))
    return {"one-label": one_label, "nan-weight": error(data)}


def _skip_most_then_evaluate_broken(rank: int, world_size: int) -> dict[str, Any]:
    """The two checks below in one spawned process: an epoch that skips most batches, and
    ``evaluate`` of a split with one label and of a model with a NaN weight."""
    skipping = _train(rank, world_size, poison="loss", skip=True, every=True)
    return {"skipping": skipping, **_evaluate_broken(rank, world_size)}


def test_a_run_that_skips_most_batches_or_predicts_nan_gives_no_result() -> None:
    """Skipping 78 of 79 batches under ``--skip-nonfinite`` ended in a ``RESULT`` with NaN
    logloss and exit code 0: an epoch that skips more than half stops, and a NaN prediction is
    an error naming the split.  A split with one label failed with 'AUC needs both positive and
    negative labels', not saying which split."""
    (r,) = run_multiprocess(_skip_most_then_evaluate_broken, world_size=1)
    error = r["skipping"].get("error", r["skipping"])
    assert re.search(r"epoch 0: skipped 6 of 8 batches .*more than 50%", str(error)), error
    assert re.search(r"ValueError: the val split's 64 rows all have label 0", r["one-label"]), r
    assert re.search(
        r"FloatingPointError: 64 of the 64 val predictions are NaN or infinite", r["nan-weight"]
    ), r


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["train_rows=0"], r"the train split of --dataset synthetic has 0 rows"),
        (["val_rows=1"], r"the val split of --dataset synthetic has 1 rows, it needs at least 2"),
        (["test_rows=0"], r"the test split of --dataset synthetic has 0 rows"),
    ],
)
def test_a_split_that_cannot_give_a_result_is_refused_up_front(
    tmp_path: Path, options: list[str], message: str
) -> None:
    """``train_rows=0`` exited 0 with a ``RESULT``; a 1-row split failed late, after training,
    with 'AUC needs both positive and negative labels'."""
    from tests.examples.test_fault_injection import _in_process

    with pytest.raises(SystemExit, match=message):
        _in_process("--data-opt", *options, "--epochs", "1", "--out", str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoint").exists()


def _run_with_seed_of_rank(rank: int, world_size: int, out: str) -> str:
    from examples.dlrm import main

    args = main.parse_args([*TINY, "--epochs", "1", "--seed", str(rank), "--out", out])
    try:
        main.run(args)
    except SystemExit as e:
        return str(e)
    return "ran"


def test_processes_started_with_different_flags_are_refused(tmp_path: Path) -> None:
    """Processes started with different ``--seed`` ran to a ``RESULT`` silently."""
    messages = run_multiprocess(_run_with_seed_of_rank, world_size=2, out=str(tmp_path / "run"))
    for message in messages:
        assert re.search(r"--seed: 0 on process 0, 1 on process 1.*same command", message), message
    assert not (tmp_path / "run" / "result.json").exists()


def test_an_inf_in_a_parquet_int_column_fails_the_run(tmp_path: Path) -> None:
    """A user's parquet file whose int column holds inf trained with ``loss=nan``, saved a
    checkpoint and exited 0 with ``val logloss nan``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES, DEFAULT_LABEL_NAME

    rows = 256
    rng = np.random.default_rng(0)
    columns = {DEFAULT_LABEL_NAME: rng.integers(0, 2, rows).astype(np.int8)}
    columns |= {n: rng.integers(0, 50, rows).astype(np.float64) for n in DEFAULT_INT_NAMES}
    columns |= {n: rng.integers(0, 1000, rows) for n in DEFAULT_CAT_NAMES}
    columns[DEFAULT_INT_NAMES[3]][70] = np.inf
    pq.write_table(pa.table(columns), tmp_path / "day_0.parquet")
    args = ["--dataset", "criteo", "--data-path", str(tmp_path), "--epochs", "1"]
    args += ["--embedding-dim", "8", "--dense-arch", "16", "--over-arch", "16"]
    args += ["--batch-size", "64", "--out", str(tmp_path / "run")]
    proc = subprocess.run(
        [sys.executable, "-m", "examples.dlrm.main", *args],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stderr[-3000:]
    # the reader refuses it, naming file, row and column (the batch check would name the batch)
    assert re.search(
        r"day_0\.parquet: row 70 \(0-based\), column 'int_3': dense value inf is not finite",
        proc.stderr,
    ), proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoint").exists()
