"""Quality of a product-quantized table: codebook usage, code distinctness, reconstruction error.

Every metric reads the ``[N, M]`` codes in blocks of ``chunk_size`` rows, so its temporaries
(int64 code offsets, float64 weights, decoded rows) stay a few MB whatever ``N`` is;
:func:`distinct_code_tuples` sorts the rows part by part (about an eighth of the codes at once).
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from torchrec_compress.methods.pq.quantizer import decode

# Rows per block when a metric reads the codes (64k x M=8 int64 offsets: 4 MiB).
DEFAULT_CHUNK_ROWS = 65536


def codebook_perplexity(
    codes: Tensor,
    ksub: int,
    weights: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
) -> Tensor:
    """Per-subspace usage perplexity ``exp(H)`` of the codes (``ksub`` when usage is uniform).

    Usage is accumulated block by block in row order (the same float64 sums as one pass).

    Args:
        codes (Tensor): ``[n, M]`` codes.
        ksub (int): centroids per subspace.
        weights (Optional[Tensor]): ``[n]`` row weights, e.g. lookup counts (default: 1 each).
        chunk_size (int): rows read at once.

    Returns:
        Tensor: ``[M]`` float64 perplexities in ``[1, ksub]``.

    Example::

        >>> codebook_perplexity(torch.tensor([[0, 1], [1, 1]]), ksub=2)
        tensor([2., 1.], dtype=torch.float64)
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    n, num_subspaces = codes.shape
    offsets = torch.arange(num_subspaces) * ksub
    usage = torch.zeros(num_subspaces * ksub, dtype=torch.float64)
    for start in range(0, n, chunk_size):
        flat = (codes[start : start + chunk_size].long() + offsets).reshape(-1)
        if weights is None:  # integer counts: exact in float64
            usage += torch.bincount(flat, minlength=usage.numel())
        else:
            block = weights[start : start + chunk_size].double()
            usage.index_add_(0, flat, block.repeat_interleave(num_subspaces))
    probs = usage.view(num_subspaces, ksub)
    probs = probs / probs.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    entropy = -(probs * probs.clamp(min=torch.finfo(torch.float64).tiny).log()).sum(1)
    return entropy.exp()


_USAGE_BLOCK_KEYS = 1 << 17  # keys counted per CPU bincount in code_usage (512 KiB of int32)


