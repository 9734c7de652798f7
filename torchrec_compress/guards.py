"""Fail-loud checks on what enters compression and lookups: non-finite table rows, ids outside
their tables.

A NaN row that calibration never looks up would pass AFM's statistics untouched and land in the
factor table; an id outside its table is zeroed by fbgemm's default bounds check (a warning in
the log, and training goes on).  Both are refused here, naming the table (and feature) and the
first offending row or id.  Every check is vectorised and chunked; nothing loops over rows or ids
in Python.  The sharded counterparts (collective) live in :mod:`torchrec_compress.distributed`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

DEFAULT_CHUNK_ROWS = 65536


def first_nonfinite_row(weight: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> int | None:
    """Index of the first row of ``weight`` holding a NaN or an infinity, or ``None``.

    Args:
        weight (torch.Tensor): ``(rows, d)`` table rows (any float dtype).
        chunk_rows (int): rows tested at a time (bounds the temporary boolean mask).

    Returns:
        Optional[int]: the first bad row, ``None`` when every value is finite (or ``weight``
        is on ``meta``).

    Example::

        >>> first_nonfinite_row(torch.tensor([[0.0, 1.0], [2.0, float("inf")], [float("nan"), 0.0]]))
        1
        >>> first_nonfinite_row(torch.zeros(3, 2)) is None
        True
    """
    if weight.is_meta:  # a skeleton (planning): no values to test
        return None
    for start in range(0, weight.shape[0], chunk_rows):
        chunk = weight[start : start + chunk_rows].detach()
        # a finite float32 sum means no NaN and no infinity in the chunk: one pass, no mask;
        # a sum that is not finite (a bad value, or finite values that overflow) is looked at
        if bool(torch.isfinite(chunk.sum(dtype=torch.float32))):
            continue
        finite = torch.isfinite(chunk).all(dim=1)
        if not bool(finite.all()):
            return start + int((~finite).nonzero()[0, 0])
    return None


def nonfinite_row_error(table_name: str, row: int) -> ValueError:
    """The error every compression method raises for a table with a non-finite row.

    Args:
        table_name (str): the table.
        row (int): its first row holding a NaN or an infinity (global index).

    Example::

        >>> str(nonfinite_row_error("t", 7)).split(";")[0]
        "table 't': row 7 has NaN/inf values"
    """
    return ValueError(
        f"table {table_name!r}: row {row} has NaN/inf values; compression refuses non-finite "
        "rows whether or not calibration looks them up (clean or re-initialise the table first)"
    )


def check_finite_tables(collections: Iterable[EmbeddingBagCollection]) -> None:
    """Raises naming the table and its first non-finite row, for every table of
    ``collections`` (unsharded: ``compress_`` passes every collection it may compress, the
    factor tables of low-rank collections included).

    Args:
        collections (Iterable[EmbeddingBagCollection]): the collections to test.

    Raises:
        ValueError: naming the table and the first row holding a NaN or an infinity.

    Example::

        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=3, feature_names=["f"])
        >>> ebc = EmbeddingBagCollection([cfg])
        >>> with torch.no_grad():
        ...     ebc.embedding_bags["t"].weight[2, 1] = float("nan")
        >>> check_finite_tables([ebc])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: table 't': row 2 has NaN/inf values; compression refuses non-finite rows ...
    """
    for ebc in collections:
        for table in ebc.embedding_bag_configs():
            row = first_nonfinite_row(ebc.embedding_bags[table.name].weight)
            if row is not None:
                raise nonfinite_row_error(table.name, row)


class FeatureIdRanges:
    """The valid id range ``[0, num_embeddings)`` of every feature of a set of tables, and the
    check that a ``KeyedJaggedTensor`` keeps to it (one vectorised pass over its ids).

    fbgemm's default bounds check (``BoundsCheckMode.WARNING``) replaces an id outside its table
    by 0, logs one line and goes on, so a sharded model trains on wrong rows; this check raises
    instead, naming the table, the feature and the id.  Features no table reads are ignored.

    Args:
        tables (Sequence[EmbeddingBagConfig]): the tables whose features are checked.

    Example::

        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=3, feature_names=["f"])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f"], values=torch.tensor([0, 2, 3]), lengths=torch.tensor([2, 1]))
        >>> FeatureIdRanges([cfg]).check(kjt)
        Traceback (most recent call last):
        ...
        IndexError: table 't', feature 'f': id 3 is outside the table's rows [0, 3)
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig]) -> None:
        # a feature read by several tables must fit the smallest of them
        self._owner: dict[str, EmbeddingBagConfig] = {}
        for table in sorted(tables, key=lambda t: -t.num_embeddings):
            self._owner.update(dict.fromkeys(table.feature_names, table))
        self._limits: dict[tuple[str, ...], torch.Tensor] = {}

    def _limits_of(self, keys: tuple[str, ...]) -> torch.Tensor:
        limits = self._limits.get(keys)
        if limits is None:
            unbounded = torch.iinfo(torch.int64).max
            limits = torch.tensor(
                [self._owner[k].num_embeddings if k in self._owner else unbounded for k in keys]
            )
            self._limits[keys] = limits
        return limits

    def check(self, features: KeyedJaggedTensor) -> None:
        """Raises ``IndexError`` naming the table, feature and id of the first id outside its
        table's rows (negative ids included).

        Args:
            features (KeyedJaggedTensor): ids of any subset of the tables' features.
        """
        ids = features.values()
        keys = tuple(features.keys())
        if ids.numel() == 0 or not keys:
            return
        if features.variable_stride_per_key():
            per_key = torch.tensor(features.length_per_key(), device=ids.device)
        else:
            per_key = features.lengths().view(len(keys), -1).sum(1)
        limits = self._limits_of(keys).to(ids.device)
        limit = torch.repeat_interleave(limits, per_key, output_size=ids.numel())
        bad = (ids < 0) | (ids >= limit)
        if not bool(bad.any()):
            return
        position = int(bad.nonzero()[0, 0])
        key = int(torch.searchsorted(per_key.cumsum(0), position, right=True))
        table = self._owner[keys[key]]
        raise IndexError(
            f"table {table.name!r}, feature {keys[key]!r}: id {int(ids[position])} is outside "
            f"the table's rows [0, {table.num_embeddings})"
        )


def is_tracing() -> bool:
    """Whether the caller runs under ``torch.fx``, TorchScript, ``torch.compile`` or ``torch.export``.

    Traced code must not branch on tensor data nor read ``data_ptr()``/``_version``; eager-only
    checks and caches are skipped there.

    Example::

        >>> is_tracing()
        False
    """
    return (
        torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or is_fx_symbolic_tracing()
    )


def check_fixed_batch(features: KeyedJaggedTensor, module: str) -> None:
    """Raises ``ValueError`` for a variable-batch-per-feature (VBE) input, which low-rank pooling
    does not support.  Eager only: a traced graph has no data-dependent branches.

    Args:
        features (KeyedJaggedTensor): the input of the collection.
        module (str): the module's name for the message.

    Example::

        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f"], values=torch.tensor([1]), lengths=torch.tensor([1]))
        >>> check_fixed_batch(kjt, "LowRankEmbeddingBagCollection")
    """
    if features.variable_stride_per_key() or features.inverse_indices_or_none() is not None:
        raise ValueError(
            f"{module} does not support variable batch size per feature (VBE): features "
            f"{features.keys()} have strides {features.stride_per_key()}"
        )
