import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torchrec.datasets.utils import Batch

from torchrec_compress.data import (
    ParquetColumns,
    ParquetDataset,
    SparseColumn,
    check_batch,
    get_dataset,
)
from torchrec_compress.data.parquet import hash_strings, read_block

COLUMNS = ParquetColumns(
    label="click",
    dense=("price", "age"),
    sparse=(
        SparseColumn("user", 7),
        SparseColumn("item", 50, "identity"),
        SparseColumn("tags", 11),
        SparseColumn("genres", 5, "identity"),
    ),
)


def _table(num_rows: int, seed: int) -> pa.Table:
    """Strings, ints, multi-hot lists with empty and null bags and null elements, bool labels."""
    rng = np.random.default_rng(seed)
    words = np.array(["red", "green", "blue", "ünï", ""])
    tags = [
        None if rng.random() < 0.1 else [str(w) for w in rng.choice(words, rng.integers(0, 4))]
        for _ in range(num_rows)
    ]
    genres = [
        [None if rng.random() < 0.2 else int(g) for g in rng.integers(0, 5, rng.integers(0, 3))]
        for _ in range(num_rows)
    ]
    return pa.table(
        {
            "click": pa.array(rng.random(num_rows) < 0.3),
            "price": pa.array(rng.normal(size=num_rows)),
            "age": pa.array(
                [None if rng.random() < 0.1 else int(a) for a in rng.integers(0, 90, num_rows)],
                pa.int32(),
            ),
            "user": pa.array([f"u{u}" for u in rng.integers(0, 20, num_rows)]),
            "item": pa.array(rng.integers(0, 50, num_rows), pa.int16()),
            "tags": pa.array(tags, pa.large_list(pa.string())),
            "genres": pa.array(genres, pa.list_(pa.int64())),
            "ignored": pa.array(["x"] * num_rows),
        }
    )


def _bag_rows(batches: list[Batch]) -> list[tuple]:
    """One hashable tuple per row: label, dense, and every feature's bag."""
    rows = []
    for batch in batches:
        bags = [jt.to_dense() for jt in batch.sparse_features.to_dict().values()]
        for row, (label, dense) in enumerate(
            zip(batch.labels.tolist(), batch.dense_features.tolist(), strict=True)
        ):
            rows.append((label, tuple(dense), *(tuple(bag[row].tolist()) for bag in bags)))
    return rows


def test_values_lists_strings_and_nulls_become_bags(tmp_path: Path) -> None:
    table = _table(60, seed=0)
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=16)
    dataset = ParquetDataset(tmp_path, COLUMNS, split_fractions=(0.0, 0.0, 1.0))
    assert dataset.schema.sparse_features == ("user", "item", "tags", "genres")
    [batch] = dataset.batches("test", 60)
    check_batch(batch, dataset.schema)
    assert batch.labels.tolist() == [float(v) for v in table["click"].to_pylist()]
    ages = [0.0 if v is None else float(v) for v in table["age"].to_pylist()]
    assert np.allclose(batch.dense_features.numpy(), np.stack([table["price"], ages], 1))
    sparse = batch.sparse_features.to_dict()
    # hash: a string v lands in 1 + h(v) mod 6; equal strings share a row; row 0 is "missing"
    user = hash_strings(table["user"].combine_chunks()) % np.uint64(6) + np.uint64(1)
    assert sparse["user"].values().tolist() == user.tolist()
    assert sparse["user"].lengths().tolist() == [1] * 60
    # identity: ints are rows
    assert sparse["item"].values().tolist() == table["item"].to_pylist()
    # multi-hot lists: a null list is an empty bag, bags keep their length
    tags = table["tags"].to_pylist()
    assert sparse["tags"].lengths().tolist() == [0 if t is None else len(t) for t in tags]
    flat_tags = [w for t in tags if t for w in t]
    expected = hash_strings(pa.array(flat_tags)) % np.uint64(10) + np.uint64(1)
    assert sparse["tags"].values().tolist() == expected.tolist()
    # identity lists: null elements are dropped from their bag
    genres = [[g for g in bag if g is not None] for bag in table["genres"].to_pylist()]
    assert sparse["genres"].lengths().tolist() == [len(bag) for bag in genres]
    assert sparse["genres"].values().tolist() == [g for bag in genres for g in bag]
    assert max(sparse["tags"].lengths().tolist()) > 1


def test_string_hash_is_fixed_and_ints_hash_like_criteo() -> None:
    # Pinned: a changed hash would silently remap every trained row of a string feature.
    assert hash_strings(pa.array(["a", "zzzz", None, ""])).tolist() == [
        1804080386290714614,
        16394436400544638496,
        0,
        0,
    ]
    sliced = pa.array(["q", "a", "zzzz"], pa.large_string()).slice(1)
    assert hash_strings(sliced).tolist() == [1804080386290714614, 16394436400544638496]
    table = pa.table({"y": [0, 1, 1], "v": pa.array([5, -3, None], pa.int8())})
    columns = ParquetColumns("y", sparse=(SparseColumn("v", 4),))
    block = read_block(table, columns, "t.parquet", 0)
    assert block.values[0].tolist() == [1 + 5 % 3, 1 + (-3) % 3, 0]
    # A dictionary-encoded column (pandas' category dtype) hashes like its plain values.
    words = pa.array(["a", "zzzz", None, "a"])
    plain, encoded = (
        read_block(pa.table({"y": [0] * 4, "v": v}), columns, "t.parquet", 0).values[0].tolist()
        for v in (words, words.dictionary_encode())
    )
    assert (
        plain
        == encoded
        == [
            1 + 1804080386290714614 % 3,
            1 + 16394436400544638496 % 3,
            0,
            1 + 1804080386290714614 % 3,
        ]
    )


