"""Parquet files with declared columns as a :class:`CTRDataset`: bring your own data.

A :class:`ParquetColumns` declares which columns of the files are the label, the dense features
and the categorical (sparse) features, and how each categorical column becomes table rows;
:class:`ParquetDataset` checks every file's schema when it is opened (naming file and column),
then streams one row group at a time and checks the values it reads (naming file, row and column).
The Criteo reader (:class:`~torchrec_compress.data.criteo.CriteoParquetDataset`) is this reader
with the Criteo columns declared.

Columns:

- label: integers, booleans or floats, every value 0 or 1 (a null is an error);
- dense: integers or floats; a null is 0, a NaN or infinite value is an error; ``dense_transform``
  ``"none"`` keeps values, ``"log1p"`` takes ``log(1 + max(x, 0))`` (Criteo's counts);
- sparse, one value or a list per row (a list is a multi-hot bag), ``mapping``:

  - ``"hash"``: integers or strings of a table with ``n >= 2`` rows; row 0 is reserved for a
    missing value (a null), an integer ``v`` becomes ``1 + v mod (n - 1)``, a string
    ``1 + h(s) mod (n - 1)`` with a fixed 64-bit hash of its UTF-8 bytes (the same on every
    machine and run); a null list is an empty bag;
  - ``"identity"``: integers that already are rows, each in ``[0, n)``; nulls are dropped from
    their bag (a null value or null list is an empty bag).

  Floats are refused as categorical values: truncating 1.5 or -1.0 would hide a bug upstream.

Split layouts (chosen by what the directory holds):

- ``dir/train/*.parquet``, ``dir/val/*.parquet``, ``dir/test/*.parquet``: one directory per split;
- ``dir/*.parquet``: one set, split by rows in file order (sorted names) into contiguous train,
  val and test ranges of ``split_fractions`` (the last rows are test).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from torchrec.datasets.utils import Batch

from torchrec_compress.data.checks import require_directory, require_file
from torchrec_compress.data.schema import (
    SPLITS,
    CTRSchema,
    RowBlock,
    block_batches,
    check_split,
    shuffled_blocks,
)

MAPPINGS: tuple[str, ...] = ("hash", "identity")
DENSE_TRANSFORMS: tuple[str, ...] = ("none", "log1p")


@dataclass(frozen=True)
class SparseColumn:
    """One categorical column and the embedding table it is looked up in.

    Args:
        name: column name; also the feature name (table ``"t_" + name``).
        num_embeddings: rows of the table.
        mapping: ``"hash"`` (integers or strings hashed into rows ``1..n-1``, row 0 for a
            missing value) or ``"identity"`` (integers that are rows, in ``[0, n)``).

    Example::

        >>> SparseColumn("user", 1000).mapping
        'hash'
    """

    name: str
    num_embeddings: int
    mapping: str = "hash"

    def __post_init__(self) -> None:
        if self.mapping not in MAPPINGS:
            raise ValueError(
                f"sparse column {self.name!r}: unknown mapping {self.mapping!r}; valid: {MAPPINGS}"
            )
        least = 2 if self.mapping == "hash" else 1
        if not isinstance(self.num_embeddings, int) or self.num_embeddings < least:
            raise ValueError(
                f"sparse column {self.name!r}: num_embeddings must be an int >= {least} for "
                f"mapping {self.mapping!r} (row 0 is reserved for missing values when hashing), "
                f"got {self.num_embeddings!r}"
            )


@dataclass(frozen=True)
class ParquetColumns:
    """Which columns of a parquet dataset are label, dense and sparse features.

    Plain data: written and read as JSON by :meth:`to_dict` / :meth:`from_dict` /
    :meth:`from_json`, e.g.
    ``{"label": "click", "dense": ["price"], "dense_transform": "log1p",
    "sparse": [{"name": "user", "num_embeddings": 1000}, {"name": "tags", "num_embeddings": 50}]}``.

    Args:
        label: the 0/1 label column.
        dense: dense feature columns, in model input order (none: the model gets one constant-zero
            dense column, because DLRM needs a dense input).
        sparse: categorical columns, in KJT key order (at least one).
        dense_transform: ``"none"`` or ``"log1p"`` (``log(1 + max(x, 0))``).

    Example::

        >>> columns = ParquetColumns.from_dict(
        ...     {"label": "click", "sparse": [{"name": "tags", "num_embeddings": 50}]}
        ... )
        >>> columns.ctr_schema()
        CTRSchema(dense_in_features=1, sparse_features=('tags',), num_embeddings=(50,))
    """

    label: str
    dense: tuple[str, ...] = ()
    sparse: tuple[SparseColumn, ...] = ()
    dense_transform: str = "none"

    def __post_init__(self) -> None:
        if self.dense_transform not in DENSE_TRANSFORMS:
            raise ValueError(
                f"unknown dense_transform {self.dense_transform!r}; valid: {DENSE_TRANSFORMS}"
            )
        if not self.sparse:
            raise ValueError("declare at least one sparse column (a CTR model needs a table)")
        names = [self.label, *self.dense, *(column.name for column in self.sparse)]
        if not all(isinstance(name, str) and name for name in names):
            raise ValueError(f"column names must be non-empty strings, got {names}")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"columns {repeated} are declared more than once")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParquetColumns:
        """Build from plain data (e.g. parsed JSON); unknown keys are an error naming them."""
        known = {"label", "dense", "sparse", "dense_transform"}
        if not isinstance(data, Mapping) or set(data) - known or "label" not in data:
            keys = sorted(data) if isinstance(data, Mapping) else data
            raise ValueError(
                f"column declaration needs 'label' and may have {sorted(known - {'label'})}; got {keys}"
            )
        if isinstance(data.get("dense"), str) or isinstance(data.get("sparse"), str | Mapping):
            raise ValueError("'dense' and 'sparse' must be lists (of names, and of sparse entries)")
        sparse = []
        for entry in data.get("sparse", ()):
            required = {"name", "num_embeddings"}
            if not isinstance(entry, Mapping) or not required <= set(entry) <= {
                *required,
                "mapping",
            }:
                raise ValueError(
                    f"sparse entry {entry!r} needs 'name' and 'num_embeddings' and may have 'mapping'"
                )
            sparse.append(SparseColumn(**entry))
        return cls(
            label=data["label"],
            dense=tuple(data.get("dense", ())),
            sparse=tuple(sparse),
            dense_transform=data.get("dense_transform", "none"),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> ParquetColumns:
        """Read a declaration written as JSON (see the class docstring)."""
        path = require_file(path, "column declaration (JSON) file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from error
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_dict` reads back."""
        return asdict(self)

    def ctr_schema(self) -> CTRSchema:
        """The :class:`CTRSchema` a model built for this data needs."""
        return CTRSchema(
            dense_in_features=max(len(self.dense), 1),
            sparse_features=tuple(column.name for column in self.sparse),
            num_embeddings=tuple(column.num_embeddings for column in self.sparse),
        )


