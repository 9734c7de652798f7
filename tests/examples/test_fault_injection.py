"""examples/dlrm killed with SIGKILL at seeded points (training, saving, compressing), then resumed.

A run of train -> compress (AFM) -> fine-tune is killed several times in a row, each time at a
fault point (``torchrec_compress.faults``) drawn by a seeded generator, and re-run with
``--resume``; it must end with the same metrics and the same final checkpoint (weights and
optimizer state) as an uninterrupted run, in 1 and 2 processes; so must a finished run given
``--resume``.  Damaged checkpoints must be refused with an error naming the file before anything
of them is read, a re-run killed while saving must leave the last good checkpoint, a training
run must refuse to overwrite the checkpoint it loads, a second run on the same ``--out`` is
refused naming the first, and workers end when torchrun alone is killed.
"""

import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from examples.dlrm import main
from torchrec_compress import checkpoint, locking
from torchrec_compress.checkpoint import CheckpointError
from torchrec_compress.faults import FAULT_ENV
from torchrec_compress.locking import DirectoryInUseError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--dataset", "synthetic",
    "--data-opt", "train_rows=2000", "val_rows=1000", "test_rows=1000",
    "num_embeddings=100,200,300", "pooling=1,3,1", "block_rows=500",
    "--embedding-dim", "8", "--dense-arch", "16", "--over-arch", "16",
    "--eval-batch-size", "1024", "--threads", "1",
]  # fmt: skip
# 2 epochs, AFM rank 4, 2 fine-tuning epochs; 8 steps per epoch in 1 and in 2 processes
PIPELINE = ["--epochs", "2", "--compress", "afm", "--rank", "4", "--finetune-epochs", "2"]
# checkpoints inside epochs too: more places to be killed at (the results do not change)
EVERY = ["--checkpoint-every", "3"]
SAVE_POINTS = ("save.written", "save.manifest", "save.rotated")
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and k != FAULT_ENV}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def _command(world_size: int, out: Path, *args: str) -> list[str]:
    batch = ["--batch-size", str(256 // world_size)]
    launch = [sys.executable]
    if world_size > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    return [*launch, "-m", "examples.dlrm.main", *TINY, *batch, "--out", str(out), *args]


def _cli(world_size: int, out: Path, *args: str, fault: str | None = None) -> int:
    """Run the CLI in ``world_size`` processes (torchrun for 2); returns its exit code."""
    env = _env()
    if fault is not None:
        env[FAULT_ENV] = fault
    command = _command(world_size, out, *args)
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    if fault is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.returncode


def _killed(code: int, world_size: int) -> bool:
    # one process: killed by the signal; torchrun: exits 1 after a worker died
    return code == -signal.SIGKILL if world_size == 1 else code != 0


def _in_process(*args: str) -> dict[str, Any]:
    """``examples.dlrm.main`` in this process (1 process group of 1), for the cheap checks."""
    saved = dict(os.environ)
    try:
        return main.run(main.parse_args([*TINY, "--batch-size", "256", *args]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def _state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, flattened (weights, optimizer state, RNG)."""
    file = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(file))
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(file, weights_only=False))
    file.unlink()
    return flat


def _assert_close(a: Any, b: Any, where: str = "result") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-6, nan_ok=True), where
    else:
        assert a == b, where


def _assert_same_run(out: Path, reference: Path) -> None:
    _assert_close(
        json.loads((out / "result.json").read_text()),
        json.loads((reference / "result.json").read_text()),
    )
    for name in ("checkpoint", "checkpoint_baseline", "checkpoint_compressed"):
        got, want = _state(out / name), _state(reference / name)
        assert got.keys() == want.keys()
        for key, value in want.items():
            diff = (got[key].double() - value.double()).abs().max().item() if value.numel() else 0
            assert diff <= 1e-6, f"{name}{key}: max |diff| {diff}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Path]]:
    """Uninterrupted runs of the pipeline, in 1 and 2 processes (made when first asked for)."""
    root = tmp_path_factory.mktemp("reference")

    class Runs(dict[int, Path]):
        def __missing__(self, world_size: int) -> Path:
            out = root / f"world{world_size}"
            if world_size == 1:  # in this process: no interpreter start-up to pay for
                _in_process(*PIPELINE, "--out", str(out))
            else:
                _cli(world_size, out, *PIPELINE)
            self[world_size] = out
            return out

    yield Runs()


def _kill_chain(world_size: int, seed: int) -> list[str]:
    """Seeded fault points for successive runs: anywhere, in a save, in compression, in fine-tuning."""
    rng = random.Random(seed)
    rank = rng.randrange(world_size)
    chain = [
        f"*:{rng.randint(1, 60)}:{rank}",
        f"{rng.choice(SAVE_POINTS)}:{rng.randint(1, 3)}:0",  # rank 0 finishes every save
        f"compress.stage:1:{rng.randrange(world_size)}",
        f"train.step:{rng.randint(1, 16)}:{rng.randrange(world_size)}",
    ]
    return chain if world_size == 1 else chain[1:3]


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_runs_killed_anywhere_resume_to_the_uninterrupted_result(
    tmp_path: Path, reference: dict[int, Path], world_size: int
) -> None:
    out = tmp_path / "run"
    for i, fault in enumerate(_kill_chain(world_size, seed=20261130 + world_size)):
        args = [*PIPELINE, *EVERY] if i == 0 else [*PIPELINE, *EVERY, "--resume"]
        code = _cli(world_size, out, *args, fault=fault)
        assert _killed(code, world_size), f"run {i} was not killed at {fault} (exit {code})"
        assert not (out / "result.json").exists()
    _cli(world_size, out, *PIPELINE, *EVERY, "--resume")
    _assert_same_run(out, reference[world_size])


def test_rerun_killed_while_saving_keeps_the_last_good_checkpoint(
    tmp_path: Path, reference: dict[int, Path]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference[1], out)
    before = _state(out / "checkpoint")
    # the same command again, without --resume, killed in its first save (after 3 steps)
    code = _cli(1, out, *PIPELINE, *EVERY, fault=f"{random.Random(7).choice(SAVE_POINTS)}:1")
    assert _killed(code, 1)
    survivor = out / "checkpoint"
    if not (survivor / "MANIFEST.json").exists():  # killed between the two renames
        survivor = out / "checkpoint.prev-1"
    after = _state(survivor)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def _truncate(path: Path) -> str:
    file = path / "__0_0.distcp"
    file.write_bytes(file.read_bytes()[:-4096])
    return "__0_0.distcp"


def _ff_into_dense_weight(path: Path) -> str:
    """4 KiB of 0xFF (float NaN) over the raw values of the largest dense weight, size unchanged."""
    weights = {k: v for k, v in _state(path).items() if ".over_arch." in k and k.endswith("weight")}
    raw = max(weights.values(), key=torch.Tensor.numel).numpy().tobytes()[:4096]
    for file in sorted(path.glob("*.distcp")):
        data = bytearray(file.read_bytes())
        if (at := data.find(raw)) >= 0:
            data[at : at + len(raw)] = b"\xff" * len(raw)
            file.write_bytes(bytes(data))
            return file.name
    raise AssertionError("dense weight values not found in the data files")


def _remove_data_file(path: Path) -> str:
    (path / "__0_0.distcp").unlink()
    return "__0_0.distcp"


@pytest.mark.parametrize("damage", [_truncate, _ff_into_dense_weight, _remove_data_file])
def test_damaged_checkpoint_is_refused_naming_the_file(
    tmp_path: Path, reference: dict[int, Path], damage: Any
) -> None:
    path = tmp_path / "checkpoint"
    shutil.copytree(reference[1] / "checkpoint", path)
    name = damage(path)
    with pytest.raises(ValueError, match=f"{path}.*{name}"):
        _in_process(
            *PIPELINE[:2], "--load-checkpoint", str(path), "--eval-only", "--out", str(tmp_path)
        )


def test_training_from_a_checkpoint_of_its_own_out_is_refused(
    tmp_path: Path, reference: dict[int, Path]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference[1], out)
    data = (out / "checkpoint" / "__0_0.distcp").read_bytes()
    with pytest.raises(SystemExit, match="--resume"):
        _in_process(*PIPELINE[:2], "--load-checkpoint", str(out / "checkpoint"), "--out", str(out))
    assert (out / "checkpoint" / "__0_0.distcp").read_bytes() == data


def test_resume_with_a_different_model_is_refused_naming_the_setting(
    tmp_path: Path, reference: dict[int, Path]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference[1], out)
    with pytest.raises(ValueError, match=r"cannot resume .* model=.*'embedding_dim': 8"):
        _in_process(*PIPELINE[:2], "--embedding-dim", "4", "--resume", "--out", str(out))


def test_a_finished_compressing_run_given_resume_ends_with_its_result(
    tmp_path: Path, reference: dict[int, Path]
) -> None:
    """It was refused: ``cannot resume from '.../checkpoint': it was written with
    compression={...}, this run has compression=None`` (the final compressed model had replaced
    the training state that --resume reads)."""
    out = tmp_path / "run"
    shutil.copytree(reference[1], out)
    # what a kill after the final save, during the final evaluation, leaves
    (out / "result.json").unlink()
    _in_process(*PIPELINE, "--resume", "--out", str(out))
    _assert_same_run(out, reference[1])
    _in_process(*PIPELINE, "--resume", "--out", str(out))  # finished: resumed again
    _assert_same_run(out, reference[1])


def test_resume_with_another_seed_or_data_option_is_refused(tmp_path: Path) -> None:
    """Both were accepted silently, continuing the run's state on other data."""
    out = tmp_path / "run"
    _in_process(*PIPELINE[:2], "--out", str(out))
    for flags, setting in [
        (["--seed", "1"], "seed"),
        (["--data-opt", "fresh_train_rows=0"], "data_options"),
    ]:
        with pytest.raises(ValueError, match=rf"cannot resume .* written with {setting}="):
            _in_process(*PIPELINE[:2], *flags, "--resume", "--out", str(out))


class _CreatesFile:
    """A pickle that creates a file when it is loaded: evidence that it was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.path), "w")


def _metadata_json_removed_and_pickle_replaced(path: Path) -> str:
    (path / "metadata.json").unlink()
    (path / ".metadata").write_bytes(pickle.dumps(_CreatesFile(path.parent / "unpickled")))
    return "file '.metadata' (has .* bytes|is corrupted)"


def _metadata_json_truncated(path: Path) -> str:
    text = (path / "metadata.json").read_text()
    (path / "metadata.json").write_text(text[: len(text) // 2])
    return "file 'metadata.json' has .* bytes"


def _emptied(path: Path) -> str:
    shutil.rmtree(path)
    path.mkdir()
    return "has no MANIFEST.json"


def _manifest_lists_nothing(path: Path) -> str:
    (path / "MANIFEST.json").write_text('{"format": 1, "files": {}}')
    return "MANIFEST.json does not list"


@pytest.mark.parametrize(
    "damage",
    [
        _metadata_json_removed_and_pickle_replaced,
        _metadata_json_truncated,
        _emptied,
        _manifest_lists_nothing,
    ],
    ids=["pickle-replaced", "metadata-json-truncated", "empty-dir", "manifest-lists-nothing"],
)
def test_load_checkpoint_verifies_the_manifest_before_reading_anything(
    tmp_path: Path, reference: dict[int, Path], damage: Any
) -> None:
    """With metadata.json removed, DCP's ``.metadata`` pickle was unpickled (to read the
    layout) before the manifest check; a truncated metadata.json raised a raw
    ``JSONDecodeError``, an empty directory a bare ``FileNotFoundError``, and a manifest
    listing no files loaded."""
    path = tmp_path / "checkpoint"
    shutil.copytree(reference[1] / "checkpoint", path)
    message = damage(path)
    with pytest.raises(CheckpointError, match=f"{path}.*{message}"):
        _in_process(
            *PIPELINE[:2], "--load-checkpoint", str(path), "--eval-only", "--out", str(tmp_path)
        )
    assert not (tmp_path / "unpickled").exists()


def _wait_for(condition: Any, what: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.05)


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path: Path) -> None:
    """Both ran, deleting each other's temporary checkpoint: one crashed with
    ``FileNotFoundError: .../checkpoint.tmp-.../.metadata.tmp``."""
    out = tmp_path / "run"
    first = subprocess.Popen(
        _command(1, out, "--epochs", "100"),
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for(lambda: (out / "checkpoint").exists(), "checkpoint", first)
        holder = rf"held by pid {first.pid} on host {socket.gethostname()} \(started 20\d\d-"
        with pytest.raises(
            DirectoryInUseError, match=f"{out}' is in use by another run: .*{holder}"
        ):
            _in_process(*PIPELINE[:2], "--out", str(out))
    finally:
        first.kill()
        first.wait()
    with locking.lock_directory(str(out)):  # its holder died: the lock went with it
        assert checkpoint.latest(str(out / "checkpoint")) is not None


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) and stat[1] == pid and stat[0] != "Z":
            found.append(int(entry))
    return found


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` of a process, ``None`` once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _loads_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("when", ["start-up", "training"])
def test_workers_end_when_torchrun_alone_is_killed(tmp_path: Path, when: str) -> None:
    """torchrun starts each worker in its own session: killed alone, it left them running to
    the end (writing result.json beside a --resume), or, during start-up, waiting for their
    peers until the 600 s process-group timeout."""
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        _command(2, out, "--epochs", "100"),
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers: list[int] = []
    alive: list[int] = []
    try:
        _wait_for(lambda: len(_children(launcher.pid)) == 2, "2 workers", launcher)
        workers = _children(launcher.pid)
        if when == "start-up":  # importing torch: past end_with_launcher, before any collective
            _wait_for(lambda: all(map(_loads_torch, workers)), "torch loading", launcher)
        else:
            _wait_for(lambda: (out / "checkpoint").exists(), "checkpoint", launcher)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 20
        while (alive := [w for w in workers if (s := _stat(w)) and s[0] != "Z"]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
    finally:
        launcher.kill()
        for pid in [w for w in workers if _stat(w)]:
            os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived torchrun ({when})"
    assert not (out / "result.json").exists()
