"""Frappe (the BARS ``Frappe_x1`` valid and test files) as a :class:`CTRDataset`.

Each libsvm line is ``label id:1 id:1 ...`` with one id for each of 10 fields; ids are global
feature indices and every field owns a fixed contiguous range (:data:`FRAPPE_FIELDS`), so a
field's local id is ``id - first id of its range``.

Canonical split of this project: ``valid.libsvm`` shuffled with
``np.random.default_rng(split_seed=2026).permutation`` and cut into train (the first
``n - round(0.1 n)`` shuffled rows) and val (the rest); test is all of ``test.libsvm`` in file order.
Frappe has no dense features, so the schema exposes one constant-zero dense column.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from torchrec.datasets.utils import Batch

from torchrec_compress.data.checks import describe_field, require_directory, require_file
from torchrec_compress.data.schema import (
    CTRSchema,
    RowBlock,
    block_batches,
    check_split,
    shuffled_blocks,
)

#: (field, first global id, number of ids) in file order.
FRAPPE_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("user", 0, 957),
    ("item", 957, 4082),
    ("daytime", 5039, 7),
    ("weekday", 5046, 7),
    ("isweekend", 5053, 2),
    ("homework", 5055, 3),
    ("cost", 5058, 2),
    ("weather", 5060, 9),
    ("country", 5069, 80),
    ("city", 5149, 233),
)

FRAPPE_SCHEMA = CTRSchema(
    dense_in_features=1,
    sparse_features=tuple(name for name, _, _ in FRAPPE_FIELDS),
    num_embeddings=tuple(size for _, _, size in FRAPPE_FIELDS),
)

_FIELD_STARTS = np.array([start for _, start, _ in FRAPPE_FIELDS], dtype=np.int64)
_NUM_IDS = FRAPPE_FIELDS[-1][1] + FRAPPE_FIELDS[-1][2]


def _read_tokens(path: Path) -> pa.Table:
    """The file as string columns ``label, token0..``; a line with the wrong number of tokens is
    an error naming the file and the 1-based line."""
    columns = ["label"] + [f"token{i}" for i in range(len(FRAPPE_FIELDS))]
    bad_rows: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad_rows.append(row)
        return "skip"

    table = pacsv.read_csv(
        path,
        # Without threads, InvalidRow.number is the 1-based line number.
        read_options=pacsv.ReadOptions(column_names=columns, use_threads=False),
        parse_options=pacsv.ParseOptions(
            delimiter=" ", invalid_row_handler=on_invalid, ignore_empty_lines=False
        ),
        # Raw bytes: a line that is not UTF-8 then fails below, naming file and line.
        convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(columns, pa.binary()), check_utf8=False
        ),
    )
    if bad_rows:
        row = bad_rows[0]
        raise ValueError(
            f"{path}:{row.number}: {row.actual_columns} space-separated tokens in {row.text!r}; "
            f"expected {row.expected_columns} (a label and one id:1 per field {FRAPPE_SCHEMA.sparse_features})"
        )
    return table


def _labels(path: Path, table: pa.Table) -> np.ndarray:
    # Every row was valid, none skipped: row i is line i + 1.
    label_text = table.column("label").combine_chunks()
    label_ok = pc.is_in(label_text, value_set=pa.array([b"0", b"1"])).to_numpy(zero_copy_only=False)
    if not label_ok.all():
        line = int(np.argmin(label_ok))
        label = describe_field(label_text[line].as_py())
        raise ValueError(f"{path}:{line + 1}: label {label} is not 0 or 1")
    return pc.cast(label_text, pa.float32()).to_numpy()


def _ids(path: Path, table: pa.Table) -> np.ndarray:
    """``[rows, fields]`` global ids of the ``<id>:1`` tokens, each inside some field's range."""
    num_fields = len(FRAPPE_FIELDS)
    ids = np.empty((table.num_rows, num_fields), dtype=np.int64)
    for column in range(num_fields):
        tokens = table.column(f"token{column}").combine_chunks()
        pattern = r"^(?P<id>[0-9]{1,12}):1$"
        valid = pc.match_substring_regex(tokens, pattern).to_numpy(zero_copy_only=False)
        if not valid.all():
            line = int(np.argmin(valid))
            raise ValueError(
                f"{path}:{line + 1}: token {describe_field(tokens[line].as_py())} is not of the form <id>:1"
            )
        parsed = pc.extract_regex(tokens, pattern).field("id")
        ids[:, column] = pc.cast(parsed, pa.int64()).to_numpy()
    outside = ids >= _NUM_IDS
    if outside.any():
        line, column = np.argwhere(outside)[0]
        raise ValueError(
            f"{path}:{line + 1}: id {ids[line, column]} (token {column + 1}) is outside every "
            f"field's range; valid ids are 0..{_NUM_IDS - 1}"
        )
    return ids


