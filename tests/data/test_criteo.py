from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.datasets.utils import Batch

from torchrec_compress.data import (
    CriteoParquetDataset,
    check_batch,
    convert_criteo_tsv,
    get_dataset,
)


def _write_tsv(path: Path, num_rows: int, seed: int) -> dict[str, list]:
    """Criteo-schema TSV with empty and negative ints and empty categoricals; returns raw columns."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, num_rows).tolist()
    ints = np.where(rng.random((num_rows, 13)) < 0.2, None, rng.integers(-5, 1000, (num_rows, 13)))
    cats = np.where(rng.random((num_rows, 26)) < 0.2, None, rng.integers(0, 2**32, (num_rows, 26)))
    lines = [
        "\t".join(
            [str(labels[row])]
            + ["" if v is None else str(v) for v in ints[row]]
            + ["" if v is None else f"{v:08x}" for v in cats[row]]
        )
        for row in range(num_rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return {"label": labels, "ints": ints.tolist(), "cats": cats.tolist()}


def _rows(batches: list[Batch]) -> list[tuple]:
    return [
        (tuple(dense), label, tuple(ids))
        for batch in batches
        for dense, label, ids in zip(
            batch.dense_features.tolist(),
            batch.labels.tolist(),
            batch.sparse_features.values().view(26, -1).T.tolist(),
            strict=True,
        )
    ]


def test_convert_stores_raw_values_in_row_groups(tmp_path: Path) -> None:
    raw = _write_tsv(tmp_path / "day_0.tsv", 300, seed=0)
    # A tiny block size makes pyarrow parse the file in many blocks.
    [out] = convert_criteo_tsv(
        [tmp_path / "day_0.tsv"],
        tmp_path / "pq",
        rows_per_row_group=64,
        block_size=4096,
        progress=False,
    )
    assert out == tmp_path / "pq" / "day_0.parquet"
    parquet = pq.ParquetFile(out)
    assert [
        parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)
    ] == [64] * 4 + [44]
    table = parquet.read()
    assert table.column("label").to_pylist() == raw["label"]
    assert [
        list(row)
        for row in zip(*(table.column(f"int_{i}").to_pylist() for i in range(13)), strict=True)
    ] == raw["ints"]
    assert [
        list(row)
        for row in zip(*(table.column(f"cat_{i}").to_pylist() for i in range(26)), strict=True)
    ] == raw["cats"]


def test_dataset_transforms_and_hashes(tmp_path: Path) -> None:
    raw = {}
    for split, rows in (("train", 200), ("val", 50), ("test", 40)):
        raw[split] = _write_tsv(tmp_path / f"{split}.tsv", rows, seed=len(split) + rows)
        convert_criteo_tsv(
            [tmp_path / f"{split}.tsv"],
            tmp_path / "pq" / split,
            rows_per_row_group=32,
            progress=False,
        )
    sizes = [10 + i for i in range(26)]
    dataset = get_dataset("criteo", path=tmp_path / "pq", num_embeddings=sizes)
    assert [dataset.num_rows(s) for s in ("train", "val", "test")] == [200, 50, 40]
    batch = next(dataset.batches("test", 40))
    check_batch(batch, dataset.schema)
    ints = np.array(
        [[0 if v is None else v for v in row] for row in raw["test"]["ints"]], dtype=np.float64
    )
    expected_dense = np.log1p(np.maximum(ints, 0))
    assert np.allclose(batch.dense_features.numpy(), expected_dense, atol=1e-5)
    cats = raw["test"]["cats"]
    expected_ids = [
        [0 if v is None else 1 + v % (n - 1) for v, n in zip(row, sizes, strict=True)]
        for row in cats
    ]
    assert batch.sparse_features.values().view(26, -1).T.tolist() == expected_ids
    assert batch.labels.tolist() == [float(v) for v in raw["test"]["label"]]
    assert batch.sparse_features.lengths().dtype == torch.int32


def test_single_set_row_split_ranks_and_epochs(tmp_path: Path) -> None:
    for day in range(2):
        _write_tsv(tmp_path / f"day_{day}.tsv", 150, seed=day)
    convert_criteo_tsv(
        [tmp_path / "day_0.tsv", tmp_path / "day_1.tsv"],
        tmp_path / "pq",
        rows_per_row_group=40,
        progress=False,
    )
    dataset = CriteoParquetDataset(
        tmp_path / "pq", num_embeddings=1000, split_fractions=(0.8, 0.1, 0.1)
    )
    assert [dataset.num_rows(s) for s in ("train", "val", "test")] == [240, 30, 30]
    everything = _rows(
        list(
            CriteoParquetDataset(
                tmp_path / "pq", num_embeddings=1000, split_fractions=(0.0, 0.0, 1.0)
            ).batches("test", 64)
        )
    )
    assert len(everything) == 300
    # Contiguous split in file order: test is the last 30 rows.
    assert _rows(list(dataset.batches("test", 7))) == everything[270:]
    for split in ("train", "val"):
        single = _rows(list(dataset.batches(split, 16)))
        for world_size in (1, 2, 3):
            per_rank = [list(dataset.batches(split, 16, r, world_size)) for r in range(world_size)]
            assert len({len(batches) for batches in per_rank}) == 1
            assert Counter(row for batches in per_rank for row in _rows(batches)) == Counter(single)
    epoch0, epoch1 = (_rows(list(dataset.batches("train", 16, epoch=e))) for e in (0, 1))
    assert epoch0 != epoch1 and Counter(epoch0) == Counter(epoch1) == Counter(everything[:240])


@pytest.mark.parametrize(
    ("row_text", "message"),
    [
        ("1\t2\t3", r"bad.tsv:251: 3 tab-separated columns; expected 40"),
        (
            "1" + "\t5" * 13 + "\tzz12ab00" + "\tabc" * 25,
            r"bad.tsv:251: column 15 \(cat_0\) holds 'zz12ab00'",
        ),
        (
            "1" + "\t5" * 12 + "\t1.5" + "\tabc" * 26,
            r"bad.tsv:251: column 14 \(int_12\) holds '1.5'",
        ),
        ("7" + "\t5" * 13 + "\tabc" * 26, r"bad.tsv:251: column 1 \(label\) holds '7'"),
    ],
)
def test_bad_lines_name_file_line_column(tmp_path: Path, row_text: str, message: str) -> None:
    _write_tsv(tmp_path / "bad.tsv", 250, seed=3)
    with open(tmp_path / "bad.tsv", "a") as tsv:
        tsv.write(row_text + "\n")
    with pytest.raises(ValueError, match=message):
        convert_criteo_tsv([tmp_path / "bad.tsv"], tmp_path / "pq", block_size=4096, progress=False)
    assert list((tmp_path / "pq").iterdir()) == []  # no partial output left behind


def test_missing_paths_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_dataset("criteo", path=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no.tsv"):
        convert_criteo_tsv([tmp_path / "no.tsv"], tmp_path / "pq")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ValueError, match="empty.tsv' is empty"):
        convert_criteo_tsv([tmp_path / "empty.tsv"], tmp_path / "pq")
    with pytest.raises(FileNotFoundError, match="neither"):
        CriteoParquetDataset(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="train' holds no parquet"):
        CriteoParquetDataset(tmp_path)
    _write_tsv(tmp_path / "a.tsv", 5, seed=0)
    convert_criteo_tsv([tmp_path / "a.tsv"], tmp_path / "flat", progress=False)
    with pytest.raises(ValueError, match="num_embeddings must be"):
        CriteoParquetDataset(tmp_path / "flat", num_embeddings=1)
    with pytest.raises(ValueError, match="split_fractions"):
        CriteoParquetDataset(tmp_path / "flat", split_fractions=(0.5, 0.1, 0.1))


@pytest.mark.parametrize("token", ["nan", "NaN", "NA", "N/A", "NULL", "null", "#N/A"])
@pytest.mark.parametrize(("column", "name"), [(2, "int_0"), (15, "cat_0")])
def test_null_like_tokens_are_errors_not_missing(
    tmp_path: Path, token: str, column: int, name: str
) -> None:
    fields = ["1"] + ["5"] * 13 + ["abc"] * 26
    fields[column - 1] = token
    _write_tsv(tmp_path / "bad.tsv", 20, seed=4)
    with open(tmp_path / "bad.tsv", "a") as tsv:
        tsv.write("\t".join(fields) + "\n")
    with pytest.raises(
        ValueError, match=rf"bad.tsv:21: column {column} \({name}\) holds '{token}'"
    ):
        convert_criteo_tsv([tmp_path / "bad.tsv"], tmp_path / "pq", progress=False)


def test_invalid_utf8_names_file_line_and_column(tmp_path: Path) -> None:
    _write_tsv(tmp_path / "bad.tsv", 30, seed=5)
    with open(tmp_path / "bad.tsv", "ab") as tsv:
        tsv.write(b"\t".join([b"0"] + [b"7"] * 13 + [b"0a\xff"] + [b"abc"] * 25) + b"\n")
    with pytest.raises(
        ValueError, match=r"bad.tsv:31: column 15 \(cat_0\) holds b'0a\\xff' \(not valid UTF-8\)"
    ):
        convert_criteo_tsv([tmp_path / "bad.tsv"], tmp_path / "pq", progress=False)


def test_directory_and_missing_input_get_different_messages(tmp_path: Path) -> None:
    (tmp_path / "days").mkdir()
    with pytest.raises(IsADirectoryError, match="days' is a directory, not a file"):
        convert_criteo_tsv([tmp_path / "days"], tmp_path / "pq", progress=False)
    with pytest.raises(FileNotFoundError, match="no.tsv' does not exist"):
        convert_criteo_tsv([tmp_path / "no.tsv"], tmp_path / "pq", progress=False)
    _write_tsv(tmp_path / "a.tsv", 5, seed=0)
    with pytest.raises(NotADirectoryError, match="a.tsv' is a file, not a directory"):
        CriteoParquetDataset(tmp_path / "a.tsv")


def _foreign_criteo_table(tmp_path: Path, num_rows: int = 30) -> pa.Table:
    """A Criteo-schema table as another tool might write it (starting from converted values)."""
    _write_tsv(tmp_path / "src.tsv", num_rows, seed=6)
    [converted] = convert_criteo_tsv([tmp_path / "src.tsv"], tmp_path / "src", progress=False)
    return pq.read_table(converted)


def _replace(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t.drop_columns(["cat_3"]),
            r"x.parquet: no column 'cat_3' \(declared sparse\); the file has columns \['label'",
        ),
        (
            lambda t: _replace(t, "cat_3", pc.cast(t["cat_3"], pa.string())),
            r"x.parquet: column 'cat_3' \(sparse\) has type string; Criteo categorical columns",
        ),
        (
            lambda t: _replace(t, "cat_3", pa.array([1.5, -1.0] * 15)),
            r"x.parquet: column 'cat_3' \(sparse\) has type double; .*must be integers",
        ),
        (
            lambda t: _replace(t, "int_0", pc.cast(t["int_0"], pa.string())),
            r"x.parquet: column 'int_0' \(dense\) has type string; expected integers or floats",
        ),
        (
            lambda t: t.drop_columns(["label"]),
            r"x.parquet: no column 'label' \(declared label\)",
        ),
    ],
)
def test_foreign_parquet_schema_is_checked_when_opened(
    tmp_path: Path, change: Callable[[pa.Table], pa.Table], message: str
) -> None:
    (tmp_path / "flat").mkdir()
    pq.write_table(change(_foreign_criteo_table(tmp_path)), tmp_path / "flat" / "x.parquet")
    with pytest.raises(ValueError, match=message):
        CriteoParquetDataset(tmp_path / "flat", num_embeddings=100)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        (
            "int_2",
            float("inf"),
            r"row 11 \(0-based\), column 'int_2': dense value inf is not finite",
        ),
        ("int_2", -float("inf"), r"row 11 \(0-based\), column 'int_2': dense value -inf"),
        ("int_2", float("nan"), r"row 11 \(0-based\), column 'int_2': dense value nan"),
        ("label", 2, r"row 11 \(0-based\), column 'label': label 2.0 is not 0 or 1"),
        ("label", None, r"row 11 \(0-based\), column 'label': the label is missing"),
    ],
)
def test_bad_values_in_foreign_parquet_name_file_row_column(
    tmp_path: Path, column: str, value: float | None, message: str
) -> None:
    table = _foreign_criteo_table(tmp_path)
    values = pc.cast(table[column], pa.float64()).to_pylist()
    values[11] = value
    (tmp_path / "flat").mkdir()
    # Row 11 of the file sits in its second row group.
    pq.write_table(
        _replace(table, column, pa.array(values)), tmp_path / "flat" / "x.parquet", row_group_size=8
    )
    dataset = CriteoParquetDataset(
        tmp_path / "flat", num_embeddings=100, split_fractions=(0.0, 0.0, 1.0)
    )
    with pytest.raises(ValueError, match="x.parquet: " + message):
        list(dataset.batches("test", 64))


def _gzipped(path: Path) -> bytes:
    import gzip

    _write_tsv(path.with_suffix(".plain"), 20, seed=7)
    return gzip.compress(path.with_suffix(".plain").read_bytes())


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "empty_label.tsv",
            lambda p: ("\t" + "\t".join(["5"] * 13 + ["abc"] * 26) + "\n").encode(),
            r"empty_label.tsv:21: column 1 \(label\) holds an empty field; expected a 0/1 label",
        ),
        (
            "blank_line.tsv",
            lambda p: b"\n",
            r"blank_line.tsv:21: the line is empty; expected 40 tab-separated columns",
        ),
        ("day_0.gz", _gzipped, r"day_0.gz is gzip-compressed; expected a plain Criteo TSV"),
        (
            "frappe.libsvm",
            lambda p: b"1 266:1 1244:1 5042:1 5049:1 5054:1 5055:1 5058:1 5062:1 5074:1\n",
            r"frappe.libsvm:21: 1 tab-separated columns; expected 40",
        ),
        (
            "latin1.tsv",
            lambda p: "caf\xe9\t1\n".encode("latin-1"),
            r"latin1.tsv:21: not a Criteo TSV file .*expected 40 tab-separated columns",
        ),
    ],
    ids=["empty-label", "blank-line", "gzip", "frappe", "latin-1"],
)
def test_a_file_that_is_not_a_criteo_tsv_is_named_with_its_line(
    tmp_path: Path, name: str, content: Callable[[Path], bytes], message: str
) -> None:
    """An empty label or a blank line raised ``AttributeError: 'NoneType' object has no
    attribute 'decode'``; a gzipped TSV raised pyarrow's ``ArrowInvalid`` without the file."""
    path = tmp_path / name
    data = content(path)
    if not data.startswith(b"\x1f\x8b"):  # 20 good lines first: the bad one is line 21
        _write_tsv(path, 20, seed=8)
        data = path.read_bytes() + data
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        convert_criteo_tsv([path], tmp_path / "pq", progress=False)
