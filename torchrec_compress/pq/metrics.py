"""Quality of a product-quantized table: codebook usage, code distinctness, reconstruction error."""

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from torchrec_compress.pq.quantizer import decode


def codebook_perplexity(codes: Tensor, ksub: int, weights: Tensor | None = None) -> Tensor:
    """Per-subspace usage perplexity ``exp(H)`` of the codes (``ksub`` when usage is uniform).

    Args:
        codes (Tensor): ``[n, M]`` codes.
        ksub (int): centroids per subspace.
        weights (Optional[Tensor]): ``[n]`` row weights, e.g. lookup counts (default: 1 each).

    Returns:
        Tensor: ``[M]`` float64 perplexities in ``[1, ksub]``.

    Example::

        >>> codebook_perplexity(torch.tensor([[0, 1], [1, 1]]), ksub=2)
        tensor([2., 1.], dtype=torch.float64)
    """
    n, num_subspaces = codes.shape
    flat = (codes.long() + torch.arange(num_subspaces) * ksub).reshape(-1)
    row_weights = torch.ones(n, dtype=torch.float64) if weights is None else weights.double()
    usage = torch.zeros(num_subspaces * ksub, dtype=torch.float64).index_add_(
        0, flat, row_weights.repeat_interleave(num_subspaces)
    )
    probs = usage.view(num_subspaces, ksub)
    probs = probs / probs.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    entropy = -(probs * probs.clamp(min=torch.finfo(torch.float64).tiny).log()).sum(1)
    return entropy.exp()


def distinct_code_tuples(codes: Tensor) -> int:
    """Number of distinct rows of ``codes`` (rows sharing all ``M`` codes decode identically).

    Example::

        >>> distinct_code_tuples(torch.tensor([[0, 1], [0, 1], [1, 1]], dtype=torch.uint8))
        2
    """
    return int(torch.unique(codes, dim=0).shape[0])


def reconstruction_mse(
    weight: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    row_weights: Tensor | None = None,
    chunk_size: int = 65536,
) -> float:
    """Mean squared error per element between rows and their decoded codes, chunk by chunk.

    Args:
        weight (Tensor): ``[n, d]`` original rows.
        codes (Tensor): ``[n, M]`` codes.
        codebooks (Tensor): ``[M, ksub, d / M]``.
        row_weights (Optional[Tensor]): ``[n]`` row weights (e.g. lookup counts); default 1 each.
        chunk_size (int): rows decoded at once.

    Example::

        >>> books = torch.zeros(1, 2, 2)
        >>> reconstruction_mse(torch.ones(3, 2), torch.zeros(3, 1, dtype=torch.uint8), books)
        1.0
    """
    total = torch.zeros((), dtype=torch.float64)
    mass = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, weight.shape[0], chunk_size):
            rows = weight[start : start + chunk_size].float()
            error = (decode(codes[start : start + rows.shape[0]], codebooks) - rows).pow(2)
            per_row = error.mean(1).double()
            if row_weights is None:
                total += per_row.sum()
                mass += per_row.numel()
            else:
                w = row_weights[start : start + rows.shape[0]].double()
                total += (per_row * w).sum()
                mass += w.sum()
    return float(total / mass.clamp(min=torch.finfo(torch.float64).tiny))


@dataclass
class QuantizationMetrics:
    """What a quantized table looks like; ``weighted_*`` fields weigh rows by lookup counts.

    Args:
        ksub (int): centroids per subspace (the perplexity ceiling).
        perplexity (List[float]): per-subspace usage perplexity, every row counted once.
        weighted_perplexity (List[float]): same, rows weighted by lookup counts (equal to
            ``perplexity`` when no counts were given).
        distinct_codes (int): distinct code tuples among the rows.
        mse (float): reconstruction MSE per element, every row counted once.
        weighted_mse (float): same, rows weighted by lookup counts.
    """

    ksub: int
    perplexity: list[float]
    weighted_perplexity: list[float]
    distinct_codes: int
    mse: float
    weighted_mse: float

    @classmethod
    def compute(
        cls, weight: Tensor, codes: Tensor, codebooks: Tensor, counts: Tensor | None = None
    ) -> "QuantizationMetrics":
        """Measures ``codes``/``codebooks`` against the original ``weight`` rows.

        Example::

            >>> codes = torch.tensor([[0], [1]], dtype=torch.uint8)
            >>> m = QuantizationMetrics.compute(torch.eye(2), codes, torch.eye(2).view(1, 2, 2))
            >>> m.perplexity, m.distinct_codes, m.mse
            ([2.0], 2, 0.0)
        """
        ksub = codebooks.shape[1]
        return cls(
            ksub=ksub,
            perplexity=codebook_perplexity(codes, ksub).tolist(),
            weighted_perplexity=codebook_perplexity(codes, ksub, counts).tolist(),
            distinct_codes=distinct_code_tuples(codes),
            mse=reconstruction_mse(weight, codes, codebooks),
            weighted_mse=reconstruction_mse(weight, codes, codebooks, counts),
        )

    def to_dict(self) -> dict[str, object]:
        """Plain data (JSON-serialisable)."""
        return asdict(self)
