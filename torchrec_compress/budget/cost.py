"""What each option costs in output error, estimated cheaply from the calibration data.

The error of an option is its squared output error summed over the table's lookups in the
calibration data, ``sum_i n_i ||e_i - e'_i||^2`` (``n_i``: row ``i``'s lookups):

* AFM at rank ``k``: exact, from the eigenvalues of the lookup-weighted covariance AFM itself
  computes (``n * sum_{j > k} lambda_j``);
* fp16 / int8 / int4 rows: the rows of a lookup-weighted sample quantized as fbgemm does
  (min / max of the row, fp16 scale and bias);
* PQ: k-means fitted with few iterations on a sample drawn as the method draws it, its error
  measured on the lookup-weighted sample;
* AFM then int8 / int4 / PQ: AFM's error plus the quantization error of the factor rows.  The
  projection has orthonormal rows, so an error of the factors is the same error of the output,
  and it lies in the kept directions while AFM's residual lies in the others: the two add up.

Example::

    >>> from torchrec import EmbeddingBagConfig
    >>> from torchrec_compress.budget.config import BudgetConfig
    >>> from torchrec_compress.budget.options import Option
    >>> t = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=300, feature_names=["f"])
    >>> weight = torch.randn(300, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor(
    ...     [4.0, 2.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1])
    >>> options = [Option("fp32", 9600), Option("int8", 3600), Option("afm", 4836, rank=2)]
    >>> table = estimate_errors(t, weight, torch.ones(300), options, BudgetConfig(memory_budget_bytes=1))
    >>> [round(table.relative(o), 2) for o in options]
    [0.0, 0.0, 0.03]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_compress.budget.config import BudgetConfig
from torchrec_compress.budget.options import Option
from torchrec_compress.methods.lowrank.factors import PrincipalBasis, afm_basis, table_moments
from torchrec_compress.methods.pq.config import KMeansTraining, PQConfig
from torchrec_compress.methods.pq.handler import PQHandler
from torchrec_compress.methods.pq.quantizer import decode
from torchrec_compress.methods.pq.training import stratified_rows, subspace_order


@dataclass
class TableErrors:
    """The estimated error of every option of one table.

    Args:
        name (str): the table.
        lookups (float): its lookups in the calibration data (total weight).
        variance (float): its lookup-weighted output variance per lookup (trace of the
            covariance AFM diagonalises).
        errors (dict[Option, float]): option -> squared output error summed over lookups.
    """

    name: str
    lookups: float
    variance: float
    errors: dict[Option, float] = field(default_factory=dict)

    def relative(self, option: Option) -> float:
        """``option``'s error as a fraction of the table's output variance (0: lossless)."""
        return self.errors[option] / max(self.lookups * self.variance, 1e-300)


def rowwise_roundtrip(rows: Tensor, bits: int) -> Tensor:
    """``rows`` stored in ``bits`` bits and read back as fbgemm's row-wise quantization does:
    per row an fp16 bias (the minimum) and scale (range / (2^bits - 1)); 16: fp16.

    Example::

        >>> rowwise_roundtrip(torch.tensor([[0.0, 1.0, 0.5]]), 8).tolist()
        [[0.0, 0.9999847412109375, 0.501953125]]
    """
    if bits == 16:
        return rows.half().float()
    low = rows.min(dim=1, keepdim=True).values
    high = rows.max(dim=1, keepdim=True).values
    scale = ((high - low) / (2**bits - 1)).half().float()
    bias = low.half().float()
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    levels = torch.round((rows - bias) * inverse).clamp(0, 2**bits - 1)
    return levels * scale + bias


def lookup_sample(counts: Tensor, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Rows and weights whose weighted sums estimate sums over lookups (``sum_i n_i f(i)``):
    the ``size / 2`` most looked-up rows with their counts, then draws in proportion to the
    counts of the others, each standing for an equal share of their lookups.

    Example::

        >>> ids, w = lookup_sample(torch.tensor([5.0, 0.0, 1.0]), 8, torch.Generator())
        >>> ids.tolist(), w.tolist()
        ([0, 2], [5.0, 1.0])
    """
    counted = counts.nonzero().squeeze(1)
    if counted.numel() <= size:
        return counted, counts[counted].double()
    order = torch.argsort(counts[counted], descending=True, stable=True)
    top, rest = counted[order[: size // 2]], counted[order[size // 2 :]]
    cdf = counts[rest].double().cumsum(0)
    draws = size - top.numel()
    at = torch.searchsorted(
        cdf, torch.rand(draws, generator=generator, dtype=torch.float64) * cdf[-1]
    )
    drawn = rest[at.clamp(max=rest.numel() - 1)]
    weights = torch.cat([counts[top].double(), torch.full((draws,), float(cdf[-1]) / draws)])
    return torch.cat([top, drawn]), weights


@dataclass
class _Samples:
    """One table's rows for the estimates: a lookup-weighted sample to measure errors on, and a
    sample drawn as product quantization draws its training rows."""

    rows: Tensor
    weights: Tensor
    fit_rows: Tensor
    fit_counts: Tensor
    fit_scale: Tensor


def _samples(weight: Tensor, counts: Tensor, size: int, generator: torch.Generator) -> _Samples:
    ids, weights = lookup_sample(counts, size, generator)
    counted = counts.nonzero().squeeze(1)
    fit_ids, scale = stratified_rows(weight.shape[0], counted, counts[counted], size, generator)
    rows = weight.detach()
    return _Samples(
        rows[ids].float().cpu(),
        weights,
        rows[fit_ids].float().cpu(),
        counts[fit_ids].float().cpu(),
        scale,
    )


def _error(rows: Tensor, approx: Tensor, weights: Tensor) -> float:
    return float(((approx.double() - rows.double()) ** 2).sum(1) @ weights)


class _Estimator:
    """Errors of the options of one table (see the module notes)."""

    def __init__(
        self,
        name: str,
        basis: PrincipalBasis,
        lookups: float,
        samples: _Samples,
        config: BudgetConfig,
    ) -> None:
        self.name, self.basis, self.lookups = name, basis, lookups
        self.samples, self.config = samples, config
        self._factors: dict[int, tuple[Tensor, Tensor]] = {}

    def afm_tail(self, rank: int) -> float:
        return self.lookups * float(self.basis.eigenvalues[rank:].sum())

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """AFM's factor rows of both samples at ``rank``."""
        if rank not in self._factors:
            u = self.basis.eigenvectors[:, :rank]
            mean = self.basis.mean
            self._factors[rank] = tuple(  # type: ignore[assignment]
                ((rows.double() - mean) @ u).float()
                for rows in (self.samples.rows, self.samples.fit_rows)
            )
        return self._factors[rank]

    def pq(self, rows: Tensor, fit_rows: Tensor, m: int, reorder: bool) -> float:
        c, s = self.config, self.samples
        training = KMeansTraining(
            kmeans_iterations=c.estimate_iterations, kmeans_sample_size=c.sample_size, seed=c.seed
        )
        pq_config = PQConfig(m, c.num_centroids, weighting=c.weighting, training=training)
        handler = PQHandler.of(pq_config)
        if reorder:  # as the method orders AFM's factor columns
            order = subspace_order(fit_rows, s.fit_counts, handler.config, self.name, s.fit_scale)
            rows, fit_rows = rows[:, order], fit_rows[:, order]
        quantizer = handler.fit(fit_rows, s.fit_counts, self.name, s.fit_scale)
        codes = handler.encode(quantizer, rows, self.name)
        return _error(rows, decode(codes, handler.codebooks(quantizer)), s.weights)

    def error(self, option: Option) -> float:
        s = self.samples
        if option.kind == "fp32":
            return 0.0
        if option.rank is None:
            if option.subspaces is not None:
                return self.pq(s.rows, s.fit_rows, option.subspaces, reorder=False)
            assert option.bits is not None
            return _error(s.rows, rowwise_roundtrip(s.rows, option.bits), s.weights)
        tail = self.afm_tail(option.rank)
        if option.kind == "afm":
            return tail
        factors, fit_factors = self.factors(option.rank)
        if option.subspaces is not None:
            return tail + self.pq(factors, fit_factors, option.subspaces, reorder=True)
        assert option.bits is not None
        return tail + _error(factors, rowwise_roundtrip(factors, option.bits), s.weights)


def estimate_errors(
    table: EmbeddingBagConfig,
    weight: Tensor,
    counts: Tensor,
    options: Sequence[Option],
    config: BudgetConfig,
) -> TableErrors:
    """The estimated error of each of ``options`` for ``table`` (see the module notes).

    A table the calibration data never looks up is weighed uniformly over its rows, as AFM
    does (with AFM's warning).

    Args:
        table (EmbeddingBagConfig): the table.
        weight (Tensor): its ``(N, d)`` rows.
        counts (Tensor): ``(N,)`` lookup counts on the calibration data.
        options (Sequence[Option]): from :func:`~torchrec_compress.budget.options.table_options`.
        config (BudgetConfig): sample size, PQ settings, seed.
    """
    name = table.name
    moments = table_moments(weight, counts, name)
    if counts.sum() <= 0:
        counts = torch.ones(weight.shape[0], dtype=torch.float64)
    basis = afm_basis(moments, f"table {name!r}")
    generator = torch.Generator().manual_seed(config.seed)
    samples = _samples(weight, counts.double().cpu(), config.sample_size, generator)
    lookups = float(moments.count)
    estimator = _Estimator(name, basis, lookups, samples, config)
    result = TableErrors(name, lookups, float(basis.eigenvalues.sum()))
    for option in options:
        result.errors[option] = max(estimator.error(option), 0.0)
    return result
