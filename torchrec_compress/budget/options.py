"""The options a table may take under a byte budget, each sized exactly as the compression
report counts it, with the methods' own sizing functions.

Example::

    >>> from torchrec import EmbeddingBagConfig
    >>> from torchrec_compress.budget.config import BudgetConfig
    >>> t = EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=1000, feature_names=["f"])
    >>> options = table_options(t, 4, torch.device("cpu"), BudgetConfig(memory_budget_bytes=1))
    >>> [(o.label, o.bytes) for o in options][:4]
    [('fp32', 64000), ('fp16', 32000), ('int8', 20000), ('int4', 12000)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_compress.budget.config import BudgetConfig
from torchrec_compress.methods.lowrank.rank import compressed_table_bytes
from torchrec_compress.methods.pq.sizing import code_bytes, pq_table_bytes
from torchrec_compress.methods.rowwise_quant.quantize import (
    BITS_TO_DATA_TYPE,
    quantized_row_bytes,
)
from torchrec_compress.report import BYTES_PER_ELEMENT

#: bits of the row-wise quantized options (of the rows, or of AFM's factor rows)
OPTION_BITS: dict[str, int] = {"fp16": 16, "int8": 8, "int4": 4, "afm+int8": 8, "afm+int4": 4}
#: which collection an option needs: "pq" and "rowwise" do not mix in one collection; AFM
#: factor tables stored packed (ranks not multiples of 4) cannot be quantized further, so they
#: need a collection of float tables alone ("float"; see :attr:`Option.family`)
FAMILIES: dict[str, str] = {
    "fp32": "any",
    "afm": "any",
    "pq": "pq",
    "afm+pq": "pq",
    "identity": "pq",
    **{kind: "rowwise" for kind in OPTION_BITS},
}


@dataclass(frozen=True)
class Option:
    """One way to store a table: what it is, and the bytes the report will count for it.

    Args:
        kind (str): ``"fp32"`` (kept) or one of :data:`~torchrec_compress.budget.config.OPTION_KINDS`.
        bytes (int): the table's bytes after compression.
        rank (Optional[int]): AFM's rank, for the kinds starting with ``"afm"``.
        subspaces (Optional[int]): PQ's ``M``, for ``"pq"`` and ``"afm+pq"``.

    Example::

        >>> Option("afm+pq", 1234, rank=8, subspaces=2).label
        'afm k=8 + pq M=2'

    ``"identity"`` (sharded models only): a small table kept exactly inside a
    product-quantized collection, as identity codes over its rows; ``subspaces`` is an ``M``
    at which quantizing would not shrink it (the quantizer then keeps it), ``bytes`` count
    its rows and codes.
    """

    kind: str
    bytes: int
    rank: int | None = None
    subspaces: int | None = None

    @property
    def family(self) -> str:
        """``"any"``, ``"pq"``, ``"rowwise"`` or ``"float"``: the collection it needs.

        Example::

            >>> Option("afm", 1, rank=8).family, Option("afm", 1, rank=2).family
            ('any', 'float')
        """
        if self.kind == "afm" and self.rank is not None and self.rank % 4:
            return "float"
        return FAMILIES[self.kind]

    @property
    def bits(self) -> int | None:
        """Row-wise bits of the rows (or factor rows), ``None`` when not row-wise quantized."""
        return OPTION_BITS.get(self.kind)

    @property
    def label(self) -> str:
        """E.g. ``"int8"``, ``"afm k=8"``, ``"pq M=4"``, ``"afm k=16 + int8"``."""
        if self.kind == "identity":
            return "fp32 as identity codes"
        parts = []
        if self.rank is not None:
            parts.append(f"afm k={self.rank}")
        if self.subspaces is not None:
            parts.append(f"pq M={self.subspaces}")
        if self.bits is not None:
            parts.append(self.kind.rpartition("+")[2])
        return " + ".join(parts) or self.kind


def rowwise_bytes(rows: int, dim: int, bits: int, device: torch.device) -> int | None:
    """Bytes of ``rows`` rows of width ``dim`` stored row-wise in ``bits`` bits, as the
    row-wise method's report counts them; ``None`` when fbgemm cannot pack that width."""
    if bits < 16 and dim % (16 // bits):
        return None
    if bits == 16:
        return rows * dim * 2
    return rows * quantized_row_bytes(dim, BITS_TO_DATA_TYPE[bits], device)


def _pq_bytes(rows: int, width: int, m: int, config: BudgetConfig, name: str) -> int | None:
    if width % m:
        return None
    ksub = min(config.num_centroids, rows)
    return pq_table_bytes(rows, m, ksub, width // m, code_bytes(ksub, name))


def _afm_options(
    table: EmbeddingBagConfig, device: torch.device, config: BudgetConfig
) -> list[Option]:
    n, d = table.num_embeddings, table.embedding_dim
    wanted = set(config.methods)
    options: list[Option] = []
    for k in sorted(k for k in set(config.ranks) if k < d):
        lowrank = compressed_table_bytes(n, d, k)
        if "afm" in wanted:
            options.append(Option("afm", lowrank, rank=k))
        if k % 4:
            continue  # packed factor tables cannot be quantized further
        around = lowrank - BYTES_PER_ELEMENT * n * k  # projection and mean
        for kind in ("afm+int8", "afm+int4"):
            quantized = rowwise_bytes(n, k, OPTION_BITS[kind], device)
            if kind in wanted and quantized is not None:
                options.append(Option(kind, around + quantized, rank=k))
        if "afm+pq" in wanted:
            for m in sorted(set(config.subspaces)):
                pq = _pq_bytes(n, k, m, config, table.name)
                if pq is not None:
                    options.append(Option("afm+pq", around + pq, rank=k, subspaces=m))
    return options


def table_options(
    table: EmbeddingBagConfig,
    element_size: int,
    device: torch.device,
    config: BudgetConfig,
) -> list[Option]:
    """Every option of ``config.methods`` for ``table`` that is smaller than the table, after
    ``"fp32"`` (kept), in a fixed order.

    Args:
        table (EmbeddingBagConfig): the table.
        element_size (int): bytes of one of its weights now (4 for float32).
        device (torch.device): where its weights are (decides fbgemm's row alignment).
        config (BudgetConfig): the option kinds and sizes.
    """
    n, d = table.num_embeddings, table.embedding_dim
    kept = n * d * element_size
    options = [Option("fp32", kept)]
    for kind in ("fp16", "int8", "int4"):
        size = rowwise_bytes(n, d, OPTION_BITS[kind], device)
        if kind in config.methods and size is not None:
            options.append(Option(kind, size))
    if "pq" in config.methods:
        for m in sorted(set(config.subspaces)):
            size = _pq_bytes(n, d, m, config, table.name)
            if size is not None:
                options.append(Option("pq", size, subspaces=m))
    options += _afm_options(table, device, config)
    return [options[0], *(o for o in options[1:] if o.bytes < kept)]


def identity_option(table: EmbeddingBagConfig, config: BudgetConfig) -> Option | None:
    """The ``"identity"`` option of a small table (see :class:`Option`), or ``None`` when
    quantizing would shrink it at every ``M`` of ``config.subspaces`` that divides its width.

    Example::

        >>> small = EmbeddingBagConfig(name="s", embedding_dim=8, num_embeddings=4, feature_names=["f"])
        >>> identity_option(small, BudgetConfig(memory_budget_bytes=1, subspaces=(2, 4)))
        Option(kind='identity', bytes=132, rank=None, subspaces=2)
    """
    m = pq_keep_subspaces(table, config)
    if m is None:
        return None
    n, d = table.num_embeddings, table.embedding_dim
    return Option(
        "identity", n * d * BYTES_PER_ELEMENT + n * code_bytes(n, table.name), subspaces=m
    )


def pq_keep_subspaces(table: EmbeddingBagConfig, config: BudgetConfig) -> int | None:
    """An ``M`` of ``config.subspaces`` at which product quantization would not make ``table``
    smaller, so that the quantizer keeps it (as identity codes) without an override's skip;
    ``None`` when none does (every dividing ``M`` shrinks it, or none divides its dimension).

    Example::

        >>> small = EmbeddingBagConfig(name="s", embedding_dim=8, num_embeddings=4, feature_names=["f"])
        >>> large = EmbeddingBagConfig(name="l", embedding_dim=8, num_embeddings=4000, feature_names=["g"])
        >>> config = BudgetConfig(memory_budget_bytes=1, subspaces=(2, 4))
        >>> pq_keep_subspaces(small, config), pq_keep_subspaces(large, config)
        (2, None)
    """
    n, d = table.num_embeddings, table.embedding_dim
    for m in sorted(set(config.subspaces)):
        size = _pq_bytes(n, d, m, config, table.name)
        if size is not None and size >= n * d * BYTES_PER_ELEMENT:
            return m
    return None
