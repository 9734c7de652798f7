"""Validation of input paths and of batches against a :class:`~torchrec_compress.data.schema.CTRSchema`.

An id outside its table makes fbgemm read or write out of bounds (silently on CPU), so a batch
is checked once, cheaply, before it reaches a model: one min/max per feature, never a loop over
rows or ids.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchrec.datasets.utils import Batch

from torchrec_compress.data.schema import CTRSchema


def describe_field(value: bytes) -> str:
    """A text field's raw bytes for an error message, saying so when they are not UTF-8.

    Args:
        value: the field as read (readers keep fields as bytes so that a file that is not
            UTF-8 fails with its file and line, not deep inside pyarrow).

    Example::

        >>> describe_field(b"nan"), describe_field(b"0a\\xff")
        ("'nan'", "b'0a\\\\xff' (not valid UTF-8)")
    """
    try:
        return repr(value.decode("utf-8"))
    except UnicodeDecodeError:
        return f"{value!r} (not valid UTF-8)"


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a ``Path`` if it is a non-empty file; otherwise an error saying what it is.

    Args:
        path: the input file.
        what: what the file should hold, for the message (e.g. ``"Criteo TSV file"``).

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        IsADirectoryError: ``path`` is a directory.
        ValueError: the file is empty.

    Example::

        >>> require_file("/", "Criteo TSV file")
        Traceback (most recent call last):
        ...
        IsADirectoryError: Criteo TSV file '/' is a directory, not a file; pass the files inside it
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{what} {str(path)!r} is a directory, not a file; pass the files inside it"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {str(path)!r} is empty")
    return path


def require_directory(path: str | Path, what: str) -> Path:
    """``path`` as a ``Path`` if it is a directory; otherwise an error saying what it is.

    Args:
        path: the input directory.
        what: what the directory should hold, for the message (e.g. ``"Frappe directory"``).

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        NotADirectoryError: ``path`` is a file.

    Example::

        >>> require_directory("/nowhere", "Frappe directory")
        Traceback (most recent call last):
        ...
        FileNotFoundError: Frappe directory '/nowhere' does not exist
    """
    path = Path(path)
    if path.is_file():
        raise NotADirectoryError(
            f"{what} {str(path)!r} is a file, not a directory; pass the directory that holds it"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    return path


def check_batch(batch: Batch, schema: CTRSchema) -> None:
    """Raise a ``ValueError`` describing the first way ``batch`` does not fit ``schema``.

    Checks the dense width and dtype, NaN or infinite dense values, labels in {0, 1}, the KJT keys and
    stride, and that every id of feature ``f`` lies in ``[0, num_embeddings_f)`` of table
    ``t_<f>``.

    Args:
        batch: the batch to check.
        schema: the schema it must follow.

    Example::

        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> schema = CTRSchema(1, ("user",), (10,))
        >>> kjt = KeyedJaggedTensor(["user"], torch.tensor([3, 12]), lengths=torch.tensor([1, 1]))
        >>> batch = Batch(torch.zeros(2, 1), kjt, torch.tensor([0.0, 1.0]))
        >>> check_batch(batch, schema)
        Traceback (most recent call last):
        ...
        ValueError: feature 'user' (table 't_user'): id 12 is outside the valid range [0, 10)
    """
    dense, labels, sparse = batch.dense_features, batch.labels, batch.sparse_features
    if dense.dim() != 2 or dense.shape[1] != schema.dense_in_features:
        raise ValueError(
            f"dense_features has shape {tuple(dense.shape)}; expected [batch, {schema.dense_in_features}]"
        )
    if not dense.is_floating_point():
        raise ValueError(f"dense_features has dtype {dense.dtype}; expected a floating point dtype")
    nonfinite = ~torch.isfinite(dense)
    if bool(nonfinite.any()):
        row, column = (int(i) for i in nonfinite.nonzero()[0])
        value = float(dense[row, column])
        text = "NaN" if value != value else str(value)
        raise ValueError(f"dense_features has {text} at row {row}, column {column}")
    if labels.shape != (dense.shape[0],):
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected [{dense.shape[0]}]")
    bad_labels = (labels != 0) & (labels != 1)
    if bool(bad_labels.any()):
        row = int(bad_labels.nonzero()[0, 0])
        raise ValueError(f"label {labels[row].item()} at row {row} is not 0 or 1")
    if tuple(sparse.keys()) != schema.sparse_features:
        raise ValueError(
            f"sparse_features has keys {tuple(sparse.keys())}; expected {schema.sparse_features}"
        )
    if sparse.stride() != dense.shape[0]:
        raise ValueError(
            f"sparse_features has stride {sparse.stride()} but the batch has {dense.shape[0]} rows"
        )
    ids_per_feature = sparse.values().split(sparse.length_per_key())
    for feature, rows, ids in zip(
        schema.sparse_features, schema.num_embeddings, ids_per_feature, strict=True
    ):
        if ids.numel() == 0:
            continue
        low, high = ids.min(), ids.max()
        if low < 0 or high >= rows:
            offending = int(low) if low < 0 else int(high)
            raise ValueError(
                f"feature {feature!r} (table 't_{feature}'): id {offending} is outside the "
                f"valid range [0, {rows})"
            )
