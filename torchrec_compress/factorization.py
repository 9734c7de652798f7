"""Low-rank factors of one ``nn.Linear`` layer with its report row (AFM from output moments,
SVD from the weight): the step both the local and the sharded driver take per layer."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from torchrec_compress.config import LowRankConfig
from torchrec_compress.lowrank import afm_basis, afm_linear, svd_linear
from torchrec_compress.modules.lowrank_linear import LowRankLinear
from torchrec_compress.rank import BYTES_PER_ELEMENT, explained_variance_ratio, rank_for_variance
from torchrec_compress.report import ReportRow
from torchrec_compress.statistics import Moments


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
        >>> from torchrec_compress.config import SVDConfig
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
