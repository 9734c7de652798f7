"""Criteo (Kaggle ``train.txt`` / Terabyte ``day_N`` schema): TSV -> parquet once, then stream.

Input lines are tab-separated without header: label, 13 integer features (may be empty or
negative), 26 categorical features (hex hashes, may be empty).

:func:`convert_criteo_tsv` streams each TSV file block by block with ``pyarrow.csv.open_csv``
(bounded memory, never a whole day) into one parquet file of raw values: ``label`` int8,
``int_0..int_12`` int64 and ``cat_0..cat_25`` int64 parsed from hex, empty fields as nulls.
Only an empty field is missing: text such as ``nan``, ``NA`` or ``NULL`` and bytes that are not
UTF-8 are errors naming the file, the 1-based line and the 1-based column.
Table sizes therefore stay a read-time choice.

:class:`CriteoParquetDataset` streams those files (or Criteo-schema files written by another
tool) one row group at a time through :class:`~torchrec_compress.data.parquet.ParquetDataset`:
dense ``= log(1 + max(x, 0))`` with nulls as 0 (a NaN or infinite value is an error);
categorical integer ``v`` of a table with ``n`` rows ``-> 1 + (v mod (n - 1))``, null -> 0
(row 0 is reserved for "missing"); every file's columns and types are checked when it is opened.

Split layouts (chosen by what the directory holds):

- ``dir/train/*.parquet``, ``dir/val/*.parquet``, ``dir/test/*.parquet``: one directory per split
  (e.g. the slice's ``train.tsv`` / ``dev.tsv`` / ``test.tsv``, each converted into its own
  directory);
- ``dir/*.parquet``: one set, split by rows in file order (sorted names) into contiguous train,
  val and test ranges of ``split_fractions`` (the last rows, i.e. the latest days, are test).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from torchrec.datasets.criteo import (
    DEFAULT_CAT_NAMES,
    DEFAULT_COLUMN_NAMES,
    DEFAULT_INT_NAMES,
    DEFAULT_LABEL_NAME,
)
from tqdm import tqdm

from torchrec_compress.data.checks import describe_field, require_file
from torchrec_compress.data.parquet import ParquetColumns, ParquetDataset, SparseColumn

PARQUET_SCHEMA = pa.schema(
    [pa.field(DEFAULT_LABEL_NAME, pa.int8(), nullable=False)]
    + [pa.field(name, pa.int64()) for name in DEFAULT_INT_NAMES]
    + [pa.field(name, pa.int64()) for name in DEFAULT_CAT_NAMES]
)

_MAX_HEX_DIGITS = 15  # keeps every parsed value a non-negative int64
_EXPECTED_LINE = (
    f"{len(DEFAULT_COLUMN_NAMES)} tab-separated columns (label, 13 integer, 26 categorical)"
)
_GZIP_MAGIC = b"\x1f\x8b"
_HEX_DIGIT = np.full(256, -1, dtype=np.int64)
for _digit, _char in enumerate("0123456789abcdef"):
    _HEX_DIGIT[ord(_char)] = _HEX_DIGIT[ord(_char.upper())] = _digit


def _hex_to_int64(strings: pa.BinaryArray) -> pa.Int64Array:
    """Hex strings (already validated, at most 15 digits) to int64, nulls kept; vectorised."""
    _, offsets_buffer, data_buffer = strings.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32)[
        strings.offset : strings.offset + len(strings) + 1
    ].astype(np.int64)
    lengths = np.diff(offsets)
    values = np.zeros(len(strings), dtype=np.int64)
    if data_buffer is not None and lengths.any():
        data = np.frombuffer(data_buffer, dtype=np.uint8)
        # One pass per digit position (at most 15), each over all strings at once.
        for position in range(int(lengths.max())):
            active = lengths > position
            index = np.minimum(offsets[:-1] + position, len(data) - 1)
            values = np.where(active, values * 16 + _HEX_DIGIT[data[index]], values)
    return pa.array(values, mask=strings.is_null().to_numpy(zero_copy_only=False))


def _convert_block(batch: pa.RecordBatch, path: Path, first_line: int) -> pa.Table:
    """Validate one block of byte-string columns and convert it to :data:`PARQUET_SCHEMA`.

    Fields arrive as raw bytes (no UTF-8 check, only the empty field is null), so that text such
    as ``nan`` or ``NULL`` and bytes that are not UTF-8 fail here, naming file, line and column.
    """
    arrays = []
    for name, field in zip(DEFAULT_COLUMN_NAMES, PARQUET_SCHEMA, strict=True):
        column = batch.column(name)
        if name == DEFAULT_LABEL_NAME:
            pattern, what = r"^[01]$", "a 0/1 label"
        elif name in DEFAULT_INT_NAMES:
            pattern, what = r"^-?[0-9]{1,18}$", "an integer or an empty field (missing)"
        else:
            pattern, what = (
                f"^[0-9a-fA-F]{{1,{_MAX_HEX_DIGITS}}}$",
                f"a hex hash of at most {_MAX_HEX_DIGITS} digits or an empty field (missing)",
            )
        matches = pc.match_substring_regex(column, pattern)
        valid = pc.or_kleene(matches, pc.is_null(column)).to_numpy(zero_copy_only=False)
        if name == DEFAULT_LABEL_NAME:
            valid &= column.is_valid().to_numpy(zero_copy_only=False)
        if not valid.all():
            row = int(np.argmin(valid))
            if all(not batch.column(c)[row].is_valid for c in DEFAULT_COLUMN_NAMES):
                raise ValueError(
                    f"{path}:{first_line + row}: the line is empty; expected {_EXPECTED_LINE}"
                )
            column_number = DEFAULT_COLUMN_NAMES.index(name) + 1
            value = column[row].as_py()
            held = "an empty field" if value is None else describe_field(value)
            raise ValueError(
                f"{path}:{first_line + row}: column {column_number} ({name}) holds {held}; "
                f"expected {what}"
            )
        if name in DEFAULT_CAT_NAMES:
            arrays.append(_hex_to_int64(column))
        else:
            arrays.append(pc.cast(column, field.type))
    return pa.Table.from_arrays(arrays, schema=PARQUET_SCHEMA)


def convert_criteo_tsv(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    rows_per_row_group: int = 131_072,
    block_size: int = 16 << 20,
    progress: bool = True,
) -> list[Path]:
    """Convert Criteo TSV files into parquet files of raw values, streaming.

    Each input ``name.ext`` becomes ``out_dir/name.parquet`` with row groups of
    ``rows_per_row_group`` rows; memory stays around one TSV block plus one row group.  A file
    is written under a temporary name and renamed when complete.

    Args:
        inputs: TSV files (Kaggle ``train.txt``, Terabyte ``day_N``, or slices of them).
        out_dir: output directory, created if missing.  Use one directory per split
            (``out/train``, ``out/val``, ``out/test``) for the per-split layout.
        rows_per_row_group: rows per parquet row group (the streaming unit when reading).
        block_size: bytes of TSV parsed at a time.
        progress: show a tqdm progress bar over bytes read.

    Returns:
        The parquet paths, in input order.

    Raises:
        FileNotFoundError: an input does not exist.
        IsADirectoryError: an input is a directory.
        ValueError: for an empty input, and naming file and 1-based line for a line with the wrong number of columns,
            and file, line and column for a value that is not a 0/1 label, an integer, or hex.

    Example::

        >>> import tempfile, os
        >>> root = tempfile.mkdtemp()
        >>> tsv = os.path.join(root, "train.tsv")
        >>> _ = open(tsv, "w").write("\\t".join(["1"] + ["3"] * 13 + ["0a1b2c3d"] * 26) + "\\n")
        >>> paths = convert_criteo_tsv([tsv], os.path.join(root, "train"), progress=False)
        >>> pq.read_table(paths[0]).column("cat_0").to_pylist()
        [169552957]
    """
    if rows_per_row_group < 1:
        raise ValueError(f"rows_per_row_group must be >= 1, got {rows_per_row_group}")
    sources = [require_file(path, "Criteo TSV file") for path in inputs]
    targets = [Path(out_dir) / f"{source.stem}.parquet" for source in sources]
    if len(set(targets)) != len(targets):
        raise ValueError(f"inputs {[str(s) for s in sources]} map to clashing outputs {targets}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for source, target in zip(sources, targets, strict=True):
        partial = target.with_suffix(".parquet.partial")
        try:
            _convert_file(source, partial, rows_per_row_group, block_size, progress)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
    return targets


def _convert_file(
    source: Path, target: Path, rows_per_row_group: int, block_size: int, progress: bool
) -> None:
    with open(source, "rb") as raw:
        if raw.read(2) == _GZIP_MAGIC:
            raise ValueError(
                f"{source} is gzip-compressed; expected a plain Criteo TSV file "
                f"({_EXPECTED_LINE}): decompress it first (gunzip, or zcat FILE > DAY)"
            )
    try:
        _convert_tsv(source, target, rows_per_row_group, block_size, progress)
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        # pyarrow's own parse errors name neither the file nor (always) the line
        row = re.search(r"Row #(\d+)", str(e))
        where = f"{source}:{row.group(1)}" if row else str(source)
        raise ValueError(
            f"{where}: not a Criteo TSV file ({type(e).__name__}: {e}); expected {_EXPECTED_LINE}"
        ) from e


def _convert_tsv(
    source: Path, target: Path, rows_per_row_group: int, block_size: int, progress: bool
) -> None:
    bad_rows: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad_rows.append(row)
        return "skip"

    with (
        open(source, "rb") as raw,
        tqdm.wrapattr(
            raw, "read", total=source.stat().st_size, desc=source.name, disable=not progress
        ) as stream,
        pq.ParquetWriter(target, PARQUET_SCHEMA) as writer,
    ):
        reader = pacsv.open_csv(
            stream,
            # Without threads, InvalidRow.number is the 1-based line number.
            read_options=pacsv.ReadOptions(
                column_names=DEFAULT_COLUMN_NAMES, use_threads=False, block_size=block_size
            ),
            parse_options=pacsv.ParseOptions(
                delimiter="\t",
                quote_char=False,
                invalid_row_handler=on_invalid,
                ignore_empty_lines=False,
            ),
            # Only an empty field is missing: pyarrow's default null tokens (nan, NA, NULL, ...)
            # would otherwise turn into missing values silently.
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(DEFAULT_COLUMN_NAMES, pa.binary()),
                null_values=[""],
                strings_can_be_null=True,
                check_utf8=False,
            ),
        )
        first_line = 1
        pending: list[pa.Table] = []
        pending_rows = 0
        for batch in reader:
            # The handler ran while this block was parsed: fail before converting it.
            _raise_on_invalid_row(source, bad_rows)
            pending.append(_convert_block(batch, source, first_line))
            first_line += batch.num_rows
            pending_rows += batch.num_rows
            while pending_rows >= rows_per_row_group:
                table = pa.concat_tables(pending)
                writer.write_table(table.slice(0, rows_per_row_group), rows_per_row_group)
                pending = [table.slice(rows_per_row_group)]
                pending_rows -= rows_per_row_group
        _raise_on_invalid_row(source, bad_rows)
        if pending_rows:
            writer.write_table(pa.concat_tables(pending), rows_per_row_group)


def _raise_on_invalid_row(source: Path, bad_rows: list[pacsv.InvalidRow]) -> None:
    if bad_rows:
        row = bad_rows[0]
        raise ValueError(
            f"{source}:{row.number}: {row.actual_columns} tab-separated columns; expected "
            f"{_EXPECTED_LINE}"
        )


def criteo_columns(num_embeddings: Sequence[int]) -> ParquetColumns:
    """The Criteo parquet columns of :func:`convert_criteo_tsv` as a :class:`ParquetColumns`.

    Args:
        num_embeddings: rows of each of the 26 categorical tables (>= 2).

    Example::

        >>> columns = criteo_columns([1000] * 26)
        >>> columns.dense_transform, columns.sparse[0]
        ('log1p', SparseColumn(name='cat_0', num_embeddings=1000, mapping='hash'))
    """
    return ParquetColumns(
        label=DEFAULT_LABEL_NAME,
        dense=tuple(DEFAULT_INT_NAMES),
        sparse=tuple(
            SparseColumn(name, rows, "hash")
            for name, rows in zip(DEFAULT_CAT_NAMES, num_embeddings, strict=True)
        ),
        dense_transform="log1p",
    )


class CriteoParquetDataset(ParquetDataset):
    """Criteo parquet files, streamed one row group at a time.

    A :class:`~torchrec_compress.data.parquet.ParquetDataset` with :func:`criteo_columns`:
    files from :func:`convert_criteo_tsv` or from another tool, checked the same way (a missing
    column, a string or float categorical column, a non-finite dense value are errors naming
    the file and column).

    Args:
        path: a directory in one of the two layouts of the module docstring.
        num_embeddings: rows of every categorical table (one int) or of each of the 26 (>= 2;
            row 0 is reserved for missing values).
        seed: seed of the per-epoch train shuffle (row groups, then rows inside each).
        split_fractions: train/val/test fractions for the single-set layout (ignored otherwise).

    Example::

        >>> import tempfile, os
        >>> root = tempfile.mkdtemp()
        >>> tsv = os.path.join(root, "day.tsv")
        >>> _ = open(tsv, "w").write("\\t".join(["1"] + ["3"] * 13 + ["0a1b2c3d"] * 26) + "\\n")
        >>> for split in ("train", "val", "test"):
        ...     _ = convert_criteo_tsv([tsv], os.path.join(root, "pq", split), progress=False)
        >>> ds = CriteoParquetDataset(os.path.join(root, "pq"), num_embeddings=1000)
        >>> next(ds.batches("test", 8)).sparse_features["cat_0"].values()
        tensor([680])
    """

    def __init__(
        self,
        path: str | Path,
        num_embeddings: int | Sequence[int] = 100_000,
        seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    ) -> None:
        sizes = (
            [num_embeddings] * len(DEFAULT_CAT_NAMES)
            if isinstance(num_embeddings, int)
            else list(num_embeddings)
        )
        if len(sizes) != len(DEFAULT_CAT_NAMES) or min(sizes) < 2:
            raise ValueError(
                f"num_embeddings must be one int >= 2 or {len(DEFAULT_CAT_NAMES)} ints >= 2, got {num_embeddings}"
            )
        super().__init__(path, criteo_columns(sizes), seed, split_fractions)

    def _check_schema(self, file: Path, schema: pa.Schema) -> None:
        super()._check_schema(file, schema)
        for name in DEFAULT_CAT_NAMES:
            data_type = schema.field(name).type
            if not pa.types.is_integer(data_type):
                raise ValueError(
                    f"{file}: column {name!r} (sparse) has type {data_type}; Criteo categorical "
                    "columns hold the integers convert_criteo_tsv parses from hex (strings would "
                    "hash to other rows): convert the TSV with convert_criteo_tsv, or read these "
                    "files with ParquetDataset (--dataset parquet), which hashes strings"
                )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m torchrec_compress.data.criteo convert OUT_DIR FILE...``: TSV → parquet."""
    parser = argparse.ArgumentParser(prog="python -m torchrec_compress.data.criteo")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser(
        "convert",
        help="convert Criteo TSV files (Kaggle train.txt / Terabyte day_N) into parquet",
        description="Use one OUT_DIR per split (e.g. out/train, out/val, out/test), or one "
        "directory that the reader cuts by rows into train/val/test.",
    )
    convert.add_argument("out_dir")
    convert.add_argument("inputs", nargs="+")
    convert.add_argument("--rows-per-row-group", type=int, default=131_072)
    args = parser.parse_args(argv)
    for path in convert_criteo_tsv(args.inputs, args.out_dir, args.rows_per_row_group):
        print(path)


if __name__ == "__main__":
    main()
