"""Validation of batches against a :class:`~torchrec_compress.data.schema.CTRSchema`.

An id outside its table makes fbgemm read or write out of bounds (silently on CPU), so a batch
is checked once, cheaply, before it reaches a model: one min/max per feature, never a loop over
rows or ids.
"""

from __future__ import annotations

import torch
from torchrec.datasets.utils import Batch

from torchrec_compress.data.schema import CTRSchema


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
