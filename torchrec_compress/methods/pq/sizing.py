"""How many bytes product-quantized tables take, and which tables product quantization keeps.

Shared by the local (:func:`torchrec_compress.compress_`) and the sharded
(:mod:`torchrec_compress.methods.pq.sharded_driver`) drivers, so both keep the same tables for the same
reasons: never bigger, never silent.
"""

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_compress.methods.pq.config import MECConfig
from torchrec_compress.methods.pq.quantizer import code_dtype
from torchrec_compress.report import BYTES_PER_ELEMENT


def code_bytes(ksub: int, table_name: str) -> int:
    """Bytes of one code of a quantizer with ``ksub`` codewords (errors name the table)."""
    try:
        return torch.empty((), dtype=code_dtype(ksub)).element_size()
    except ValueError as e:
        raise ValueError(f"table {table_name!r}: {e}") from e


def pq_table_bytes(rows: int, num_subspaces: int, ksub: int, dsub: int, code_size: int) -> int:
    """Bytes of a product-quantized table: ``rows x M`` codes of ``code_size`` bytes each, plus
    ``M x K x dsub`` float32 codewords.

    Example::

        >>> pq_table_bytes(rows=1000, num_subspaces=8, ksub=256, dsub=8, code_size=1)
        73536
    """
    return rows * num_subspaces * code_size + num_subspaces * ksub * dsub * BYTES_PER_ELEMENT


def pq_keep_reason(table: EmbeddingBagConfig, config: MECConfig) -> str | None:
    """Why ``table`` stays unquantized, or ``None``: skipped by an override, a global ``M``
    that does not divide its dimension, or codes + codebooks not smaller than its rows.

    Raises:
        ValueError: naming the table when its own override's ``num_subspaces`` does not
            divide its dimension (an explicit per-table choice, unlike the global ``M``).
    """
    override = config.table_overrides.get(table.name)
    if override is not None and override.skip:
        return "skipped by table_overrides"
    table_config = config.for_table(table.name)
    n, d, m = table.num_embeddings, table.embedding_dim, table_config.num_subspaces
    if d % m:
        if override is not None and override.num_subspaces is not None:
            table_config.check_table(table.name, d)
        return f"num_subspaces {m} does not divide embedding_dim {d}"
    if n == 0:
        return None  # train_pq_table names the empty table
    ksub = min(table_config.num_centroids, n)
    after = pq_table_bytes(n, m, ksub, d // m, code_bytes(ksub, table.name))
    before = n * d * BYTES_PER_ELEMENT
    if after >= before:
        return (
            f"num_subspaces {m} x num_centroids {ksub} would not be smaller "
            f"({after} >= {before} bytes)"
        )
    return None
