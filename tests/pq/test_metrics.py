"""Quality metrics of a quantized table: block-wise results equal one-pass ones, memory bounded."""

import pytest
import torch

from torchrec_compress.methods.pq import (
    QuantizationMetrics,
    codebook_perplexity,
    decode,
    distinct_code_tuples,
    reconstruction_mse,
)
from torchrec_compress.methods.pq import metrics as pq_metrics
from torchrec_compress.methods.pq.metrics import code_usage
from torchrec_compress.testing import peak_cpu_allocation


def _one_pass_perplexity(
    codes: torch.Tensor, ksub: int, weights: torch.Tensor | None
) -> torch.Tensor:
    """The formula as it was before blocks: every row at once, int64 offsets, float64 weights."""
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


def _quantized_table(
    num_rows: int, num_subspaces: int, ksub: int, dsub: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, uint8 codes with repeated tuples, codebooks and float64 lookup counts."""
    gen = torch.Generator().manual_seed(0)
    books = torch.randn(num_subspaces, ksub, dsub, generator=gen)
    codes = torch.randint(ksub, (num_rows, num_subspaces), generator=gen).to(torch.uint8)
    codes[num_rows // 2 :] = codes[: num_rows - num_rows // 2]  # duplicate tuples
    rows = decode(codes, books) + 0.1 * torch.randn(num_rows, num_subspaces * dsub, generator=gen)
    counts = torch.randint(0, 50, (num_rows,), generator=gen).double() * 0.37
    return rows, codes, books, counts


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_metrics_equal_unchunked(chunk_size: int) -> None:
    rows, codes, books, counts = _quantized_table(1000, 4, 16)
    chunked = QuantizationMetrics.compute(rows, codes, books, counts, chunk_size=chunk_size)
    whole = QuantizationMetrics.compute(rows, codes, books, counts, chunk_size=len(rows))
    # Usage sums run in row order whatever the blocks: bit-identical perplexities.
    assert chunked.perplexity == whole.perplexity
    assert chunked.weighted_perplexity == whole.weighted_perplexity
    assert chunked.perplexity == _one_pass_perplexity(codes, 16, None).tolist()
    assert chunked.weighted_perplexity == _one_pass_perplexity(codes, 16, counts).tolist()
    assert chunked.distinct_codes == whole.distinct_codes == torch.unique(codes, dim=0).shape[0]
    # Float sums of per-block partial sums: equal up to rounding.
    assert chunked.mse == pytest.approx(whole.mse, rel=1e-12)
    assert chunked.weighted_mse == pytest.approx(whole.weighted_mse, rel=1e-12)
    # one decoding pass for both weightings: the figures of two separate passes
    assert chunked.mse == reconstruction_mse(rows, codes, books, chunk_size=chunk_size)
    assert chunked.weighted_mse == reconstruction_mse(rows, codes, books, counts, chunk_size)
    error = (decode(codes, books) - rows).pow(2).mean(1).double()
    assert whole.weighted_mse == pytest.approx(float((error * counts).sum() / counts.sum()))


def test_metrics_without_counts_weigh_rows_equally() -> None:
    rows, codes, books, _ = _quantized_table(300, 2, 8)
    metrics = QuantizationMetrics.compute(rows, codes, books, chunk_size=50)
    assert metrics.weighted_perplexity == metrics.perplexity
    assert metrics.weighted_perplexity is not metrics.perplexity
    assert (
        metrics.weighted_mse
        == metrics.mse
        == pytest.approx(
            reconstruction_mse(rows, codes, books, torch.ones(300), chunk_size=50), rel=1e-12
        )
    )


@pytest.mark.parametrize(
    "num_subspaces,dtype",
    [(3, torch.uint8), (8, torch.uint8), (16, torch.uint8), (4, torch.int16), (3, torch.int32)],
    ids=["3B-padded", "8B-int64", "16B-bytes", "int16", "int32-12B"],
)
def test_distinct_code_tuples_matches_unique_rows(num_subspaces: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    high = 3 if dtype == torch.uint8 else 40_000 if dtype == torch.int32 else 300
    codes = torch.randint(high, (400, num_subspaces), generator=gen).to(dtype)
    codes = torch.cat([codes, codes[::3]])  # repeats, spread over the blocks
    want = torch.unique(codes, dim=0).shape[0]
    assert distinct_code_tuples(codes, num_parts=3) == want
    assert distinct_code_tuples(codes, num_parts=1) == want
    assert distinct_code_tuples(codes.t().contiguous().t()) == want  # column-major codes
    assert distinct_code_tuples(codes[:0]) == 0


def test_perplexity_memory_does_not_grow_with_rows() -> None:
    """A 20M-row table made int64 and float64 copies of all N x M codes (about 4 GB at M = 8)."""
    num_rows, num_subspaces = 1_000_000, 8  # blocks of DEFAULT_CHUNK_ROWS = 65536 rows
    codes = torch.randint(256, (num_rows, num_subspaces), dtype=torch.uint8)
    counts = torch.rand(num_rows, dtype=torch.float64)
    int64_codes = num_rows * num_subspaces * 8
    for weights in (None, counts):
        peak, perplexity = peak_cpu_allocation(lambda w=weights: codebook_perplexity(codes, 256, w))
        assert peak < int64_codes / 4, f"{peak} bytes for weights={type(weights).__name__}"
        assert torch.equal(perplexity, _one_pass_perplexity(codes, 256, weights))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_code_usage_counts_every_column(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of rows counted with one bincount each give the per-column bincounts."""
    monkeypatch.setattr(pq_metrics, "_USAGE_BLOCK_KEYS", 20)  # blocks of 5 rows, a partial last one
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 7, (23, 4), generator=gen).to(dtype)
    want = torch.stack([torch.bincount(col.long(), minlength=9) for col in codes.T]).double()
    assert torch.equal(code_usage(codes, 9), want)
    assert torch.equal(code_usage(codes.t().contiguous().t(), 9), want)  # column-major
    assert torch.equal(code_usage(codes[:0], 9), torch.zeros(4, 9, dtype=torch.float64))
