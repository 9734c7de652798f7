"""MEC training of one table: popularity-weighted sampling, k-means init, contrastive quantization.

The pipeline (paper: "A Universal Framework for Compressing Embeddings in CTR Prediction"):

1. Row ``i`` with lookup count ``n_i`` weighs ``r_i = max(1, floor(log2 n_i))``.  Instead of
   repeating rows ``r_i`` times in memory (the reference code), every step *samples* rows with
   probability ``r_i / sum r`` (inverse-CDF sampling on a float64 cumulative sum, so tables beyond
   ``torch.multinomial``'s 2**24 categories work too).
2. Rows are standardised (weighted mean and one scalar scale) so that learning rates and
   temperatures do not depend on the table's magnitude; codebooks start from weighted k-means
   per subspace (:class:`ProductQuantizer`).  ``K`` is capped at the number of rows.
3. :class:`MECQuantizer` trains an encoder, the codebooks and a decoder with a straight-through
   estimator: reconstruction + codebook + commitment losses, an InfoNCE term whose negatives swap
   one subspace's code of the same sample (they train encoder and decoder, not the codebooks),
   and a balance term ``log K - H`` on the soft codebook usage (its temperature annealed), on the
   batch and on uniformly drawn rows.  Adam with warm-up and cosine decay; codewords that no
   sample picked are periodically re-seeded on the worst-quantized samples; among the states
   whose codebook perplexity on uniformly drawn rows reaches a floor, the one with the best
   validation MSE, the k-means start included, is kept (:func:`~torchrec_compress.methods.pq.fitting.train_mec`).
4. All rows are encoded chunk by chunk; the codebooks handed to the CTR model are the
   *decoded* codewords (see :class:`MECQuantizer`), so lookups live in the original space.

``mode="pq"`` stops after the k-means of step 2 (the baseline).
"""

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchrec_compress.methods.pq import kernels as _ops
from torchrec_compress.methods.pq.config import MECConfig
from torchrec_compress.methods.pq.quantizer import (
    assign,
    balanced_subspaces,
    code_dtype,
)
from torchrec_compress.moments import Moments

logger = logging.getLogger(__name__)


def row_weights(
    counts: Tensor | None,
    num_rows: int,
    popularity_weighting: bool = True,
    weighting: str = "log2",
) -> Tensor:
    """Popularity weights of rows from their lookup counts (all 1 without counts or weighting).

    ``weighting="log2"`` is the paper's ``r_i = max(1, floor(log2 n_i))``: popular rows count
    more, but only logarithmically, which keeps codewords spread over the table.
    ``"lookups"`` is ``max(1, n_i)``: the weight a row's error has in the model's output
    averaged over lookups, i.e. what AUC sees.

    Args:
        counts (Optional[Tensor]): ``[num_rows]`` lookup counts ``n_i`` (float; 0 for unseen rows).
        num_rows (int): rows of the table.
        popularity_weighting (bool): ``False`` gives every row weight 1.
        weighting (str): ``"log2"`` or ``"lookups"``.

    Example::

        >>> row_weights(torch.tensor([0.0, 1.0, 3.0, 8.0, 1000.0]), 5)
        tensor([1., 1., 1., 3., 9.])
        >>> row_weights(torch.tensor([0.0, 1.0, 3.0, 8.0, 1000.0]), 5, weighting="lookups")
        tensor([   1.,    1.,    3.,    8., 1000.])
    """
    if weighting not in ("log2", "lookups"):
        raise ValueError(f"weighting must be 'log2' or 'lookups', got {weighting!r}")
    if counts is None or not popularity_weighting:
        return torch.ones(num_rows)
    if counts.shape != (num_rows,):
        raise ValueError(f"counts must have shape [{num_rows}], got {list(counts.shape)}")
    if weighting == "lookups":
        return counts.double().clamp(min=1.0).float()
    # log2(0) = -inf and log2(1) = 0 both clamp to 1, as the paper's r_i >= 1.  In place on
    # log2's result: one N-row float64 temporary, not three.
    return counts.double().log2().floor_().clamp_(min=1.0).float()


def counts_of(pairs: tuple[Tensor, Tensor], ids: Tensor) -> Tensor:
    """Lookup counts of rows ``ids`` (any order) from sorted ``pairs``; 0 where absent.

    Example::

        >>> counts_of((torch.tensor([2, 5]), torch.tensor([3.0, 1.0])), torch.tensor([5, 0])).tolist()
        [1.0, 0.0]
    """
    known, counts = pairs
    out = torch.zeros(ids.numel(), dtype=torch.float64)
    if known.numel():
        pos = torch.searchsorted(known, ids).clamp(max=known.numel() - 1)
        hit = known[pos] == ids
        out[hit] = counts[pos[hit]].double()
    return out


