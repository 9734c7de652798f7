"""Fitting one table's quantizer: k-means, then MEC training with validation and re-seeding.

:func:`fit_quantizer` (k-means on a popularity-keeping subsample; for MEC, training from the
k-means start on standardised rows), :func:`train_mec` (Adam with warm-up and cosine decay,
dead codewords re-seeded, the best validated state kept) and :func:`train_pq_table` (fit, then
encode every row).  The quantizers themselves live in :mod:`.quantizer` (k-means PQ) and
:mod:`.training` (:class:`~torchrec_compress.methods.pq.training.MECQuantizer`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from torchrec_compress.methods.pq.config import MECConfig, MECTraining
from torchrec_compress.methods.pq.metrics import (
    QuantizationMetrics,
    code_usage,
    codebook_perplexity,
    reconstruction_mse,
)
from torchrec_compress.methods.pq.quantizer import ProductQuantizer
from torchrec_compress.methods.pq.training import (
    MECQuantizer,
    MECStep,
    RowSampler,
    check_rows,
    row_weights,
    stratified_rows,
)

logger = logging.getLogger(__name__)


def _reseed_dead_codewords_(
    mec: MECQuantizer, optimizer: torch.optim.Optimizer, usage: Tensor, step: MECStep
) -> int:
    """Moves every codeword no sample picked onto the encodings that are quantized worst.

    A codeword that no sample is assigned to gets no gradient from the codebook loss and would
    stay dead for good; placing it on a badly served encoding both revives it and lowers the
    error where it is largest.  Dead codeword ``j``-th (in subspace ``m``) takes the ``j``-th
    worst encoding of the batch in that subspace; its Adam moments restart from zero.

    Returns:
        int: number of re-seeded codewords.
    """
    dead = usage == 0  # [M, K]
    num_dead = int(dead.sum())
    if num_dead == 0:
        return 0
    batch = step.errors.shape[1]
    worst = step.errors.argsort(dim=1, descending=True)  # [M, b]
    rank = (dead.cumsum(1) - 1) % batch  # j-th dead codeword of its subspace -> j-th worst
    subspace, codeword = dead.nonzero(as_tuple=True)
    sample = worst[subspace, rank[subspace, codeword]]
    with torch.no_grad():
        mec.codebooks[subspace, codeword] = step.encodings[subspace, sample]
    state = optimizer.state.get(mec.codebooks, {})
    for moment in ("exp_avg", "exp_avg_sq"):
        if moment in state:
            state[moment][subspace, codeword] = 0.0
    return num_dead


def _learning_rate(training: MECTraining, step: int) -> float:
    """Linear warm-up over the first 5% of the steps, then cosine decay to zero."""
    warmup = max(1, training.steps // 20)
    if step < warmup:
        return training.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, training.steps - warmup)
    return training.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def _balance_temperature(training: MECTraining, step: int) -> float:
    """Geometric anneal from ``balance_temperature`` to ``balance_temperature_final``: soft,
    smooth usage early (every codeword gets gradient), close to the hard usage at the end."""
    progress = step / max(1, training.steps - 1)
    start, end = training.balance_temperature, training.balance_temperature_final
    return start * (end / start) ** progress


def _validation_mse(mec: MECQuantizer, rows: Tensor, chunk_size: int) -> float:
    """Mean squared error of ``rows`` through encoder -> codes -> decoded codebooks."""
    codes = mec.compute_codes(rows, chunk_size)
    with torch.no_grad():
        books = mec.decoded_codebooks()
    return reconstruction_mse(rows, codes, books, chunk_size=chunk_size)


def _validation_perplexity(mec: MECQuantizer, rows: Tensor, chunk_size: int) -> float:
    """Smallest per-subspace codebook perplexity of ``rows`` (each counted once)."""
    codes = mec.compute_codes(rows, chunk_size)
    return float(codebook_perplexity(codes, mec.ksub).min())


def _uniform_ids(num_rows: int, size: int, generator: torch.Generator) -> Tensor:
    """All rows when there are at most ``size``, else ``size`` uniform draws."""
    if num_rows <= size:
        return torch.arange(num_rows)
    return torch.randint(num_rows, (size,), generator=generator)


@dataclass
class _Validation:
    """The rows a training run is scored on, and how its states rank.

    ``rows`` are drawn like the validation weights (lookups): their plain MSE estimates the
    lookup-weighted one; ``uniform_rows`` are drawn uniformly, for the perplexity floor.
    """

    rows: Tensor
    uniform_rows: Tensor
    start_codes: Tensor
    floor: float
    chunk_size: int

    @classmethod
    def draw(
        cls,
        mec: MECQuantizer,
        weight: Tensor,
        validation_weights: Tensor,
        training: MECTraining,
        generator: torch.Generator,
    ) -> _Validation:
        # The validation sampler is dropped once it has drawn: two float64 cumulative sums of a
        # 20M-row table would hold 320 MB through training.
        ids = RowSampler(validation_weights, generator).sample(training.validation_size)
        rows = weight[ids].float()
        uniform = weight[_uniform_ids(weight.shape[0], training.validation_size, generator)]
        return cls(
            rows=rows,
            uniform_rows=uniform.float(),
            start_codes=mec.compute_codes(rows, training.chunk_size),
            floor=training.perplexity_floor * mec.ksub,
            chunk_size=training.chunk_size,
        )

    def evaluate(
        self, mec: MECQuantizer, step: int
    ) -> tuple[tuple[int, float], dict[str, float], Tensor]:
        """The state's rank (above the floor: by MSE, all above any below; below: by balance),
        its record and the validation rows' codes."""
        mse = _validation_mse(mec, self.rows, self.chunk_size)
        perplexity = _validation_perplexity(mec, self.uniform_rows, self.chunk_size)
        rank = (1, -mse) if perplexity >= self.floor else (0, perplexity)
        codes = mec.compute_codes(self.rows, self.chunk_size)
        record = {
            "step": float(step),
            "validation_mse": mse,
            "validation_perplexity": perplexity,
            # how far training moved the codes: validation rows whose codes differ from k-means'
            "codes_changed": float((codes != self.start_codes).any(1).float().mean()),
            "kept": 0.0,
            "reseeded": 0.0,
        }
        return rank, record, codes


