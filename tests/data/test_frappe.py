from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.datasets.utils import Batch

from torchrec_compress.data import FRAPPE_SCHEMA, check_batch, get_dataset, read_frappe_libsvm
from torchrec_compress.data.frappe import FRAPPE_FIELDS


def _write_libsvm(path: Path, labels: np.ndarray, local_ids: np.ndarray) -> None:
    """Lines ``label id:1 ...`` with global ids ``first id of field + local id``."""
    starts = np.array([start for _, start, _ in FRAPPE_FIELDS])
    lines = [
        " ".join([str(label)] + [f"{gid}:1" for gid in row])
        for label, row in zip(labels.tolist(), (local_ids + starts).tolist(), strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


def _random_rows(num_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = np.array([size for _, _, size in FRAPPE_FIELDS])
    return rng.integers(0, 2, num_rows), rng.integers(0, sizes, (num_rows, len(sizes)))


def _rows(batches: list[Batch]) -> list[tuple]:
    return [
        (float(label), tuple(ids))
        for batch in batches
        for label, ids in zip(
            batch.labels.tolist(),
            batch.sparse_features.values().view(len(FRAPPE_FIELDS), -1).T.tolist(),
            strict=True,
        )
    ]


@pytest.fixture()
def frappe_dir(tmp_path: Path) -> Path:
    _write_libsvm(tmp_path / "valid.libsvm", *_random_rows(50, seed=0))
    _write_libsvm(tmp_path / "test.libsvm", *_random_rows(31, seed=1))
    return tmp_path


def test_parse_maps_global_to_local_ids(tmp_path: Path) -> None:
    labels, local = _random_rows(40, seed=2)
    _write_libsvm(tmp_path / "f.libsvm", labels, local)
    block = read_frappe_libsvm(tmp_path / "f.libsvm")
    assert block.labels.tolist() == labels.astype(np.float32).tolist()
    assert np.array_equal(np.stack(block.values, axis=1), local)
    assert block.dense.shape == (40, 1) and not block.dense.any()


def test_parse_accepts_any_field_order(tmp_path: Path) -> None:
    (tmp_path / "f.libsvm").write_text(
        "0 5149:1 0:1 957:1 5039:1 5046:1 5053:1 5055:1 5058:1 5060:1 5070:1\n"
    )
    block = read_frappe_libsvm(tmp_path / "f.libsvm")
    assert [int(v[0]) for v in block.values] == [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]


def test_canonical_split_and_schema(frappe_dir: Path) -> None:
    dataset = get_dataset("frappe", path=frappe_dir)
    assert dataset.schema == FRAPPE_SCHEMA
    assert dataset.schema.num_embeddings == (957, 4082, 7, 7, 2, 3, 2, 9, 80, 233)
    assert [dataset.num_rows(s) for s in ("train", "val", "test")] == [45, 5, 31]
    valid = read_frappe_libsvm(frappe_dir / "valid.libsvm")
    order = np.random.default_rng(2026).permutation(50)
    train = _rows(list(dataset.batches("train", 100)))
    expected_train = [
        (float(valid.labels[i]), tuple(int(v[i]) for v in valid.values)) for i in order[:45]
    ]
    assert Counter(train) == Counter(expected_train)
    test = _rows(list(dataset.batches("test", 8)))
    assert test[0] == (float(read_frappe_libsvm(frappe_dir / "test.libsvm").labels[0]), test[0][1])
    batch = next(dataset.batches("val", 8))
    check_batch(batch, dataset.schema)
    assert torch.equal(batch.dense_features, torch.zeros(5, 1))


def test_ranks_and_epochs(frappe_dir: Path) -> None:
    dataset = get_dataset("frappe", path=frappe_dir, seed=3)
    for split in ("train", "test"):
        single = _rows(list(dataset.batches(split, 4)))
        for world_size in (1, 2, 3):
            per_rank = [list(dataset.batches(split, 4, r, world_size)) for r in range(world_size)]
            assert len({len(batches) for batches in per_rank}) == 1
            assert [row for batches in per_rank for row in _rows(batches)] == single
    epoch0, epoch1 = (_rows(list(dataset.batches("train", 4, epoch=e))) for e in (0, 1))
    assert epoch0 != epoch1 and Counter(epoch0) == Counter(epoch1)
    assert _rows(list(dataset.batches("val", 4, epoch=1))) == _rows(list(dataset.batches("val", 4)))


GOOD = "1 3:1 960:1 5040:1 5046:1 5053:1 5055:1 5058:1 5060:1 5069:1 5149:1"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (
            "1 3:1 960:1 5040:1 5046:1 5053:1 5055:1 5058:1 5060:1 5069:1",
            r"bad.libsvm:3: 10 .*expected 11",
        ),
        (
            "2 3:1 960:1 5040:1 5046:1 5053:1 5055:1 5058:1 5060:1 5069:1 5149:1",
            r"bad.libsvm:3: label '2'",
        ),
        (
            "1 3:1 960:1 5040:1 5046:1 5053:1 5055:1 5058:1 5060:1 5069:1 9999:1",
            r"bad.libsvm:3: id 9999",
        ),
        (
            "1 3:1 4:1 5040:1 5046:1 5053:1 5055:1 5058:1 5060:1 5069:1 5149:1",
            r"bad.libsvm:3: token 4:1 .*'user'",
        ),
        (
            "1 3:0.5 960:1 5040:1 5046:1 5053:1 5055:1 5058:1 5060:1 5069:1 5149:1",
            r"bad.libsvm:3: token '3:0.5'",
        ),
    ],
)
def test_malformed_lines_name_file_line_token(tmp_path: Path, bad_line: str, message: str) -> None:
    (tmp_path / "bad.libsvm").write_text(f"{GOOD}\n{GOOD}\n{bad_line}\n{GOOD}\n")
    with pytest.raises(ValueError, match=message):
        read_frappe_libsvm(tmp_path / "bad.libsvm")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_dataset("frappe", path=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="valid.libsvm"):
        get_dataset("frappe", path=tmp_path)
    with pytest.raises(ValueError, match="needs path"):
        get_dataset("frappe")
    (tmp_path / "valid.libsvm").write_text("")
    with pytest.raises(ValueError, match="valid.libsvm' is empty"):
        get_dataset("frappe", path=tmp_path)


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.libsvm").write_bytes(
        f"{GOOD}\n{GOOD}\n".encode() + GOOD.replace("960", "9\xff0").encode("latin-1") + b"\n"
    )
    with pytest.raises(ValueError, match=r"bad.libsvm:3: token b'9\\xff0:1' \(not valid UTF-8\)"):
        read_frappe_libsvm(tmp_path / "bad.libsvm")


def test_directory_and_file_swapped(tmp_path: Path) -> None:
    (tmp_path / "valid.libsvm").mkdir()
    with pytest.raises(IsADirectoryError, match="valid.libsvm' is a directory, not a file"):
        get_dataset("frappe", path=tmp_path)
    (tmp_path / "file").write_text(GOOD)
    with pytest.raises(NotADirectoryError, match="file' is a file, not a directory"):
        get_dataset("frappe", path=tmp_path / "file")
