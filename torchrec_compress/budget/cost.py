"""What each option costs in output error, estimated cheaply from the calibration data.

The error of an option is its squared output error summed over the table's lookups,
``sum_i n_i ||e_i - e'_i||^2`` (``n_i``: row ``i``'s lookups), measured on lookups the fit did
not see: the calibration batches are split in two, every fit (AFM's basis, k-means) uses the
lookups of one half and the error is measured on a sample of the other's (weighted to the
lookups of both), so that a fit is not judged on the lookups it was fitted to.

* AFM at rank ``k``: the held-out rows' residual outside the top ``k`` principal directions of
  the fitted lookup-weighted covariance;
* fp16 / int8 / int4 rows: the rows quantized as fbgemm does (min / max of the row, fp16 scale
  and bias);
* PQ: k-means fitted with few iterations on a sample drawn as the method draws it;
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
    >>> config = BudgetConfig(memory_budget_bytes=1)
    >>> table = estimate_errors(t, weight, torch.ones(300), torch.ones(300), options, config)
    >>> [round(table.relative(o), 2) for o in options]
    [0.0, 0.0, 0.03]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_compress.budget.config import BudgetConfig
from torchrec_compress.budget.options import Option
from torchrec_compress.methods.lowrank.factors import PrincipalBasis, afm_basis, table_moments
from torchrec_compress.methods.pq.config import KMeansTraining, PQConfig
from torchrec_compress.methods.pq.handler import PQHandler
from torchrec_compress.methods.pq.quantizer import decode
from torchrec_compress.methods.pq.training import counts_of, stratified_rows, subspace_order


@dataclass
class TableErrors:
    """The estimated error of every option of one table.

    Args:
        name (str): the table.
        lookups (float): its lookups in the calibration data (total weight).
        variance (float): its lookup-weighted output variance per lookup (trace of the
            covariance AFM diagonalises).
        errors (dict[Option, float]): option -> squared output error summed over lookups.
        reconstruct (Callable[[Option, Tensor], Tensor] | None): rows as an option stores
            them, with the estimates' own fits (the ``"loss_delta"`` objective uses it).
    """

    name: str
    lookups: float
    variance: float
    errors: dict[Option, float] = field(default_factory=dict)
    reconstruct: Callable[[Option, Tensor], Tensor] | None = None

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


def lookup_sample(
    ids: Tensor, counts: Tensor, size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Rows and weights whose weighted sums estimate sums over lookups (``sum_i n_i f(i)``),
    from sorted ``(ids, counts)`` pairs: the ``size / 2`` most looked-up rows with their counts,
    then draws in proportion to the counts of the others, each standing for an equal share of
    their lookups.

    Example::

        >>> ids, w = lookup_sample(torch.tensor([0, 1, 2]), torch.tensor([5.0, 0.0, 1.0]), 8,
        ...                        torch.Generator())
        >>> ids.tolist(), w.tolist()
        ([0, 2], [5.0, 1.0])
    """
    looked_up = counts > 0
    ids, counts = ids[looked_up], counts[looked_up]
    if ids.numel() <= size:
        return ids, counts.double()
    order = torch.argsort(counts, descending=True, stable=True)
    top, rest = order[: size // 2], order[size // 2 :]
    cdf = counts[rest].double().cumsum(0)
    draws = size - top.numel()
    at = torch.searchsorted(
        cdf, torch.rand(draws, generator=generator, dtype=torch.float64) * cdf[-1]
    )
    drawn = rest[at.clamp(max=rest.numel() - 1)]
    weights = torch.cat([counts[top].double(), torch.full((draws,), float(cdf[-1]) / draws)])
    return torch.cat([ids[top], ids[drawn]]), weights


#: sorted distinct row ids and their lookup counts (float64)
Pairs = tuple[Tensor, Tensor]
#: rows ``ids`` of a table (``(n, d)``, in the order of ``ids``); collective for a sharded table
RowFetch = Callable[[Tensor], Tensor]


def dense_pairs(counts: Tensor) -> Pairs:
    """The sorted ``(ids, counts)`` pairs of a dense ``(N,)`` count vector's looked-up rows."""
    counts = counts.double().cpu()
    ids = counts.nonzero().squeeze(1)
    return ids, counts[ids]


@dataclass
class TableSamples:
    """One table's rows for the estimates: held-out lookups to measure errors on (their rows,
    centred coordinates in the fitted principal basis, weights), and rows drawn as product
    quantization draws its training rows."""

    rows: Tensor
    coordinates: Tensor
    weights: Tensor
    fit_rows: Tensor
    fit_counts: Tensor
    fit_scale: Tensor


def table_samples(
    fetch: RowFetch,
    num_rows: int,
    fit: Pairs,
    held_out: Pairs,
    basis: PrincipalBasis,
    config: BudgetConfig,
) -> TableSamples:
    """One table's samples (see :class:`TableSamples`): held-out lookups drawn from ``held_out``,
    fitting rows drawn from ``fit`` as product quantization draws them; their rows read through
    ``fetch`` (collective for a sharded table: every process draws the same ids)."""
    generator = torch.Generator().manual_seed(config.seed)
    ids, weights = lookup_sample(*held_out, config.sample_size, generator)
    weights = weights * float(fit[1].sum() + held_out[1].sum()) / float(held_out[1].sum())
    fit_ids, scale = stratified_rows(num_rows, fit[0], fit[1], config.fit_sample_size, generator)
    held = fetch(ids).float().cpu()
    coordinates = (held.double() - basis.mean) @ basis.eigenvectors
    return TableSamples(
        held,
        coordinates,
        weights,
        fetch(fit_ids).float().cpu(),
        counts_of(fit, fit_ids).float(),
        scale,
    )


def _error(rows: Tensor, approx: Tensor, weights: Tensor) -> float:
    return float(((approx.double() - rows.double()) ** 2).sum(1) @ weights)


class _Estimator:
    """Errors of the options of one table (see the module notes)."""

    def __init__(
        self, name: str, basis: PrincipalBasis, samples: TableSamples, config: BudgetConfig
    ) -> None:
        self.name, self.basis, self.samples, self.config = name, basis, samples, config
        self.fits: dict[tuple[int, int, bool], tuple[PQHandler, Any, Tensor | None]] = {}

    def afm_tail(self, rank: int) -> float:
        """The held-out rows' squared residual outside the top ``rank`` directions."""
        return float(self.samples.coordinates[:, rank:].pow(2).sum(1) @ self.samples.weights)

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """AFM's factor rows of the held-out rows and of the fitting rows at ``rank``."""
        u = self.basis.eigenvectors[:, :rank]
        fit = ((self.samples.fit_rows.double() - self.basis.mean) @ u).float()
        return self.samples.coordinates[:, :rank].float(), fit

    def quantizer(self, fit_rows: Tensor, m: int, reorder: bool) -> tuple[Any, Tensor | None]:
        """The fitted PQ quantizer of ``M = m`` (cached per width of ``fit_rows``, the table's
        or AFM's rank, and ``m``: the loss objective reuses it) and the column order it was
        fitted in (``None``: the rows' own)."""
        key = (fit_rows.shape[1], m, reorder)
        if key not in self.fits:
            c, s = self.config, self.samples
            training = KMeansTraining(
                kmeans_iterations=c.estimate_iterations,
                kmeans_sample_size=c.fit_sample_size,
                seed=c.seed,
            )
            pq_config = PQConfig(m, c.num_centroids, weighting=c.weighting, training=training)
            handler = PQHandler.of(pq_config)
            order = None
            if reorder:  # as the method orders AFM's factor columns
                order = subspace_order(
                    fit_rows, s.fit_counts, handler.config, self.name, s.fit_scale
                )
                fit_rows = fit_rows[:, order]
            quantizer = handler.fit(fit_rows, s.fit_counts, self.name, s.fit_scale)
            self.fits[key] = (handler, quantizer, order)
        handler, quantizer, order = self.fits[key]
        return (handler, quantizer), order

    def pq_roundtrip(self, rows: Tensor, fit_rows: Tensor, m: int, reorder: bool) -> Tensor:
        """``rows`` encoded and decoded by the fitted quantizer, in their own column order."""
        (handler, quantizer), order = self.quantizer(fit_rows, m, reorder)
        if order is None:
            return decode(handler.encode(quantizer, rows, self.name), handler.codebooks(quantizer))
        codes = handler.encode(quantizer, rows[:, order], self.name)
        approx = torch.empty_like(rows)
        approx[:, order] = decode(codes, handler.codebooks(quantizer))
        return approx

    def pq(self, rows: Tensor, fit_rows: Tensor, m: int, reorder: bool) -> float:
        return _error(rows, self.pq_roundtrip(rows, fit_rows, m, reorder), self.samples.weights)

    def reconstruct(self, option: Option, rows: Tensor) -> Tensor:
        """``rows`` (``(n, d)``) as ``option`` stores them, with the fits its error estimate
        made (call :meth:`error` first for PQ options, which fits them)."""
        rows = rows.float()
        if option.kind in ("fp32", "identity"):
            return rows
        if option.rank is None:
            if option.subspaces is not None:
                return self.pq_roundtrip(rows, self.samples.fit_rows, option.subspaces, False)
            assert option.bits is not None
            return rowwise_roundtrip(rows, option.bits)
        u = self.basis.eigenvectors[:, : option.rank]
        factors = ((rows.double() - self.basis.mean) @ u).float()
        if option.subspaces is not None:
            factors = self.pq_roundtrip(
                factors, self.factors(option.rank)[1], option.subspaces, True
            )
        elif option.bits is not None:
            factors = rowwise_roundtrip(factors, option.bits)
        return (factors.double() @ u.T + self.basis.mean).float()

    def error(self, option: Option) -> float:
        s = self.samples
        if option.kind in ("fp32", "identity"):
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


def lookup_pairs(num_rows: int, fit: Pairs, held_out: Pairs) -> tuple[Pairs, Pairs]:
    """``fit`` and ``held_out`` with the zero-lookup fallbacks: a table ``fit`` never looks up
    is weighed uniformly over its rows, as AFM does; one ``held_out`` never looks up is
    measured on ``fit``."""
    if fit[1].sum() <= 0:
        fit = (torch.arange(num_rows), torch.ones(num_rows, dtype=torch.float64))
    if held_out[1].sum() <= 0:
        held_out = fit
    return fit, held_out


def sample_errors(
    name: str,
    basis: PrincipalBasis,
    samples: TableSamples,
    options: Sequence[Option],
    config: BudgetConfig,
) -> TableErrors:
    """The estimated error of each of ``options`` from one table's samples."""
    estimator = _Estimator(name, basis, samples, config)
    lookups = float(samples.weights.sum())
    variance = estimator.afm_tail(0) / max(lookups, 1e-300)
    result = TableErrors(name, lookups, variance, reconstruct=estimator.reconstruct)
    for option in options:
        result.errors[option] = max(estimator.error(option), 0.0)
    return result


def estimate_errors(
    table: EmbeddingBagConfig,
    weight: Tensor,
    counts: Tensor,
    held_out: Tensor,
    options: Sequence[Option],
    config: BudgetConfig,
) -> TableErrors:
    """The estimated error of each of ``options`` for ``table`` (see the module notes).

    A table that ``counts`` never looks up is weighed uniformly over its rows, as AFM does
    (with AFM's warning); one that ``held_out`` never looks up is measured on ``counts``.

    Args:
        table (EmbeddingBagConfig): the table.
        weight (Tensor): its ``(N, d)`` rows.
        counts (Tensor): ``(N,)`` lookup counts the fits use (one half of the calibration).
        held_out (Tensor): ``(N,)`` lookup counts the errors are measured on (the other half).
        options (Sequence[Option]): from :func:`~torchrec_compress.budget.options.table_options`.
        config (BudgetConfig): sample size, PQ settings, seed.
    """
    name = table.name
    moments = table_moments(weight, counts, name)
    fit, held = lookup_pairs(weight.shape[0], dense_pairs(counts), dense_pairs(held_out))
    basis = afm_basis(moments, f"table {name!r}")
    rows = weight.detach()
    samples = table_samples(lambda ids: rows[ids], weight.shape[0], fit, held, basis, config)
    return sample_errors(name, basis, samples, options, config)