def _train_step(
    mec: MECQuantizer,
    optimizer: torch.optim.Optimizer,
    sampler: RowSampler,
    weight: Tensor,
    config: MECConfig,
    generator: torch.Generator,
    step: int,
) -> MECStep:
    """One Adam step on a batch drawn by popularity (and uniform rows for the balance term)."""
    training = config.training
    for group in optimizer.param_groups:
        group["lr"] = _learning_rate(training, step)
    batch = weight[sampler.sample(training.sample_size)].float()
    balance_rows = None
    if training.balance_sample_size and training.balance_weight > 0:
        ids = torch.randint(weight.shape[0], (training.balance_sample_size,), generator=generator)
        balance_rows = weight[ids].float()
    optimizer.zero_grad(set_to_none=True)
    out = mec(batch, config, generator, _balance_temperature(training, step), balance_rows)
    out.losses["total"].backward()
    optimizer.step()
    return out


def train_mec(
    mec: MECQuantizer,
    weight: Tensor,
    weights: Tensor,
    config: MECConfig,
    generator: torch.Generator,
    validation_weights: Tensor | None = None,
) -> list[dict[str, float]]:
    """Trains ``mec`` in place on rows of ``weight`` drawn with probability ``∝ weights``.

    Adam with warm-up and cosine decay; every ``config.training.reseed_interval`` steps dead codewords are
    re-seeded (:func:`_reseed_dead_codewords_`) and the quantizer is scored on a sample drawn
    with probability ``∝ validation_weights`` (default ``weights``): its plain MSE estimates the
    MSE weighted that way, e.g. by lookup counts, as the CTR model sees the table.  With
    ``config.training.keep_best`` the best-scoring state, the initial one included, is what ``mec`` holds
    at the end: training can then only improve the weighted reconstruction of its start.

    A weighted MSE alone rewards states where the many rarely looked-up rows share a few
    codewords, so with ``config.training.perplexity_floor`` only states whose perplexity on uniformly
    drawn rows reaches ``perplexity_floor * K`` compete on MSE; if none does, the most balanced
    state wins.  With ``config.training.balance_sample_size`` the balance term is also computed on
    uniformly drawn rows every step.

    Returns:
        List[Dict[str, float]]: one record per evaluation (step, validation MSE, validation
        perplexity, re-seeded, ``codes_changed``: the share of validation rows whose codes
        differ from the k-means start's, ``kept``: 1 for the state ``mec`` ends with).
    """

    training = config.training
    validation = _Validation.draw(
        mec,
        weight,
        weights if validation_weights is None else validation_weights,
        training,
        generator,
    )
    sampler = RowSampler(weights, generator)
    optimizer = torch.optim.Adam(mec.parameters(), lr=training.learning_rate)
    best_rank, best_record, _ = validation.evaluate(mec, 0)
    best_state = {k: v.clone() for k, v in mec.state_dict().items()}
    history = [best_record]
    usage = torch.zeros(mec.codebooks.shape[:2], dtype=torch.long)
    interval = training.reseed_interval or training.steps
    for step in range(training.steps):
        out = _train_step(mec, optimizer, sampler, weight, config, generator, step)
        usage += code_usage(out.codes.t(), mec.ksub).long()
        if (step + 1) % interval != 0 and step + 1 != training.steps:
            continue
        rank, record, validation_codes = validation.evaluate(mec, step + 1)
        if rank > best_rank:
            best_rank, best_record = rank, record
            best_state = {k: v.clone() for k, v in mec.state_dict().items()}
        if training.reseed_interval and step + 1 < training.steps:
            # The training batches are drawn by r_i (log2 n by default): a codeword that
            # serves a few very popular rows can go unpicked for a whole interval.  The
            # validation rows are drawn like lookups (n_i): what they use is alive too.
            # (Counting only the batches re-seeded such codewords and raised the
            # lookup-weighted error by half on the synthetic default's 120k-row table.)
            usage += code_usage(validation_codes, mec.ksub).long()
            record["reseeded"] = float(_reseed_dead_codewords_(mec, optimizer, usage, out))
        usage.zero_()
        history.append(record)
    if training.keep_best:
        mec.load_state_dict(best_state)
    (best_record if training.keep_best else history[-1])["kept"] = 1.0
    return history