class _Piece(NamedTuple):
    """Rows ``start:stop`` of one row group, whose first row is row ``group_start`` of the file."""

    file: Path
    row_group: int
    group_start: int
    start: int
    stop: int


class ParquetDataset:
    """Parquet files with declared columns, streamed one row group at a time.

    Args:
        path: a directory in one of the two layouts of the module docstring.
        columns: the column declaration, or the path of its JSON file.
        seed: seed of the per-epoch train shuffle (row groups, then rows inside each).
        split_fractions: train/val/test fractions for the single-set layout (ignored otherwise).

    Raises:
        ValueError: a file lacks a declared column or holds one of a type that cannot be read
            as declared (file and column named); later, while reading, a value that is not
            valid (file, row and column named).

    Example::

        >>> import tempfile, os
        >>> root = tempfile.mkdtemp()
        >>> table = pa.table({"click": [0, 1, 1], "price": [1.5, 2.0, 0.5],
        ...                   "tags": [["a", "b"], [], None], "user": [7, 7, 3]})
        >>> pq.write_table(table, os.path.join(root, "part-0.parquet"))
        >>> columns = ParquetColumns("click", ("price",), (SparseColumn("tags", 50),
        ...                          SparseColumn("user", 10, "identity")))
        >>> ds = ParquetDataset(root, columns, split_fractions=(0.0, 0.0, 1.0))
        >>> batch = next(ds.batches("test", 8))
        >>> batch.sparse_features["tags"].lengths().tolist(), batch.sparse_features["user"].values().tolist()
        ([2, 0, 0], [7, 7, 3])
    """

    def __init__(
        self,
        path: str | Path,
        columns: ParquetColumns | str | Path,
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    ) -> None:
        root = require_directory(path, "parquet data directory")
        if not isinstance(columns, ParquetColumns):
            columns = ParquetColumns.from_json(columns)
        self.columns = columns
        self.schema = columns.ctr_schema()
        self.seed = seed
        self._pieces = _split_pieces(root, split_fractions, self._check_schema)

    def _check_schema(self, file: Path, schema: pa.Schema) -> None:
        """Raise a ``ValueError`` naming ``file`` and the column unless ``schema`` fits."""
        check_file_schema(file, schema, self.columns)

    def num_rows(self, split: str) -> int:
        """Rows of ``split``."""
        check_split(split)
        return sum(piece.stop - piece.start for piece in self._pieces[split])

    def batches(
        self, split: str, batch_size: int, rank: int = 0, world_size: int = 1, epoch: int = 0
    ) -> Iterator[Batch]:
        """Batches of ``rank``'s share of ``split``; ``epoch`` reshuffles train."""
        check_split(split)
        pieces = self._pieces[split]
        names = [self.columns.label, *self.columns.dense, *(c.name for c in self.columns.sparse)]

        def load(index: int) -> RowBlock:
            piece = pieces[index]
            table = pq.ParquetFile(piece.file).read_row_group(piece.row_group, columns=names)
            return read_block(
                table.slice(piece.start, piece.stop - piece.start),
                self.columns,
                str(piece.file),
                piece.group_start + piece.start,
            )

        sizes: list[int] = [piece.stop - piece.start for piece in pieces]
        loader: Callable[[int], RowBlock] = load
        if split == "train":
            sizes, loader = shuffled_blocks(sizes, load, self.seed, epoch)
        return block_batches(
            sizes, loader, self.schema.sparse_features, batch_size, rank, world_size, split
        )