def _check_one_id_per_field(path: Path, ids: np.ndarray, fields: np.ndarray) -> None:
    num_fields = len(FRAPPE_FIELDS)
    sorted_fields = np.sort(fields, axis=1)
    complete = (sorted_fields == np.arange(num_fields)).all(axis=1)
    if complete.all():
        return
    line = int(np.argmin(complete))
    seen: np.ndarray = np.zeros(num_fields, dtype=bool)
    # Only the failing line is scanned, to name the first repeated field's token.
    for column, field in enumerate(fields[line].tolist()):
        if seen[field]:
            name = FRAPPE_FIELDS[field][0]
            raise ValueError(
                f"{path}:{line + 1}: token {ids[line, column]}:1 is a second id of field "
                f"{name!r} (ids {FRAPPE_FIELDS[field][1]}..{FRAPPE_FIELDS[field][1] + FRAPPE_FIELDS[field][2] - 1}); "
                f"each line needs exactly one id per field"
            )
        seen[field] = True


def read_frappe_libsvm(path: str | Path) -> RowBlock:
    """Parse one Frappe libsvm file into a :class:`RowBlock` of local ids (vectorised).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
        ValueError: for an empty file, and naming the file, the 1-based line and the offending token, for a line with
            the wrong number of fields, a label other than 0/1, a token other than ``<id>:1``,
            an id outside every field's range, or two ids of the same field on one line.

    Example::

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "tiny.libsvm")
        >>> _ = open(path, "w").write("1 3:1 960:1 5040:1 5046:1 5053:1 5055:1 5058:1 5060:1 5069:1 5149:1\\n")
        >>> [int(v[0]) for v in read_frappe_libsvm(path).values][:3]
        [3, 3, 1]
    """
    path = require_file(path, "Frappe file")
    table = _read_tokens(path)
    labels = _labels(path, table)
    ids = _ids(path, table)
    fields = np.searchsorted(_FIELD_STARTS, ids, side="right") - 1
    _check_one_id_per_field(path, ids, fields)
    local = np.empty_like(ids)
    np.put_along_axis(local, fields, ids - _FIELD_STARTS[fields], axis=1)
    num_rows, num_fields = ids.shape
    return RowBlock(
        dense=np.zeros((num_rows, 1), dtype=np.float32),
        labels=labels.astype(np.float32),
        lengths=np.ones((num_fields, num_rows), dtype=np.int32),
        values=tuple(np.ascontiguousarray(local[:, field]) for field in range(num_fields)),
    )


class FrappeDataset:
    """Frappe with the project's canonical split, held in memory (86k rows).

    Args:
        path: directory holding ``valid.libsvm`` and ``test.libsvm``.
        seed: seed of the per-epoch train shuffle.
        val_fraction: fraction of the shuffled ``valid.libsvm`` rows kept for validation.
        split_seed: seed of the shuffle before the train/val cut (2026 is canonical).

    Example::

        >>> import tempfile, os
        >>> root = tempfile.mkdtemp()
        >>> line = "1 3:1 960:1 5040:1 5046:1 5053:1 5055:1 5058:1 5060:1 5069:1 5149:1\\n"
        >>> for name in ("valid.libsvm", "test.libsvm"):
        ...     _ = open(os.path.join(root, name), "w").write(line * 20)
        >>> ds = FrappeDataset(root)
        >>> ds.num_rows("train"), ds.num_rows("val"), ds.num_rows("test")
        (18, 2, 20)
    """

    schema: CTRSchema = FRAPPE_SCHEMA

    def __init__(
        self, path: str | Path, seed: int = 0, val_fraction: float = 0.1, split_seed: int = 2026
    ) -> None:
        root = require_directory(path, "Frappe directory")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.seed = seed
        valid = read_frappe_libsvm(root / "valid.libsvm")
        order = np.random.default_rng(split_seed).permutation(len(valid))
        num_train = len(valid) - round(len(valid) * val_fraction)
        self._splits = {
            "train": valid.take(order[:num_train]),
            "val": valid.take(order[num_train:]),
            "test": read_frappe_libsvm(root / "test.libsvm"),
        }

    def num_rows(self, split: str) -> int:
        """Rows of ``split``."""
        check_split(split)
        return len(self._splits[split])

    def batches(
        self, split: str, batch_size: int, rank: int = 0, world_size: int = 1, epoch: int = 0
    ) -> Iterator[Batch]:
        """Batches of ``rank``'s share of ``split``; ``epoch`` reshuffles train."""
        check_split(split)
        block = self._splits[split]
        sizes, load = [len(block)], lambda index: block
        if split == "train":
            sizes, load = shuffled_blocks(sizes, load, self.seed, epoch)
        return block_batches(
            sizes, load, self.schema.sparse_features, batch_size, rank, world_size, split
        )