def test_split_rules_ranks_and_epochs_with_bags(tmp_path: Path) -> None:
    for part in range(2):
        pq.write_table(_table(75, seed=part), tmp_path / f"part-{part}.parquet", row_group_size=20)
    dataset = ParquetDataset(tmp_path, COLUMNS, split_fractions=(0.8, 0.1, 0.1))
    assert [dataset.num_rows(s) for s in ("train", "val", "test")] == [120, 15, 15]
    everything = _bag_rows(
        list(ParquetDataset(tmp_path, COLUMNS, split_fractions=(0, 0, 1)).batches("test", 64))
    )
    assert _bag_rows(list(dataset.batches("test", 4))) == everything[135:]
    for split in ("train", "val"):
        single = Counter(_bag_rows(list(dataset.batches(split, 8))))
        for world_size in (2, 3):
            per_rank = [list(dataset.batches(split, 8, r, world_size)) for r in range(world_size)]
            assert len({len(batches) for batches in per_rank}) == 1
            assert Counter(row for b in per_rank for row in _bag_rows(b)) == single
    epoch0, epoch1 = (_bag_rows(list(dataset.batches("train", 8, epoch=e))) for e in (0, 1))
    assert epoch0 != epoch1 and Counter(epoch0) == Counter(epoch1) == Counter(everything[:120])


def test_json_declaration_and_get_dataset(tmp_path: Path) -> None:
    for split, rows in (("train", 40), ("val", 10), ("test", 12)):
        (tmp_path / split).mkdir()
        pq.write_table(_table(rows, seed=rows), tmp_path / split / "a.parquet")
    (tmp_path / "columns.json").write_text(json.dumps(COLUMNS.to_dict()))
    assert ParquetColumns.from_json(tmp_path / "columns.json") == COLUMNS
    dataset = get_dataset("parquet", path=tmp_path, columns=str(tmp_path / "columns.json"))
    assert [dataset.num_rows(s) for s in ("train", "val", "test")] == [40, 10, 12]
    assert dataset.schema == COLUMNS.ctr_schema()
    with pytest.raises(ValueError, match="needs columns="):
        get_dataset("parquet", path=tmp_path)


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        ({"label": "y", "sparse": [{"name": "a", "num_embeddings": 9}], "dens": []}, "'dens'"),
        ({"label": "y", "sparse": [{"name": "a"}]}, "needs 'name' and 'num_embeddings'"),
        (
            {"label": "y", "sparse": [{"name": "a", "num_embeddings": 9, "rows": 3}]},
            "'rows': 3} needs 'name' and 'num_embeddings' and may have 'mapping'",
        ),
        ({"label": "y", "sparse": []}, "at least one sparse column"),
        (
            {"label": "y", "dense": "p", "sparse": [{"name": "a", "num_embeddings": 9}]},
            "'dense' and 'sparse' must be lists",
        ),
        ({"label": 3, "sparse": [{"name": "a", "num_embeddings": 9}]}, "non-empty strings"),
        (
            {"label": "y", "sparse": [{"name": "a", "num_embeddings": 9, "mapping": "vocab"}]},
            "sparse column 'a': unknown mapping 'vocab'",
        ),
        ({"label": "y", "sparse": [{"name": "a", "num_embeddings": 1}]}, "int >= 2"),
        (
            {"label": "y", "dense": ["a"], "sparse": [{"name": "a", "num_embeddings": 9}]},
            r"columns \['a'\] are declared more than once",
        ),
    ],
)
def test_bad_declarations_are_named(tmp_path: Path, declaration: dict, message: str) -> None:
    (tmp_path / "c.json").write_text(json.dumps(declaration))
    with pytest.raises(ValueError, match=f"c.json: .*{message}"):
        ParquetColumns.from_json(tmp_path / "c.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        ParquetColumns.from_json(tmp_path / "broken.json")


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        (
            "item",
            pa.array(["a"] * 30),
            r"column 'item' \(sparse\) has type string; expected integers",
        ),
        (
            "tags",
            pa.array([[1.5]] * 30),
            r"column 'tags' \(sparse\) has type list<element: double>; .*must be integers",
        ),
        ("age", pa.array([[1]] * 30), r"column 'age' \(dense\) has type list"),
    ],
)
def test_schema_checked_when_opened(
    tmp_path: Path, column: str, values: pa.Array, message: str
) -> None:
    table = _table(30, seed=1)
    table = table.set_column(table.schema.get_field_index(column), column, values)
    pq.write_table(table, tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="x.parquet: " + message):
        ParquetDataset(tmp_path, COLUMNS)


def test_identity_id_outside_table_names_file_row_column(tmp_path: Path) -> None:
    table = _table(30, seed=2)
    genres = table["genres"].to_pylist()
    genres[23] = [1, 5]
    table = table.set_column(6, "genres", pa.array(genres, pa.list_(pa.int64())))
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=10)
    dataset = ParquetDataset(tmp_path, COLUMNS, split_fractions=(0, 0, 1))
    with pytest.raises(
        ValueError,
        match=r"x.parquet: row 23 \(0-based\), column 'genres': id 5 is outside \[0, 5\)",
    ):
        list(dataset.batches("test", 30))