def _error(file: str, row: int, name: str, message: str) -> ValueError:
    return ValueError(f"{file}: row {row} (0-based), column {name!r}: {message}")


def _labels(column: pa.ChunkedArray, name: str, file: str, first_row: int) -> np.ndarray:
    array = column.combine_chunks()
    missing = array.is_null().to_numpy(zero_copy_only=False)
    if missing.any():
        raise _error(file, first_row + int(np.argmax(missing)), name, "the label is missing")
    labels = array.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        row = int(np.argmax(bad))
        raise _error(file, first_row + row, name, f"label {labels[row]} is not 0 or 1")
    return labels.astype(np.float32)


def _dense(
    column: pa.ChunkedArray, name: str, transform: str, file: str, first_row: int
) -> np.ndarray:
    array = column.combine_chunks()
    values = pc.fill_null(array, pa.scalar(0, array.type)).to_numpy(zero_copy_only=False)
    values = values.astype(np.float64)
    out = (np.log1p(np.maximum(values, 0)) if transform == "log1p" else values).astype(np.float32)
    bad = ~np.isfinite(values) | ~np.isfinite(out)
    if bad.any():
        row = int(np.argmax(bad))
        raise _error(
            file,
            first_row + row,
            name,
            f"dense value {values[row]} is not finite in float32; dense values must be finite "
            "numbers (a null reads as 0)",
        )
    return out


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the output (uint64 arithmetic wraps)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_strings(strings: pa.Array) -> np.ndarray:
    """A fixed 64-bit hash of each string's UTF-8 bytes (nulls hash as ``""``); vectorised.

    A polynomial over the bytes (wrapping uint64 arithmetic) mixed with the length by splitmix64's
    finaliser: no Python loop over strings, and the same value on every machine and run.

    Args:
        strings: a string, large string, binary or large binary array.

    Example::

        >>> hash_strings(pa.array(["a", "zzzz", None])).tolist()
        [1804080386290714614, 16394436400544638496, 0]
    """
    strings = pc.fill_null(strings.cast(pa.large_binary()), pa.scalar(b"", pa.large_binary()))
    _, offsets_buffer, data_buffer = strings.buffers()
    raw_offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[
        strings.offset : strings.offset + len(strings) + 1
    ]
    data = (
        np.frombuffer(data_buffer, dtype=np.uint8)[raw_offsets[0] : raw_offsets[-1]]
        if data_buffer is not None
        else np.empty(0, dtype=np.uint8)
    )
    offsets = raw_offsets - raw_offsets[0]
    lengths = np.diff(offsets)
    position = np.arange(len(data)) - np.repeat(offsets[:-1], lengths)
    powers = np.cumprod(
        np.full(max(int(lengths.max(initial=0)), 1), 0x100000001B3, dtype=np.uint64)
    )
    terms = (data.astype(np.uint64) + np.uint64(1)) * powers[position]
    sums = np.concatenate([np.zeros(1, np.uint64), np.cumsum(terms, dtype=np.uint64)])
    return _mix64((sums[offsets[1:]] - sums[offsets[:-1]]) ^ lengths.astype(np.uint64))