def stratified_rows(
    num_rows: int,
    counted_ids: Tensor,
    counts: Tensor,
    size: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A bounded sample of a table's rows that keeps the rows lookups actually hit.

    A uniform sample of a large Zipf-distributed table misses most of its popular rows, the
    ones the model reads most, and a quantizer trained on it puts them on far-away codewords.
    Here the most looked-up rows are taken whole (up to half of ``size``, by count) and the rest
    of the sample is drawn uniformly from all other rows; each drawn row stands for
    ``(num_rows - kept) / drawn`` rows, so weighted sums over the sample (k-means, the MEC
    sampler) estimate sums over the whole table.  Only the counted rows are materialised, so
    ``num_rows`` may be a billion.

    Args:
        num_rows (int): rows of the table.
        counted_ids (Tensor): ``[c]`` distinct ids with lookups.
        counts (Tensor): ``[c]`` their lookup counts.
        size (int): rows in the sample (all rows when ``num_rows <= size``).
        generator (Optional[torch.Generator]): source of the uniform draws.

    Returns:
        Tuple[Tensor, Tensor]: sorted distinct ``ids`` and ``scale`` (rows each one stands for).

    Example::

        >>> ids, scale = stratified_rows(1000, torch.tensor([7, 3]), torch.tensor([50.0, 9.0]), 10)
        >>> {3, 7} <= set(ids.tolist()), float(scale[ids == 7])
        (True, 1.0)
    """
    if num_rows <= size:
        return torch.arange(num_rows), torch.ones(num_rows)
    order = torch.argsort(counts.double(), descending=True, stable=True)[: size // 2]
    kept = torch.sort(counted_ids[order].long()).values
    draws = torch.unique(torch.randint(num_rows, (size - kept.numel(),), generator=generator))
    if kept.numel():
        at = torch.searchsorted(kept, draws).clamp(max=kept.numel() - 1)
        draws = draws[kept[at] != draws]
    stands_for = (num_rows - kept.numel()) / max(draws.numel(), 1)
    ids = torch.cat([kept, draws])
    scale = torch.cat([torch.ones(kept.numel()), torch.full((draws.numel(),), stands_for)])
    order = torch.argsort(ids)
    return ids[order], scale[order]


def subspace_order(
    weight: Tensor,
    counts: Tensor | None,
    config: MECConfig,
    table_name: str,
    row_scale: Tensor | None = None,
) -> Tensor:
    """Column order balancing variance over the ``M`` subspaces of ``weight`` (see
    :func:`~torchrec_compress.methods.pq.quantizer.balanced_subspaces`).

    Variances are weighted like the quantizer's objective (``row_weights`` of ``counts``), so
    popular rows decide.  Meant for principal-component factor tables, whose leading columns
    would otherwise all land in the first subspace.  ``config`` must be this table's config.

    Example::

        >>> rows = torch.randn(100, 4) * torch.tensor([8.0, 4.0, 2.0, 1.0])
        >>> subspace_order(rows, None, MECConfig(num_subspaces=2), "t").tolist()
        [0, 3, 1, 2]
    """
    config.check_table(table_name, weight.shape[1] if weight.dim() == 2 else 0)
    check_rows(weight, table_name, config.training.chunk_size)
    weights = row_weights(
        counts, weight.shape[0], config.popularity_weighting, config.weighting
    ).double()
    if row_scale is not None:  # weight is a sample (stratified_rows)
        weights = weights * row_scale.double()
    moments = Moments.zeros(weight.shape[1])
    for start in range(
        0, weight.shape[0], config.training.chunk_size
    ):  # bounded float64 temporaries
        end = start + config.training.chunk_size
        moments.update(weight[start:end], weights[start:end])
    variances = moments.covariance().diagonal()
    return balanced_subspaces(variances, config.num_subspaces)


# Rows summed at once by the finiteness test of check_rows (a float32 sum, no large mask).
_FINITE_BLOCK_ROWS = 1 << 16


def check_rows(weight: Tensor, table_name: str, chunk_size: int) -> None:
    """Raises naming the table for an empty table or the first row with NaN/inf values.

    A block of rows whose float32 sum is finite holds no NaN or infinity; only a block whose sum
    is not (a bad value, or finite values that overflow the sum) is tested row by row,
    ``chunk_size`` rows at a time.

    Example::

        >>> check_rows(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), "t", 1)
        Traceback (most recent call last):
        ...
        ValueError: table 't': row 1 has NaN/inf values; clean the table first
    """
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(
            f"table {table_name!r}: cannot quantize an empty table of shape {list(weight.shape)}"
        )
    for block_start in range(0, weight.shape[0], _FINITE_BLOCK_ROWS):
        block = weight[block_start : block_start + _FINITE_BLOCK_ROWS].detach()
        if bool(torch.isfinite(block.sum(dtype=torch.float32))):
            continue
        for start in range(0, block.shape[0], chunk_size):
            finite = torch.isfinite(block[start : start + chunk_size]).all(1)
            if not bool(finite.all()):
                row = block_start + start + int((~finite).nonzero()[0, 0])
                raise ValueError(
                    f"table {table_name!r}: row {row} has NaN/inf values; clean the table first"
                )


class RowSampler:
    """Draws row ids with probability proportional to ``weights`` (with replacement).

    Inverse-CDF sampling: one float64 cumulative sum, then ``searchsorted`` of uniform draws, so
    it costs ``O(log N)`` per draw and works for any number of rows.

    Args:
        weights (Tensor): ``[N]`` non-negative weights with a positive sum.
        generator (Optional[torch.Generator]): source of randomness.

    Example::

        >>> sampler = RowSampler(torch.tensor([0.0, 1.0]))
        >>> sampler.sample(4).tolist()
        [1, 1, 1, 1]
    """

    def __init__(self, weights: Tensor, generator: torch.Generator | None = None) -> None:
        # one N-row float64 tensor (a copy even of float64 weights), summed in place
        self._cumulative = weights.to(torch.float64, copy=True).cumsum_(0)
        self._generator = generator

    def sample(self, num_samples: int) -> Tensor:
        """Returns ``[num_samples]`` int64 row ids."""
        total = self._cumulative[-1]
        draws = torch.rand(num_samples, dtype=torch.float64, generator=self._generator) * total
        # right=True skips zero-weight rows (their cumulative sum equals their predecessor's).
        ids = torch.searchsorted(self._cumulative, draws, right=True)
        return ids.clamp_(max=self._cumulative.numel() - 1)


@dataclass
class MECStep:
    """One training batch through :class:`MECQuantizer`.

    Args:
        losses (Dict[str, Tensor]): every loss term; ``"total"`` is what training minimises.
        codes (Tensor): ``[M, b]`` int64 hard assignments of the batch.
        errors (Tensor): ``[M, b]`` squared distance of each encoding to its codeword.
        encodings (Tensor): ``[M, b, dsub]`` detached encodings (candidates for re-seeding).
    """

    losses: dict[str, Tensor]
    codes: Tensor
    errors: Tensor
    encodings: Tensor


class MECQuantizer(nn.Module):
    """Encoder -> product quantizer -> decoder, trained with a straight-through estimator.

    Rows are first standardised (``(x - center) / scale``, one scalar scale) so that learning
    rates and temperatures mean the same thing for every table, whatever its magnitude.  Encoder
    and decoder are per-subspace linear maps (``[M, dsub, dsub]``, identity at start).  The
    encoder decides which codeword a row gets (it trains through the straight-through
    estimator); the decoder maps codewords back.  Because the decoder is linear *per subspace*,
    decoding a code tuple equals looking up the decoded codewords, so
    :meth:`decoded_codebooks` (``scale * codebooks[m] @ decoder[m] + center_m``) is all the CTR
    model needs: a plain PQ table in the original space, no decoder at lookup time.

    Args:
        codebooks (Tensor): ``[M, K, dsub]`` initial codebooks in the standardised space
            (e.g. from k-means on standardised rows).
        center (Optional[Tensor]): ``[M * dsub]`` row offset (default 0).
        scale (float): row scale (default 1).

    Example::

        >>> mec = MECQuantizer(torch.randn(2, 4, 3))
        >>> codes = mec.compute_codes(torch.randn(5, 6))
        >>> codes.shape, codes.dtype
        (torch.Size([5, 2]), torch.uint8)
    """

    center: Tensor
    scale: Tensor

    def __init__(self, codebooks: Tensor, center: Tensor | None = None, scale: float = 1.0) -> None:
        super().__init__()
        num_subspaces, _, dsub = codebooks.shape
        identity = torch.eye(dsub).expand(num_subspaces, dsub, dsub)
        self.codebooks = nn.Parameter(codebooks.detach().clone())
        self.encoder = nn.Parameter(identity.clone())
        self.decoder = nn.Parameter(identity.clone())
        self.register_buffer(
            "center", torch.zeros(num_subspaces * dsub) if center is None else center.float()
        )
        self.register_buffer("scale", torch.tensor(float(scale)))

    @property
    def ksub(self) -> int:
        return self.codebooks.shape[1]

    def standardise(self, x: Tensor) -> Tensor:
        """``[n, d]`` rows -> ``(x - center) / scale``."""
        return (x.float() - self.center) / self.scale

    def encode(self, x: Tensor) -> Tensor:
        """``[n, d]`` rows (original space) -> ``[M, n, dsub]`` encodings."""
        num_subspaces, _, dsub = self.codebooks.shape
        split = self.standardise(x).view(x.shape[0], num_subspaces, dsub).transpose(0, 1)
        return torch.bmm(split, self.encoder)

    def decoded_codebooks(self) -> Tensor:
        """``[M, K, dsub]`` codewords in the original embedding space."""
        num_subspaces, _, dsub = self.codebooks.shape
        decoded = torch.bmm(self.codebooks, self.decoder) * self.scale
        return decoded + self.center.view(num_subspaces, 1, dsub)

    def compute_codes(self, x: Tensor, chunk_size: int = 1024) -> Tensor:
        """Codes ``[n, M]`` of the encodings, ``chunk_size`` rows at a time.

        The nearest codeword of each encoding is found by the fused C++ encoder when it was
        built (:func:`~torchrec_compress.methods.pq.kernels.encode_kernel_applies`; several times faster
        than the batched matmul of :func:`assign`, the same distances up to float rounding),
        else by :func:`assign`.

        Args:
            x (Tensor): ``[n, d]`` rows in the original space.
            chunk_size (int): rows encoded at once by the torch path (its ``[M, b, K]``
                distances bound the scratch memory); the kernel takes blocks of the same bytes.

        Returns:
            Tensor: ``[n, M]`` codes of dtype ``code_dtype(K)``.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        num_rows = x.shape[0]
        num_subspaces, ksub, dsub = self.codebooks.shape
        codes = torch.empty(num_rows, num_subspaces, dtype=code_dtype(ksub), device=x.device)
        with torch.no_grad():
            books = self.codebooks.detach()
            use_kernel = _ops.encode_kernel_applies(x, books, codes.dtype)
            if use_kernel:
                # the kernel's only scratch is the block of encodings ([b, d], not [M, b, K]
                # distances): blocks of the same bytes hold K / dsub times more rows
                chunk_size *= max(1, ksub // dsub)
            for start in range(0, num_rows, chunk_size):
                encoded = self.encode(x[start : start + chunk_size])  # [M, b, dsub]
                end = start + encoded.shape[1]
                if use_kernel:
                    rows = encoded.transpose(0, 1).reshape(end - start, -1)  # [b, M * dsub]
                    codes[start:end] = torch.ops.torchrec_compress.pq_encode(
                        rows, books, codes.dtype
                    )
                else:
                    codes[start:end] = assign(encoded, books)[0].t()
        return codes

    def loss(self, x: Tensor, config: MECConfig, generator: torch.Generator) -> dict[str, Tensor]:
        """All MEC losses on a batch ``x`` ``[b, d]``; ``"total"`` is what training minimises."""
        return self(x, config, generator).losses

    def forward(
        self,
        x: Tensor,
        config: MECConfig,
        generator: torch.Generator,
        balance_temperature: float | None = None,
        balance_rows: Tensor | None = None,
    ) -> MECStep:
        """Losses, hard codes and quantization errors of a batch ``x`` ``[b, d]``.

        Args:
            x (Tensor): ``[b, d]`` rows in the original space.
            config (MECConfig): loss weights and temperatures.
            generator (torch.Generator): draws the contrastive negatives.
            balance_temperature (Optional[float]): overrides ``config.training.balance_temperature``
                (training anneals it).
            balance_rows (Optional[Tensor]): ``[u, d]`` rows drawn uniformly; the balance term
                is computed on them too (``"uniform_balance"``), so that usage is spread over
                all rows, not only over the popular ones the batch ``x`` is drawn from.
        """
        num_subspaces, ksub, dsub = self.codebooks.shape
        batch = x.shape[0]
        target = self.standardise(x)
        z = self.encode(x)  # [M, b, dsub]
        # One [M, b, K] tensor serves the hard assignment and the soft (balance) one.
        z_norms = z.pow(2).sum(-1)  # [M, b]
        partial = self._partial_distances(z)
        errors, codes = partial.detach().min(-1)
        errors = (errors + z_norms.detach()).clamp_(min=0.0)
        q = torch.gather(self.codebooks, 1, codes.unsqueeze(-1).expand(-1, -1, dsub))
        z_q = z + (q - z).detach()  # straight-through: forward q, gradient to z
        recon_sub = torch.bmm(z_q, self.decoder)  # [M, b, dsub]
        recon = recon_sub.transpose(0, 1).reshape(batch, -1)
        losses = {
            "reconstruction": F.mse_loss(recon, target),
            "codebook": F.mse_loss(q, z.detach()),
            "commitment": config.training.commitment_weight * F.mse_loss(z, q.detach()),
        }
        if config.training.contrastive_weight > 0:
            losses["contrastive"] = config.training.contrastive_weight * self._contrastive(
                target, recon_sub, codes, config, generator
            )
        if config.training.balance_weight > 0:
            temperature = balance_temperature or config.training.balance_temperature
            losses["balance"] = config.training.balance_weight * _balance(
                partial, z_norms, temperature
            )
            if balance_rows is not None:
                z_uniform = self.encode(balance_rows)
                losses["uniform_balance"] = config.training.balance_weight * _balance(
                    self._partial_distances(z_uniform), z_uniform.pow(2).sum(-1), temperature
                )
        losses["total"] = torch.stack(list(losses.values())).sum()
        return MECStep(losses, codes, errors, z.detach())

    def _partial_distances(self, z: Tensor) -> Tensor:
        """``[M, n, K]`` squared distances of encodings ``z`` ``[M, n, dsub]`` to the codewords,
        less ``||z||^2``: constant per row, neither an argmin nor a softmax over ``K`` needs it."""
        return torch.baddbmm(
            self.codebooks.pow(2).sum(-1).unsqueeze(1),
            z,
            self.codebooks.transpose(1, 2),
            alpha=-2.0,
        )

    def _contrastive(
        self,
        target: Tensor,
        recon_sub: Tensor,
        codes: Tensor,
        config: MECConfig,
        generator: torch.Generator,
    ) -> Tensor:
        """InfoNCE: anchor ``target``, positive its reconstruction, negatives one code swapped."""
        num_subspaces, ksub, dsub = self.codebooks.shape
        batch = target.shape[0]
        if config.training.reference_shared_negative:
            shape = (1, 1)  # the reference code: one random negative for the whole batch
        else:
            shape = (batch, config.training.num_negatives)
        subspace = torch.randint(num_subspaces, shape, generator=generator)
        own_code = codes.t()[torch.arange(batch).unsqueeze(1), subspace]  # [b, R]
        # A shift in [1, K) guarantees the negative code differs from the sample's own code.
        shift = torch.randint(1, max(ksub, 2), shape, generator=generator)
        negative_code = (own_code + shift) % ksub
        # The negatives train encoder and decoder, not the codebooks: repelling the swapped-in
        # codeword from every anchor drives codewords out of the dense region of rarely looked-up
        # rows, and their codes collapse onto a few codewords (measured: perplexity 0.8 K -> 0.05 K
        # on a 200k-row table).
        decoded = torch.bmm(self.codebooks.detach(), self.decoder)  # standardised space
        negative_sub = decoded[subspace, negative_code]  # [b, R, dsub]
        recon = recon_sub.transpose(0, 1)  # [b, M, dsub]
        own_sub = recon[torch.arange(batch).unsqueeze(1), subspace]  # [b, R, dsub]
        swap = F.one_hot(subspace, num_subspaces).unsqueeze(-1).to(target.dtype)  # [b, R, M, 1]
        negatives = recon.unsqueeze(1) + swap * (negative_sub - own_sub).unsqueeze(2)
        candidates = torch.cat([recon.unsqueeze(1), negatives], dim=1).flatten(2)  # [b,1+R,d]
        logits = F.cosine_similarity(target.unsqueeze(1), candidates, dim=-1)
        labels = torch.zeros(batch, dtype=torch.long)
        return F.cross_entropy(logits / config.training.contrastive_temperature, labels)


def _balance(partial_distances: Tensor, z_norms: Tensor, temperature: float) -> Tensor:
    """``log K - H(p)``, ``p`` the batch-mean soft assignment per subspace (differentiable).

    ``partial_distances`` ``[M, b, K]`` are the squared distances less ``z_norms`` ``[M, b]``
    (the softmax over ``K`` ignores a per-row constant).  The temperature is relative to the
    batch's mean squared distance, so it does not depend on the scale of the encodings.
    """
    ksub = partial_distances.shape[-1]
    mean_distance = partial_distances.detach().mean() + z_norms.detach().mean()
    inverse_scale = -1.0 / float(mean_distance.clamp(min=1e-12) * temperature)
    usage = torch.softmax(partial_distances * inverse_scale, dim=-1).mean(1)  # [M, K]
    entropy = -(usage * usage.clamp(min=1e-12).log()).sum(-1)
    return (math.log(ksub) - entropy).mean()
