"""MEC training of one table: popularity-weighted sampling, k-means init, contrastive quantization.

The pipeline (paper: "A Universal Framework for Compressing Embeddings in CTR Prediction"):

1. Row ``i`` with lookup count ``n_i`` weighs ``r_i = max(1, floor(log2 n_i))``.  Instead of
   repeating rows ``r_i`` times in memory (the reference code), every step *samples* rows with
   probability ``r_i / sum r`` (inverse-CDF sampling on a float64 cumulative sum, so tables beyond
   ``torch.multinomial``'s 2**24 categories work too).
2. Codebooks start from weighted k-means per subspace (:class:`ProductQuantizer`).
3. :class:`MECQuantizer` trains an encoder, the codebooks and a decoder with a straight-through
   estimator: reconstruction + codebook + commitment losses, an InfoNCE term whose negatives swap
   one subspace's code of the same sample, and a balance term ``log K - H`` on the soft codebook
   usage.
4. All rows are encoded chunk by chunk; the codebooks handed to the CTR model are the
   *decoded* codewords (see :class:`MECQuantizer`), so lookups live in the original space.

``mode="pq"`` stops after step 2 (the k-means baseline).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchrec_compress.config import MECConfig
from torchrec_compress.pq.metrics import QuantizationMetrics
from torchrec_compress.pq.quantizer import ProductQuantizer, assign, code_dtype


def row_weights(counts: Tensor | None, num_rows: int, popularity_weighting: bool = True) -> Tensor:
    """Popularity weights ``r_i = max(1, floor(log2 n_i))`` (all 1 without counts or weighting).

    Args:
        counts (Optional[Tensor]): ``[num_rows]`` lookup counts ``n_i`` (float; 0 for unseen rows).
        num_rows (int): rows of the table.
        popularity_weighting (bool): ``False`` gives every row weight 1.

    Example::

        >>> row_weights(torch.tensor([0.0, 1.0, 3.0, 8.0, 1000.0]), 5)
        tensor([1., 1., 1., 3., 9.])
    """
    if counts is None or not popularity_weighting:
        return torch.ones(num_rows)
    if counts.shape != (num_rows,):
        raise ValueError(f"counts must have shape [{num_rows}], got {list(counts.shape)}")
    # log2(0) = -inf and log2(1) = 0 both clamp to 1, as the paper's r_i >= 1.
    return counts.double().log2().floor().clamp(min=1.0).float()


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
        self._cumulative = weights.double().cumsum(0)
        self._generator = generator

    def sample(self, num_samples: int) -> Tensor:
        """Returns ``[num_samples]`` int64 row ids."""
        total = self._cumulative[-1]
        draws = torch.rand(num_samples, dtype=torch.float64, generator=self._generator) * total
        # right=True skips zero-weight rows (their cumulative sum equals their predecessor's).
        ids = torch.searchsorted(self._cumulative, draws, right=True)
        return ids.clamp_(max=self._cumulative.numel() - 1)


class MECQuantizer(nn.Module):
    """Encoder -> product quantizer -> decoder, trained with a straight-through estimator.

    Encoder and decoder are per-subspace linear maps (``[M, dsub, dsub]``, identity at start).
    The encoder decides which codeword a row gets (it trains through the straight-through
    estimator); the decoder maps codewords back to the original embedding space.  Because the
    decoder is linear *per subspace*, decoding a code tuple equals looking up the decoded
    codewords ``codebooks[m] @ decoder[m]``, so :meth:`decoded_codebooks` is all the CTR model
    needs: a plain PQ table in the original space, no decoder at lookup time.

    Args:
        codebooks (Tensor): ``[M, K, dsub]`` initial codebooks (e.g. from k-means).

    Example::

        >>> mec = MECQuantizer(torch.randn(2, 4, 3))
        >>> codes = mec.compute_codes(torch.randn(5, 6))
        >>> codes.shape, codes.dtype
        (torch.Size([5, 2]), torch.uint8)
    """

    def __init__(self, codebooks: Tensor) -> None:
        super().__init__()
        num_subspaces, _, dsub = codebooks.shape
        identity = torch.eye(dsub).expand(num_subspaces, dsub, dsub)
        self.codebooks = nn.Parameter(codebooks.detach().clone())
        self.encoder = nn.Parameter(identity.clone())
        self.decoder = nn.Parameter(identity.clone())

    def encode(self, x: Tensor) -> Tensor:
        """``[n, d]`` rows -> ``[M, n, dsub]`` encodings."""
        num_subspaces, _, dsub = self.codebooks.shape
        return torch.bmm(x.view(x.shape[0], num_subspaces, dsub).transpose(0, 1), self.encoder)

    def decoded_codebooks(self) -> Tensor:
        """``[M, K, dsub]`` codewords in the original embedding space."""
        return torch.bmm(self.codebooks, self.decoder)

    def compute_codes(self, x: Tensor, chunk_size: int = 1024) -> Tensor:
        """Codes ``[n, M]`` of the encodings, ``chunk_size`` rows at a time."""
        codes = torch.empty(x.shape[0], self.codebooks.shape[0], dtype=code_dtype(self.ksub))
        with torch.no_grad():
            for start in range(0, x.shape[0], chunk_size):
                part = x[start : start + chunk_size].float()
                codes[start : start + part.shape[0]] = assign(self.encode(part), self.codebooks)[
                    0
                ].t()
        return codes

    @property
    def ksub(self) -> int:
        return self.codebooks.shape[1]

    def loss(self, x: Tensor, config: MECConfig, generator: torch.Generator) -> dict[str, Tensor]:
        """All MEC losses on a batch ``x`` ``[b, d]``; ``"total"`` is what training minimises."""
        num_subspaces, ksub, dsub = self.codebooks.shape
        batch = x.shape[0]
        z = self.encode(x)  # [M, b, dsub]
        codes, _ = assign(z.detach(), self.codebooks.detach())  # [M, b]
        q = torch.gather(self.codebooks, 1, codes.unsqueeze(-1).expand(-1, -1, dsub))
        z_q = z + (q - z).detach()  # straight-through: forward q, gradient to z
        recon_sub = torch.bmm(z_q, self.decoder)  # [M, b, dsub]
        recon = recon_sub.transpose(0, 1).reshape(batch, -1)
        losses = {
            "reconstruction": F.mse_loss(recon, x),
            "codebook": F.mse_loss(q, z.detach()),
            "commitment": config.commitment_weight * F.mse_loss(z, q.detach()),
        }
        if config.contrastive_weight > 0:
            losses["contrastive"] = config.contrastive_weight * self._contrastive(
                x, recon_sub, codes, config, generator
            )
        if config.balance_weight > 0:
            losses["balance"] = config.balance_weight * self._balance(z, config)
        losses["total"] = torch.stack(list(losses.values())).sum()
        return losses

    def _contrastive(
        self,
        x: Tensor,
        recon_sub: Tensor,
        codes: Tensor,
        config: MECConfig,
        generator: torch.Generator,
    ) -> Tensor:
        """InfoNCE: anchor ``x``, positive its reconstruction, negatives one code swapped."""
        num_subspaces, ksub, dsub = self.codebooks.shape
        batch = x.shape[0]
        if config.reference_shared_negative:
            shape = (1, 1)  # the reference code: one random negative for the whole batch
        else:
            shape = (batch, config.num_negatives)
        subspace = torch.randint(num_subspaces, shape, generator=generator)
        own_code = codes.t()[torch.arange(batch).unsqueeze(1), subspace]  # [b, R]
        # A shift in [1, K) guarantees the negative code differs from the sample's own code.
        shift = torch.randint(1, max(ksub, 2), shape, generator=generator)
        negative_code = (own_code + shift) % ksub
        negative_sub = self.decoded_codebooks()[subspace, negative_code]  # [b, R, dsub]
        recon = recon_sub.transpose(0, 1)  # [b, M, dsub]
        own_sub = recon[torch.arange(batch).unsqueeze(1), subspace]  # [b, R, dsub]
        swap = F.one_hot(subspace, num_subspaces).unsqueeze(-1).to(x.dtype)  # [b, R, M, 1]
        negatives = recon.unsqueeze(1) + swap * (negative_sub - own_sub).unsqueeze(2)
        candidates = torch.cat([recon.unsqueeze(1), negatives], dim=1).flatten(2)  # [b,1+R,d]
        logits = F.cosine_similarity(x.unsqueeze(1), candidates, dim=-1)
        target = torch.zeros(batch, dtype=torch.long)
        return F.cross_entropy(logits / config.contrastive_temperature, target)

    def _balance(self, z: Tensor, config: MECConfig) -> Tensor:
        """``log K - H(p)`` with ``p`` the batch-mean soft assignment per subspace (differentiable)."""
        ksub = self.ksub
        norms = self.codebooks.pow(2).sum(-1).unsqueeze(1)
        distances = torch.baddbmm(norms, z, self.codebooks.transpose(1, 2), alpha=-2.0)
        distances = distances + z.pow(2).sum(-1, keepdim=True)  # [M, b, K]
        # Relative to the batch's mean distance, so the temperature does not depend on scale.
        scale = distances.mean().detach().clamp(min=1e-12) * config.balance_temperature
        usage = torch.softmax(-distances / scale, dim=-1).mean(1)  # [M, K]
        entropy = -(usage * usage.clamp(min=1e-12).log()).sum(-1)
        return (math.log(ksub) - entropy).mean()


def _check_rows(weight: Tensor, table_name: str, chunk_size: int) -> None:
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(
            f"table {table_name!r}: cannot quantize an empty table of shape {list(weight.shape)}"
        )
    for start in range(0, weight.shape[0], chunk_size):
        finite = torch.isfinite(weight[start : start + chunk_size]).all(1)
        if not bool(finite.all()):
            row = start + int((~finite).nonzero()[0, 0])
            raise ValueError(
                f"table {table_name!r}: row {row} has NaN/inf values; clean the table first"
            )


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
        ``K <= 256``), ``codebooks`` ``[M, K, d / M]`` in the original embedding space, metrics.

    Example::

        >>> cfg = MECConfig(num_subspaces=2, num_centroids=4, steps=2, sample_size=8)
        >>> codes, books, metrics = train_pq_table(torch.randn(16, 4), None, cfg, "t")
        >>> codes.shape, codes.dtype, books.shape
        (torch.Size([16, 2]), torch.uint8, torch.Size([2, 4, 2]))
    """
    config = config.for_table(table_name)
    config.check_table(table_name, weight.shape[1] if weight.dim() == 2 else 0)
    _check_rows(weight, table_name, config.chunk_size)
    num_rows, dim = weight.shape
    generator = torch.Generator().manual_seed(config.seed)
    weights = row_weights(counts, num_rows, config.popularity_weighting)

    # k-means on a uniform subsample, each sampled row weighted by its popularity: unbiased for
    # the weighted objective without touching every row.
    if num_rows > config.kmeans_sample_size:
        subset = torch.randint(num_rows, (config.kmeans_sample_size,), generator=generator)
        kmeans_rows, kmeans_weights = weight[subset].float(), weights[subset]
    else:
        kmeans_rows, kmeans_weights = weight.float(), weights
    pq = ProductQuantizer(dim, config.num_subspaces, config.num_centroids)
    pq.train(
        kmeans_rows,
        kmeans_weights,
        niter=config.kmeans_iterations,
        generator=generator,
        chunk_size=config.chunk_size,
    )
    if config.mode == "pq" or config.steps == 0:
        codes = pq.compute_codes(weight, config.chunk_size)
        codebooks = pq.codebooks
    else:
        mec = MECQuantizer(pq.codebooks)
        optimizer = torch.optim.Adam(mec.parameters(), lr=config.learning_rate)
        sampler = RowSampler(weights, generator)
        for _ in range(config.steps):
            batch = weight[sampler.sample(config.sample_size)].float()
            optimizer.zero_grad(set_to_none=True)
            mec.loss(batch, config, generator)["total"].backward()
            optimizer.step()
        codes = mec.compute_codes(weight, config.chunk_size)
        codebooks = mec.decoded_codebooks().detach()
    return codes, codebooks, QuantizationMetrics.compute(weight, codes, codebooks, counts)