def _kmeans_rows(
    weight: Tensor,
    counts: Tensor | None,
    weights: Tensor,
    training: MECTraining,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """The rows k-means runs on and their weights: a bounded subsample that keeps the most
    looked-up rows (:func:`stratified_rows`), each row weighted by its popularity and by the
    rows it stands for; all rows when there are few."""
    num_rows = weight.shape[0]
    if num_rows <= training.kmeans_sample_size:
        return weight.float(), weights
    counted = (
        counts.nonzero().squeeze(1) if counts is not None else torch.zeros(0, dtype=torch.long)
    )
    subset, row_share = stratified_rows(
        num_rows,
        counted,
        counts[counted] if counts is not None else torch.zeros(0),
        training.kmeans_sample_size,
        generator,
    )
    return weight[subset].float(), weights[subset] * row_share


def _mec_start(
    pq: ProductQuantizer,
    rows: Tensor,
    weights: Tensor,
    training: MECTraining,
    generator: torch.Generator,
) -> MECQuantizer:
    """MEC trains on standardised rows; k-means is translation and scale equivariant, so
    initialising there is the same k-means."""
    mass = weights.double() / weights.double().sum()
    center = (mass @ rows.double()).float()
    spread = (mass @ (rows.double() - center.double()).pow(2).mean(1)).sqrt()
    scale = float(spread) if float(spread) > 0 else 1.0
    pq.train(
        (rows - center) / scale,
        weights,
        niter=training.kmeans_iterations,
        tol=training.kmeans_tolerance,
        generator=generator,
        chunk_size=training.chunk_size,
    )
    return MECQuantizer(pq.codebooks, center, scale)


def fit_quantizer(
    weight: Tensor,
    counts: Tensor | None,
    config: MECConfig,
    table_name: str,
    row_scale: Tensor | None = None,
) -> ProductQuantizer | MECQuantizer:
    """Trains the quantizer of one table without encoding it (encode with ``compute_codes``).

    ``config`` must already be ``config.for_table(table_name)``.  ``K`` is capped at the number
    of rows: more codewords than rows cannot be used, and a table of at most ``K`` rows is
    quantized exactly by k-means (a codeword per row), so MEC training is skipped there.  With
    popularity weighting and counts, MEC keeps the state that reconstructs rows drawn like
    lookups (``∝ n_i``) best.  See :func:`train_pq_table`.

    Args:
        weight (Tensor): ``[N, d]`` pre-trained rows.
        counts (Optional[Tensor]): ``[N]`` lookup counts (``None``: uniform weights).
        config (MECConfig): method settings for this table.
        table_name (str): used in errors.
        row_scale (Optional[Tensor]): ``[N]`` how many table rows each row of ``weight``
            stands for, when ``weight`` is a sample (:func:`stratified_rows`); multiplies the
            popularity weights.

    Example::

        >>> cfg = MECConfig(num_subspaces=2, num_centroids=4, mode="pq")
        >>> fit_quantizer(torch.randn(16, 4), None, cfg, "t").compute_codes(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    config.check_table(table_name, weight.shape[1] if weight.dim() == 2 else 0)
    training = config.training
    check_rows(weight, table_name, training.chunk_size)
    num_rows, dim = weight.shape
    generator = torch.Generator().manual_seed(training.seed)
    weights = row_weights(counts, num_rows, config.popularity_weighting, config.weighting)
    if row_scale is not None:
        weights = weights * row_scale
    # the sample has its own generator, seeded like the sharded driver's (which draws the same
    # rows where they live), so that k-means starts from the same state in both
    sampler = torch.Generator().manual_seed(training.seed)
    kmeans_rows, kmeans_weights = _kmeans_rows(weight, counts, weights, training, sampler)
    pq = ProductQuantizer(dim, config.num_subspaces, min(config.num_centroids, num_rows))
    # With K >= N rows k-means puts a codeword on every row: exact, nothing left to train.
    if config.mode == "pq" or training.steps == 0 or num_rows <= config.num_centroids:
        pq.train(
            kmeans_rows,
            kmeans_weights,
            niter=training.kmeans_iterations,
            tol=training.kmeans_tolerance,
            generator=generator,
            chunk_size=training.chunk_size,
        )
        return pq
    mec = _mec_start(pq, kmeans_rows, kmeans_weights, training, generator)
    # Score on rows drawn like lookups (n_i, not r_i): the reconstruction the CTR model sees.
    by_counts = config.popularity_weighting and counts is not None and bool(counts.sum() > 0)
    history = train_mec(mec, weight, weights, config, generator, counts if by_counts else None)
    kept = next(r for r in history if r["kept"])
    logger.info(
        "table %r: MEC kept the state of step %d of %d (0: the k-means start); its codes differ "
        "from k-means' for %.1f%% of validation rows (validation MSE %.4g -> %.4g)",
        table_name,
        int(kept["step"]),
        training.steps,
        100 * kept["codes_changed"],
        history[0]["validation_mse"],
        kept["validation_mse"],
    )
    return mec


def train_pq_table(
    weight: Tensor, counts: Tensor | None, config: MECConfig, table_name: str
) -> tuple[Tensor, Tensor, QuantizationMetrics]:
    """Quantizes one table: the single entry point ``compress_`` calls per table.

    Args:
        weight (Tensor): ``[N, d]`` pre-trained rows.
        counts (Optional[Tensor]): ``[N]`` lookup counts ``n_i`` (``None``: uniform weights).
        config (MECConfig): method settings; ``table_name``'s override is applied here.
        table_name (str): used in errors and for the override.

    Returns:
        Tuple[Tensor, Tensor, QuantizationMetrics]: ``codes`` ``[N, M]`` (``uint8`` for
        ``K <= 256``), ``codebooks`` ``[M, K', d / M]`` in the original embedding space with
        ``K' = min(K, N)``, metrics (weighted by ``counts``).

    Example::

        >>> cfg = MECConfig(2, 4, training=MECTraining(steps=2, sample_size=8))
        >>> codes, books, metrics = train_pq_table(torch.randn(16, 4), None, cfg, "t")
        >>> codes.shape, codes.dtype, books.shape
        (torch.Size([16, 2]), torch.uint8, torch.Size([2, 4, 2]))
    """
    config = config.for_table(table_name)
    quantizer = fit_quantizer(weight, counts, config, table_name)
    codes = quantizer.compute_codes(weight, config.training.chunk_size)
    if isinstance(quantizer, MECQuantizer):
        with torch.no_grad():
            codebooks = quantizer.decoded_codebooks()
    else:
        codebooks = quantizer.codebooks
    return codes, codebooks, QuantizationMetrics.compute(weight, codes, codebooks, counts)