def _hashed(values: pa.Array, rows: int) -> np.ndarray:
    """Hash bucket ``1 + v mod (rows - 1)`` of every value (nulls: anything; masked later)."""
    if pa.types.is_integer(values.type):
        ints = pc.fill_null(values, pa.scalar(0, values.type)).to_numpy(zero_copy_only=False)
        if ints.dtype == np.uint64:
            return 1 + (ints % np.uint64(rows - 1)).astype(np.int64)
        return 1 + ints.astype(np.int64) % (rows - 1)
    return 1 + (hash_strings(values) % np.uint64(rows - 1)).astype(np.int64)


def _sparse(
    column: pa.ChunkedArray, spec: SparseColumn, file: str, first_row: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths [rows], ids)`` of one categorical column (a value or a list per row)."""
    array = _decoded(column.combine_chunks())
    if _is_list(array.type):
        lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False)
        flat = _decoded(pc.list_flatten(array))
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
    else:
        lengths = np.ones(len(array), dtype=np.int64)
        flat, parents = array, np.arange(len(array))
    valid = flat.is_valid().to_numpy(zero_copy_only=False)
    rows = spec.num_embeddings
    if spec.mapping == "hash":
        return lengths.astype(np.int32), np.where(valid, _hashed(flat, rows), 0)
    ids = pc.fill_null(flat, pa.scalar(0, flat.type)).to_numpy(zero_copy_only=False)
    outside = valid & ((ids < 0) | (ids >= rows))
    if outside.any():
        index = int(np.argmax(outside))
        raise _error(
            file,
            first_row + int(parents[index]),
            spec.name,
            f"id {ids[index]} is outside [0, {rows}) of table 't_{spec.name}' (mapping "
            "'identity'); declare more rows or use mapping 'hash'",
        )
    lengths = np.bincount(parents[valid], minlength=len(array))
    return lengths.astype(np.int32), ids[valid].astype(np.int64)


def read_block(table: pa.Table, columns: ParquetColumns, file: str, first_row: int) -> RowBlock:
    """Rows of a parquet table as a :class:`RowBlock`, checking every value read.

    Args:
        table: the rows (a row group or a slice of one), holding the declared columns.
        columns: the declaration.
        file: the file name for error messages.
        first_row: row number in the file of the table's first row, for error messages.

    Raises:
        ValueError: naming file, row and column, for a missing label or one other than 0/1, a
            dense value that is not finite, an ``"identity"`` id outside its table.

    Example::

        >>> table = pa.table({"y": [1, 0], "ids": [[1, 2], [3]]})
        >>> columns = ParquetColumns("y", sparse=(SparseColumn("ids", 4, "identity"),))
        >>> read_block(table, columns, "x.parquet", 0).lengths.tolist()
        [[2, 1]]
    """
    labels = _labels(table.column(columns.label), columns.label, file, first_row)
    dense = [
        _dense(table.column(name), name, columns.dense_transform, file, first_row)
        for name in columns.dense
    ]
    sparse = [_sparse(table.column(c.name), c, file, first_row) for c in columns.sparse]
    return RowBlock(
        dense=np.stack(dense, axis=1) if dense else np.zeros((len(labels), 1), np.float32),
        labels=labels,
        lengths=np.stack([lengths for lengths, _ in sparse]),
        values=tuple(ids for _, ids in sparse),
    )


def _is_list(data_type: pa.DataType) -> bool:
    return pa.types.is_list(data_type) or pa.types.is_large_list(data_type)


def _decoded(array: pa.Array) -> pa.Array:
    """A dictionary-encoded array (pandas categoricals) as its plain values."""
    return array.dictionary_decode() if pa.types.is_dictionary(array.type) else array


def _is_text(data_type: pa.DataType) -> bool:
    return any(
        check(data_type)
        for check in (
            pa.types.is_string,
            pa.types.is_large_string,
            pa.types.is_binary,
            pa.types.is_large_binary,
        )
    )


def _column_problem(data_type: pa.DataType, role: str, mapping: str) -> str | None:
    """Why a column of ``data_type`` cannot be read in ``role``, or None when it can."""
    number = pa.types.is_integer(data_type) or pa.types.is_floating(data_type)
    if role == "label":
        ok = number or pa.types.is_boolean(data_type)
        return None if ok else "expected integers, booleans or floats holding 0 and 1"
    if role == "dense":
        return None if number else "expected integers or floats"
    value_type = data_type.value_type if _is_list(data_type) else data_type
    if pa.types.is_dictionary(value_type):
        value_type = value_type.value_type
    if pa.types.is_integer(value_type) or (mapping == "hash" and _is_text(value_type)):
        return None
    expected = "integers or strings" if mapping == "hash" else "integers"
    problem = f"expected {expected}, or lists of them (mapping {mapping!r})"
    if pa.types.is_floating(value_type):
        problem += (
            "; categorical ids must be integers, and truncating floats such as 1.5 or -1.0 "
            "would hide an upstream bug (pandas turns an integer column with missing values into "
            "floats: cast it to an integer type, keeping the nulls)"
        )
    return problem


def check_file_schema(file: Path, schema: pa.Schema, columns: ParquetColumns) -> None:
    """Raise a ``ValueError`` naming ``file`` and the column if ``schema`` cannot be read as declared.

    Args:
        file: the parquet file (for the message).
        schema: its arrow schema.
        columns: the declaration.

    Example::

        >>> columns = ParquetColumns("y", sparse=(SparseColumn("user", 10),))
        >>> check_file_schema(Path("a.parquet"), pa.schema([("y", pa.int8())]), columns)
        Traceback (most recent call last):
        ...
        ValueError: a.parquet: no column 'user' (declared sparse); the file has columns ['y']
    """
    roles = [(columns.label, "label", "")]
    roles += [(name, "dense", "") for name in columns.dense]
    roles += [(column.name, "sparse", column.mapping) for column in columns.sparse]
    for name, role, mapping in roles:
        if name not in schema.names:
            raise ValueError(
                f"{file}: no column {name!r} (declared {role}); the file has columns {schema.names}"
            )
        data_type = schema.field(name).type
        problem = _column_problem(data_type, role, mapping)
        if problem:
            raise ValueError(f"{file}: column {name!r} ({role}) has type {data_type}; {problem}")


_SchemaCheck = Callable[[Path, pa.Schema], None]


def _row_groups(files: Sequence[Path], check: _SchemaCheck) -> list[_Piece]:
    """Non-empty row groups of ``files``, each file's schema checked first."""
    pieces = []
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except pa.ArrowException as error:
            raise ValueError(f"{file}: not a readable parquet file ({error})") from error
        check(file, parquet.schema_arrow)
        group_start = 0
        for row_group in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(row_group).num_rows
            if rows:
                pieces.append(_Piece(file, row_group, group_start, 0, rows))
            group_start += rows
    return pieces


