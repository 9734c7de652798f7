"""The MEC / PQ method's steps, taken alike by the local and the sharded driver.

:class:`PQHandler` decides which tables are kept, fits a table's quantizer on rows (the whole
table, or a sample drawn across processes), encodes any rows with it, and writes the table's
report row.  The drivers only move data: the local one hands it a whole table, the sharded one
a gathered sample to fit and the rows each process holds to encode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_compress.methods.pq.config import MECConfig, PQConfig
from torchrec_compress.methods.pq.fitting import fit_quantizer
from torchrec_compress.methods.pq.quantizer import ProductQuantizer, code_dtype
from torchrec_compress.methods.pq.sizing import code_bytes, pq_keep_reason, pq_table_bytes
from torchrec_compress.methods.pq.training import MECQuantizer, subspace_order
from torchrec_compress.report import BYTES_PER_ELEMENT, ReportRow

Quantizer = ProductQuantizer | MECQuantizer


@dataclass(frozen=True)
class PQHandler:
    """MEC / plain PQ of embedding tables: keep rule, fit, encode, report row.

    Registered for :class:`MECConfig` and :class:`PQConfig` (``registry.handler_for``; a
    ``PQConfig`` is held as its ``MECConfig(mode="pq")``).

    Args:
        config (MECConfig): the method's config.

    Example::

        >>> from torchrec_compress.methods.pq.metrics import code_usage
        >>> t = EmbeddingBagConfig(num_embeddings=64, embedding_dim=8, name="t", feature_names=["f"])
        >>> handler = PQHandler.of(PQConfig(num_subspaces=2, num_centroids=4))
        >>> rows = torch.randn(64, 8)
        >>> quantizer = handler.fit(rows, None, "t")
        >>> codes = handler.encode(quantizer, rows, "t")
        >>> row = handler.table_row(t, handler.codebooks(quantizer), code_usage(codes, 4))
        >>> codes.shape, codes.dtype, row.method, row.bytes_after
        (torch.Size([64, 2]), torch.uint8, 'PQ', 256)
    """

    config: MECConfig

    @classmethod
    def of(cls, config: MECConfig | PQConfig) -> PQHandler:
        """The handler of an ``MECConfig`` or a ``PQConfig``."""
        return cls(config.to_mec_config() if isinstance(config, PQConfig) else config)

    @property
    def method(self) -> str:
        """``"MEC"`` or ``"PQ"`` (the report's method column)."""
        return "MEC" if self.config.mode == "mec" else "PQ"

    def keep_reason(self, table: EmbeddingBagConfig) -> str | None:
        """Why ``table`` stays unquantized, or ``None`` (see ``pq.sizing.pq_keep_reason``)."""
        return pq_keep_reason(table, self.config)

    def subspace_order(
        self, rows: Tensor, counts: Tensor | None, table_name: str, row_scale: Tensor | None = None
    ) -> Tensor:
        """Column order that spreads a factor table's principal components over the subspaces."""
        return subspace_order(
            rows, counts, self.config.for_table(table_name), table_name, row_scale
        )

    def fit(
        self, rows: Tensor, counts: Tensor | None, table_name: str, row_scale: Tensor | None = None
    ) -> Quantizer:
        """The table's quantizer, fitted on ``rows`` (all of them, or a sample whose rows each
        stand for ``row_scale`` table rows) weighted by their lookup ``counts``."""
        return fit_quantizer(rows, counts, self.config.for_table(table_name), table_name, row_scale)

    def encode(self, quantizer: Quantizer, rows: Tensor, table_name: str) -> Tensor:
        """Codes of ``rows`` (``[n, M]``, the smallest integer type that holds ``K``)."""
        chunk = self.config.for_table(table_name).training.chunk_size
        with torch.no_grad():
            codes = quantizer.compute_codes(rows.detach().float(), chunk)
        return codes.to(code_dtype(self.codebooks(quantizer).shape[1]))

    @staticmethod
    def codebooks(quantizer: Quantizer) -> Tensor:
        """``[M, K, d / M]`` float32 codewords in the table's own space (what is served)."""
        with torch.no_grad():
            if isinstance(quantizer, MECQuantizer):
                return quantizer.decoded_codebooks().float()
            return quantizer.codebooks.float()

    def table_row(
        self,
        table: EmbeddingBagConfig,
        codebooks: Tensor,
        usage: Tensor,
        bytes_per_element: int = BYTES_PER_ELEMENT,
    ) -> ReportRow:
        """The report row of a quantized table; ``usage``
        (:func:`~torchrec_compress.methods.pq.metrics.code_usage`, summed over the processes) gives its
        codebook perplexity, ``bytes_per_element`` its rows' size."""
        num_subspaces, ksub, dsub = codebooks.shape
        n, d = table.num_embeddings, table.embedding_dim
        code_size = torch.empty((), dtype=code_dtype(ksub)).element_size()
        return ReportRow(
            name=table.name,
            kind="table",
            shape=(n, d),
            method=self.method,
            rank=num_subspaces,
            bytes_before=n * d * bytes_per_element,
            bytes_after=pq_table_bytes(n, num_subspaces, ksub, dsub, code_size),
            explained_variance=None,
            perplexity=usage_perplexity(usage),
        )

    @staticmethod
    def kept_row(
        table: EmbeddingBagConfig,
        reason: str | None,
        stored_exactly: bool = False,
        bytes_per_element: int = BYTES_PER_ELEMENT,
        holds_codes: bool = True,
    ) -> ReportRow:
        """The report row of a table left unquantized for ``reason``; ``stored_exactly``: kept
        inside a quantized collection as identity codes over its own rows.  An unsharded
        ``PQEmbeddingBagCollection`` derives those codes (``holds_codes=False``: the rows' bytes
        alone); a collection that holds them (the sharded one) costs one code per row more.

        Example::

            >>> t = EmbeddingBagConfig(num_embeddings=5, embedding_dim=4, name="t", feature_names=["f"])
            >>> PQHandler.kept_row(t, "too small", stored_exactly=True).note
            'too small; stored exactly as identity codes (+5 bytes)'
            >>> row = PQHandler.kept_row(t, "too small", stored_exactly=True, holds_codes=False)
            >>> row.note, row.bytes_after == row.bytes_before
            ('too small; stored exactly as identity codes (no bytes added: they are its row ids)', True)
        """
        n, d = table.num_embeddings, table.embedding_dim
        before = n * d * bytes_per_element
        extra = n * code_bytes(n, table.name) if stored_exactly and holds_codes else 0
        note = reason
        if stored_exactly:
            added = f"+{extra} bytes" if holds_codes else "no bytes added: they are its row ids"
            note = f"{reason}; stored exactly as identity codes ({added})"
        return ReportRow(
            table.name, "table", (n, d), "kept", None, before, before + extra, None, note=note
        )


def usage_perplexity(usage: Tensor) -> float:
    """Mean over subspaces of ``exp(entropy)`` of codeword usage, every row counted once.

    Example::

        >>> usage_perplexity(torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
        1.5
    """
    usage = usage.double()
    p = usage / usage.sum(1, keepdim=True).clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-300))).sum(1)
    return float(entropy.exp().mean())
