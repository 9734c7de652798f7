"""The AFM / SVD method's steps, taken alike by the local and the sharded driver.

:class:`LowRankHandler` turns each table's moments into a basis and a rank and writes its
report row; :func:`linear_factors` factors one ``nn.Linear`` layer (AFM from output moments,
SVD from the weight).  The drivers only move data: the local one computes moments from the
whole table, the sharded one all-reduces them from the rows each process holds.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_compress.methods.lowrank.config import AFMConfig, LowRankConfig
from torchrec_compress.methods.lowrank.factors import (
    PrincipalBasis,
    afm_basis,
    afm_linear,
    svd_basis,
    svd_linear,
)
from torchrec_compress.methods.lowrank.linear import LowRankLinear
from torchrec_compress.methods.lowrank.rank import (
    BYTES_PER_ELEMENT,
    RankChoice,
    TableSpectrum,
    choose_ranks,
    compressed_table_bytes,
    explained_variance_ratio,
    rank_for_variance,
)
from torchrec_compress.moments import Moments
from torchrec_compress.report import ReportRow


@dataclass(frozen=True)
class LowRankHandler:
    """AFM / SVD of embedding tables: bases, ranks and report rows from each table's moments.

    Registered for :class:`AFMConfig` and :class:`SVDConfig` (``registry.handler_for``); the
    local and the sharded driver both call it, so both choose the same ranks and report the
    same bytes for the same moments.

    Args:
        config (LowRankConfig): the method's config.

    Example::

        >>> from torchrec_compress.methods.lowrank.config import SVDConfig
        >>> from torchrec_compress.methods.lowrank.factors import table_moments
        >>> t = EmbeddingBagConfig(num_embeddings=32, embedding_dim=8, name="t", feature_names=["f"])
        >>> handler = LowRankHandler(SVDConfig(rank=4))
        >>> bases, choices = handler.fit([t], {"t": table_moments(torch.randn(32, 8), None, "t")})
        >>> choices["t"].rank, handler.table_row(t, bases["t"], choices["t"]).method
        (4, 'SVD')
    """

    config: LowRankConfig

    @property
    def method(self) -> str:
        """``"AFM"`` or ``"SVD"`` (the report's method column)."""
        return "AFM" if isinstance(self.config, AFMConfig) else "SVD"

    @property
    def needs_lookup_counts(self) -> bool:
        """AFM weighs rows by their calibration lookups; SVD factors the weights alone."""
        return isinstance(self.config, AFMConfig)

    def fit(
        self, tables: Sequence[EmbeddingBagConfig], moments: Mapping[str, Moments]
    ) -> tuple[dict[str, PrincipalBasis], dict[str, RankChoice]]:
        """Every table's principal basis and rank choice (``RankChoice.rank`` ``None``: kept)."""
        basis_of = afm_basis if self.needs_lookup_counts else svd_basis
        bases = {t.name: basis_of(moments[t.name], f"table {t.name!r}") for t in tables}
        spectra = {
            t.name: TableSpectrum(
                t.num_embeddings,
                t.embedding_dim,
                bases[t.name].eigenvalues,
                float(moments[t.name].count),
            )
            for t in tables
        }
        return bases, (choose_ranks(spectra, self.config) if spectra else {})

    def table_row(
        self,
        table: EmbeddingBagConfig,
        basis: PrincipalBasis,
        choice: RankChoice,
        bytes_per_element: int = BYTES_PER_ELEMENT,
    ) -> ReportRow:
        """The report row of one table: compressed at ``choice.rank``, or kept."""
        k = choice.rank
        n, d = table.num_embeddings, table.embedding_dim
        before = n * d * bytes_per_element
        return ReportRow(
            name=table.name,
            kind="table",
            shape=(n, d),
            method="kept" if k is None else self.method,
            rank=k,
            bytes_before=before,
            bytes_after=before if k is None else compressed_table_bytes(n, d, k),
            explained_variance=None if k is None else basis.explained_variance(k),
            note=choice.note,
        )


def linear_factors(
    fqn: str,
    layer: nn.Linear,
    moments: Moments | None,
    config: LowRankConfig,
) -> tuple[ReportRow, LowRankLinear | None]:
    """Rank choice and factors of one Linear layer (AFM from its output ``moments``, SVD from
    its weight when ``moments`` is None); ``None`` (a "kept" row with a note, and a warning)
    when two factors would not be smaller, e.g. any rank of a 1-output logit layer.

    Args:
        fqn (str): the layer's fully qualified name (report row and messages).
        layer (nn.Linear): the layer.
        moments (Optional[Moments]): its output moments (AFM) or ``None`` (SVD).
        config (LowRankConfig): ``linear_rank`` or ``linear_variance``.

    Returns:
        tuple[ReportRow, Optional[LowRankLinear]]: the report row and the replacement.

    Example::

        >>> import warnings
        >>> from torchrec_compress.methods.lowrank.config import SVDConfig
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     config = SVDConfig(rank=4, linear=True, linear_rank=2)
        ...     row, new = linear_factors("logit", nn.Linear(8, 1), None, config)
        >>> row.method, new, row.note
        ('kept', None, "linear_rank 2 exceeds the layer's 1 principal directions")
    """
    name = f"layer {fqn!r}"
    basis = None
    if moments is not None:
        basis = afm_basis(moments, name)
        spectrum = basis.eigenvalues
    else:
        for what, value in (("weight", layer.weight), ("bias", layer.bias)):
            # AFM's output moments catch a NaN in the layer; SVD reads the parameters alone
            if value is not None and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name}: {what} contains NaN or Inf")
        spectrum = torch.linalg.svdvals(layer.weight.detach().to(torch.float64)) ** 2
    if config.linear_rank is not None:
        k = config.linear_rank
        source = f"linear_rank {k}"
    else:
        assert config.linear_variance is not None
        k = rank_for_variance(spectrum, config.linear_variance)
        source = f"linear_variance {config.linear_variance}: rank {k}"
    before = sum(p.numel() * p.element_size() for p in layer.parameters())
    shape = (layer.out_features, layer.in_features)
    has_bias = basis is not None or layer.bias is not None
    after = BYTES_PER_ELEMENT * (
        k * (layer.in_features + layer.out_features) + (k + layer.out_features) * has_bias
    )
    if k > spectrum.numel() or after >= before:
        reason = (
            f"exceeds the layer's {spectrum.numel()} principal directions"
            if k > spectrum.numel()
            else f"would not be smaller ({after} >= {before} bytes)"
        )
        note = f"{source} {reason}"
        warnings.warn(f"{type(config).__name__} keeps {name}: {note}", stacklevel=3)
        return ReportRow(fqn, "linear", shape, "kept", None, before, before, None, note=note), None
    new = afm_linear(layer, basis, k) if basis is not None else svd_linear(layer, k)[0]
    after = sum(p.numel() * p.element_size() for p in new.parameters())
    variance = float(explained_variance_ratio(spectrum)[k - 1])
    method = "AFM" if basis is not None else "SVD"
    return ReportRow(fqn, "linear", shape, method, k, before, after, variance), new