def _split_pieces(
    root: Path, split_fractions: tuple[float, float, float], check: _SchemaCheck
) -> dict[str, list[_Piece]]:
    """Row-group pieces of each split, for either layout (see the module docstring)."""
    if (root / "train").is_dir():
        pieces = {}
        for split in SPLITS:
            directory = root / split
            files = sorted(directory.glob("*.parquet"))
            if not files:
                raise FileNotFoundError(
                    f"{str(directory)!r} holds no parquet files; the per-split layout needs "
                    f"{root}/train, {root}/val and {root}/test"
                )
            pieces[split] = _row_groups(files, check)
        return pieces
    files = sorted(root.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"{str(root)!r} holds neither train/ val/ test/ directories nor *.parquet files"
        )
    if (
        len(split_fractions) != 3
        or min(split_fractions) < 0
        or abs(sum(split_fractions) - 1) > 1e-9
    ):
        raise ValueError(
            f"split_fractions must be 3 non-negative numbers summing to 1, got {split_fractions}"
        )
    all_pieces = _row_groups(files, check)
    total = sum(piece.stop for piece in all_pieces)
    cuts = np.round(np.cumsum([0.0, *split_fractions]) * total).astype(np.int64)
    firsts = np.cumsum([0] + [piece.stop for piece in all_pieces])
    pieces = {}
    for split, low, high in zip(SPLITS, cuts[:-1], cuts[1:], strict=True):
        # Clip every row group to [low, high) in global row coordinates.
        pieces[split] = [
            piece._replace(start=int(max(low - first, 0)), stop=int(min(high - first, piece.stop)))
            for piece, first in zip(all_pieces, firsts[:-1], strict=True)
            if first < high and first + piece.stop > low
        ]
    return pieces
