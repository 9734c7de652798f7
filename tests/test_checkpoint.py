"""torchrec_compress.checkpoint in one process: atomic rotation, manifest checks, non-finite refusal."""

import contextlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import filesystem as fs

from torchrec_compress import checkpoint
from torchrec_compress.checkpoint import CheckpointError

DATA_FILE = "__0_0.distcp"


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2048,), value), "b": torch.arange(4.0)}


def _saved_value(path: str) -> float:
    state = _state(0.0)
    checkpoint.load(state, path)
    return float(state["w"][0])


def test_round_trip_keeps_metadata_and_rotates_keep_earlier(tmp_path: Path) -> None:
    path = str(tmp_path / "checkpoint")
    for value in range(4):
        checkpoint.save(
            _state(float(value)), path, {"epoch": value, "layout": {"t": [1, 2]}}, keep=2
        )
    state = _state(0.0)
    assert checkpoint.load(state, path) == {"epoch": 3, "layout": {"t": [1, 2]}}
    assert torch.equal(state["w"], torch.full((2048,), 3.0))
    assert [os.path.basename(p) for p in checkpoint.previous(path)] == [
        "checkpoint.prev-1",
        "checkpoint.prev-2",
    ]
    assert [_saved_value(p) for p in checkpoint.previous(path)] == [2.0, 1.0]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "checkpoint.prev-1", "checkpoint.prev-2"]


def _damage_truncate(path: Path) -> None:
    data = (path / DATA_FILE).read_bytes()
    (path / DATA_FILE).write_bytes(data[: len(data) // 2])


def _damage_ff(path: Path) -> None:
    # 4 KiB of 0xFF over the middle of the data file, size unchanged (0xFFFFFFFF is a float NaN)
    with open(path / DATA_FILE, "r+b") as f:
        f.seek(os.path.getsize(path / DATA_FILE) // 4)
        f.write(b"\xff" * 4096)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_damage_truncate, f"file '{DATA_FILE}' has .* bytes, the manifest says"),
        (_damage_ff, f"file '{DATA_FILE}' is corrupted"),
        (lambda p: (p / DATA_FILE).unlink(), f"file '{DATA_FILE}' is missing"),
        (lambda p: (p / ".metadata").unlink(), "file '.metadata' is missing"),
        (lambda p: (p / "MANIFEST.json").unlink(), "has no MANIFEST.json"),
    ],
    ids=["truncated", "0xff", "missing-data", "missing-metadata", "missing-manifest"],
)
def test_damaged_checkpoint_is_an_error_naming_the_file(tmp_path: Path, damage, message) -> None:
    path = tmp_path / "checkpoint"
    checkpoint.save(_state(1.0), str(path))
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(_state(0.0), str(path))
    assert checkpoint.latest(str(path)) is None


def test_non_finite_values_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    path = str(tmp_path / "checkpoint")
    state = {"model": {"dense.weight": torch.tensor([1.0, float("inf")]), "ids": torch.ones(2)}}
    checkpoint.save(state, path)
    with pytest.raises(CheckpointError, match=r"non-finite values .* in model\.dense\.weight"):
        checkpoint.load({"model": {"dense.weight": torch.zeros(2), "ids": torch.zeros(2)}}, path)


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after the fault point runs."""


@pytest.mark.parametrize("point", ["save.written", "save.manifest", "save.rotated"])
def test_a_save_killed_anywhere_leaves_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    path = str(tmp_path / "checkpoint")
    checkpoint.save(_state(1.0), path, {"epoch": 1}, keep=0)

    def die_at(name: str) -> None:
        if name == point:
            raise _Killed

    monkeypatch.setattr(checkpoint, "fault_point", die_at)
    with pytest.raises(_Killed):
        checkpoint.save(_state(2.0), path, {"epoch": 2}, keep=0)
    monkeypatch.undo()
    good = checkpoint.latest(path)
    assert good is not None
    assert _saved_value(good) == 1.0 and checkpoint.read_metadata(good) == {"epoch": 1}
    # between the two renames the old checkpoint is only at .prev-1
    assert (good == path) == (point != "save.rotated")
    # the next save replaces the leftovers
    checkpoint.save(_state(3.0), path, {"epoch": 3}, keep=0)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert _saved_value(path) == 3.0


def _manifest_listing_nothing(path: Path) -> str:
    (path / "MANIFEST.json").write_text('{"format": 1, "files": {}}')
    return "MANIFEST.json does not list '.metadata'"


def _truncated_metadata_json(path: Path) -> str:
    text = (path / "metadata.json").read_text()
    (path / "metadata.json").write_text(text[: len(text) // 2])
    return "file 'metadata.json' has .* bytes, the manifest says"


def _file_added(path: Path) -> str:
    (path / "__9_0.distcp").write_bytes(b"not from the save")
    return r"file '__9_0.distcp' is not in MANIFEST.json"


def _emptied(path: Path) -> str:
    for file in path.iterdir():
        file.unlink()
    return "has no MANIFEST.json"


@pytest.mark.parametrize(
    "damage",
    [_manifest_listing_nothing, _truncated_metadata_json, _file_added, _emptied],
    ids=["manifest-lists-nothing", "truncated-metadata-json", "unlisted-file", "empty-dir"],
)
def test_a_checkpoint_is_verified_whole_before_it_loads(tmp_path: Path, damage) -> None:
    """A manifest listing no files verified and the checkpoint loaded."""
    path = tmp_path / "checkpoint"
    checkpoint.save(_state(1.0), str(path), {"epoch": 1})
    message = damage(path)
    with pytest.raises(CheckpointError, match=f"{path}.*{message}"):
        checkpoint.load(_state(0.0), str(path))
    assert checkpoint.latest(str(path)) is None


def test_unreadable_metadata_json_is_a_checkpoint_error_naming_it(tmp_path: Path) -> None:
    """It was a raw ``JSONDecodeError``."""
    path = tmp_path / "checkpoint"
    checkpoint.save(_state(1.0), str(path), {"epoch": 1})
    (path / "metadata.json").write_text('{"epoch": ')
    with pytest.raises(CheckpointError, match=f"{path}.*metadata.json is not valid JSON"):
        checkpoint.read_metadata(str(path))


def _dev_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """DCP's data files written to /dev/full: every write fails with the kernel's ENOSPC."""
    original = fs.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):  # type: ignore[no-untyped-def]
        if "w" in mode and str(path).endswith(".distcp"):
            with open("/dev/full", mode) as stream:
                yield stream
        else:
            with original(self, path, mode) as stream:
                yield stream

    monkeypatch.setattr(fs.FileSystem, "create_stream", create_stream)


def _short_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """What torch's zip writer reported on a full disk (its short write loses the OSError), on
    a file system with no room left."""

    def write_item(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("unexpected pos 704 vs 598")

    monkeypatch.setattr(fs, "_write_item", write_item)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))  # type: ignore[attr-defined]


@pytest.mark.parametrize("fill", [_dev_full, _short_write], ids=["enospc", "unexpected-pos"])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fill
) -> None:
    """The save failed with ``unexpected pos 704 vs 598``."""
    path = tmp_path / "checkpoint"
    checkpoint.save(_state(1.0), str(path), {"epoch": 1}, keep=0)
    fill(monkeypatch)
    with pytest.raises(CheckpointError, match=f"{path}.*no space left on device .*{tmp_path}"):
        checkpoint.save(_state(2.0), str(path), {"epoch": 2}, keep=0)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]  # its temporary directory is gone
    assert _saved_value(str(path)) == 1.0 and checkpoint.read_metadata(str(path)) == {"epoch": 1}