def code_usage(codes: Tensor, ksub: int) -> Tensor:
    """``[M, K]`` float64 count of the rows using each codeword (add the counts of several processes or blocks).

    Example::

        >>> code_usage(torch.tensor([[0, 1], [1, 1]], dtype=torch.uint8), 2).tolist()
        [[1.0, 1.0], [0.0, 2.0]]
    """
    num_rows, num_subspaces = codes.shape
    # One bincount of m * ksub + code per block of rows: a block's keys stay in cache, and no
    # strided column is copied out (4x faster than a bincount per column on 10M x 8 byte codes).
    key_dtype = torch.int32 if num_subspaces * ksub < 2**31 else torch.int64
    offsets = torch.arange(num_subspaces, dtype=key_dtype, device=codes.device) * ksub
    counts = torch.zeros(num_subspaces * ksub, dtype=torch.int64, device=codes.device)
    block_keys = _USAGE_BLOCK_KEYS if codes.device.type == "cpu" else 1 << 24  # few GPU launches
    block = max(1, block_keys // max(num_subspaces, 1))
    for start in range(0, num_rows, block):
        keys = codes[start : start + block].to(key_dtype) + offsets
        counts += torch.bincount(keys.reshape(-1), minlength=num_subspaces * ksub)
    return counts.view(num_subspaces, ksub).double()


def distinct_code_tuples(codes: Tensor, num_parts: int = 8) -> int:
    """Number of distinct rows of ``codes`` (rows sharing all ``M`` codes decode identically).

    Rows are split into ``num_parts`` parts by their first code (equal rows share a part);
    each part's rows, copied out, are sorted in place as one key per row (an int64 when a row
    fits in 8 bytes, e.g. ``M = 8`` ``uint8`` codes; raw bytes otherwise) and its distinct rows
    are where the sorted keys change.  Extra memory: one part's copy, about ``1 / num_parts``
    of the codes when the first code is spread out, plus one byte per row.

    Args:
        codes (Tensor): ``[n, M]`` integer codes.
        num_parts (int): parts sorted one after the other.

    Example::

        >>> distinct_code_tuples(torch.tensor([[0, 1], [0, 1], [1, 1]], dtype=torch.uint8))
        2
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be [n, M], got shape {list(codes.shape)}")
    if num_parts <= 0:
        raise ValueError(f"num_parts must be positive, got {num_parts}")
    if codes.shape[1] == 0:
        return min(codes.shape[0], 1)
    row_bytes = codes.shape[1] * codes.element_size()
    width = max(row_bytes, 8)
    key_type = np.dtype(np.int64) if width == 8 else np.dtype((np.void, width))
    part_of_row = torch.remainder(codes[:, 0], num_parts)
    distinct = 0
    for part in range(num_parts):
        rows = codes[part_of_row == part].contiguous().view(torch.uint8)  # [m, row_bytes]
        if rows.shape[0] == 0:
            continue
        if width > row_bytes:  # zero padding, the same for every row: keys stay injective
            rows = torch.nn.functional.pad(rows, (0, width - row_bytes))
        keys = rows.numpy().view(key_type).reshape(-1)
        keys.sort()  # in place, no index array
        distinct += 1 + int(np.count_nonzero(keys[1:] != keys[:-1]))
    return distinct


def reconstruction_mse(
    weight: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    row_weights: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
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
    return _mean_errors(weight, codes, codebooks, [row_weights], chunk_size)[0]


def _mean_errors(
    weight: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    weightings: list[Tensor | None],
    chunk_size: int,
) -> list[float]:
    """:func:`reconstruction_mse` under several row weightings, decoding every block once."""
    totals = [torch.zeros((), dtype=torch.float64) for _ in weightings]
    masses = [torch.zeros((), dtype=torch.float64) for _ in weightings]
    with torch.no_grad():
        for start in range(0, weight.shape[0], chunk_size):
            rows = weight[start : start + chunk_size].float()
            error = (decode(codes[start : start + rows.shape[0]], codebooks) - rows).pow(2)
            per_row = error.mean(1).double()
            for total, mass, row_weights in zip(totals, masses, weightings, strict=True):
                if row_weights is None:
                    total += per_row.sum()
                    mass += per_row.numel()
                else:
                    w = row_weights[start : start + rows.shape[0]].double()
                    total += (per_row * w).sum()
                    mass += w.sum()
    tiny = torch.finfo(torch.float64).tiny
    return [float(t / m.clamp(min=tiny)) for t, m in zip(totals, masses, strict=True)]


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
        cls,
        weight: Tensor,
        codes: Tensor,
        codebooks: Tensor,
        counts: Tensor | None = None,
        chunk_size: int = DEFAULT_CHUNK_ROWS,
    ) -> "QuantizationMetrics":
        """Measures ``codes``/``codebooks`` against the original ``weight`` rows.

        Args:
            weight (Tensor): ``[n, d]`` original rows.
            codes (Tensor): ``[n, M]`` codes.
            codebooks (Tensor): ``[M, ksub, d / M]``.
            counts (Optional[Tensor]): ``[n]`` lookup counts for the ``weighted_*`` fields.
            chunk_size (int): rows read at once by every metric (bounds their memory).

        Example::

            >>> codes = torch.tensor([[0], [1]], dtype=torch.uint8)
            >>> m = QuantizationMetrics.compute(torch.eye(2), codes, torch.eye(2).view(1, 2, 2))
            >>> m.perplexity, m.distinct_codes, m.mse
            ([2.0], 2, 0.0)
        """
        ksub = codebooks.shape[1]
        perplexity = codebook_perplexity(codes, ksub, chunk_size=chunk_size).tolist()
        # one decoding pass for both weightings (no second pass without counts)
        weightings: list[Tensor | None] = [None] if counts is None else [None, counts]
        errors = _mean_errors(weight, codes, codebooks, weightings, chunk_size)
        return cls(
            ksub=ksub,
            perplexity=perplexity,
            weighted_perplexity=list(perplexity)
            if counts is None
            else codebook_perplexity(codes, ksub, counts, chunk_size).tolist(),
            distinct_codes=distinct_code_tuples(codes),
            mse=errors[0],
            weighted_mse=errors[-1],
        )

    def to_dict(self) -> dict[str, object]:
        """Plain data (JSON-serialisable)."""
        return asdict(self)
