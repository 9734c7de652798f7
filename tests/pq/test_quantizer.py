import pytest
import torch

from torchrec_compress.methods.pq import (
    ProductQuantizer,
    assign,
    balanced_subspaces,
    code_dtype,
    codebook_perplexity,
    decode,
    distinct_code_tuples,
    reconstruction_mse,
)
from torchrec_compress.methods.pq import kernels as pq_kernels
from torchrec_compress.methods.pq.quantizer import kmeans_plus_plus


def _exact_table(num_rows: int, d: int, M: int, ksub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows built from codebooks, so that some codes represent every row exactly."""
    gen = torch.Generator().manual_seed(0)
    books = torch.randn(M, ksub, d // M, generator=gen)
    codes = torch.randint(ksub, (num_rows, M), generator=gen)
    return decode(codes, books), books


def test_code_dtype_widens_past_256() -> None:
    assert code_dtype(256) == torch.uint8
    assert code_dtype(257) == torch.int16
    assert code_dtype(2**15 + 1) == torch.int32
    with pytest.raises(ValueError, match="ksub"):
        code_dtype(0)


def test_assign_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    sub, books = torch.randn(3, 50, 4, generator=gen), torch.randn(3, 7, 4, generator=gen)
    codes, dist = assign(sub, books)
    brute = (sub.unsqueeze(2) - books.unsqueeze(1)).pow(2).sum(-1)  # [M, n, K]
    torch.testing.assert_close(codes, brute.argmin(-1))
    torch.testing.assert_close(dist, brute.min(-1).values, atol=1e-4, rtol=1e-4)


def test_exact_codes_decode_exactly() -> None:
    rows, books = _exact_table(200, 8, 4, 16)
    pq = ProductQuantizer(8, 4, 16)
    pq.codebooks = books
    codes = pq.compute_codes(rows)
    assert codes.dtype == torch.uint8 and codes.shape == (200, 4)
    assert torch.equal(pq.decode(codes), rows)


def test_chunked_encode_equals_unchunked() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1000, 16, generator=gen)
    pq = ProductQuantizer(16, 4, 32)
    pq.train(x, niter=3, generator=gen)
    assert torch.equal(pq.compute_codes(x, chunk_size=37), pq.compute_codes(x, chunk_size=1000))


def test_weighted_kmeans_follows_weights() -> None:
    # Two clusters; a single centroid must sit at the weighted mean.
    x = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    pq = ProductQuantizer(2, 1, 1)
    pq.train(x, weights=torch.tensor([3.0, 1.0]), niter=2)
    torch.testing.assert_close(pq.codebooks, torch.tensor([[[2.5, 2.5]]]))


def test_kmeans_recovers_exact_table() -> None:
    rows, _ = _exact_table(400, 4, 2, 4)
    pq = ProductQuantizer(4, 2, 4)
    pq.train(rows, niter=15, generator=torch.Generator().manual_seed(0))
    assert reconstruction_mse(rows, pq.compute_codes(rows), pq.codebooks) < 1e-10


def _rows_wrong(pq: ProductQuantizer, rows: torch.Tensor) -> float:
    """Fraction of rows that the trained quantizer does not reconstruct (codewords are ~1 apart)."""
    return float((pq.decode(pq.compute_codes(rows)) - rows).abs().amax(1).gt(1e-3).float().mean())


@pytest.mark.parametrize(
    ("num_rows", "d", "M", "use_kernel"),
    [(10_000, 8, 4, True), (20_000, 32, 16, True), (4_000, 8, 4, False)],
)
def test_kmeans_recovers_a_table_of_16_codewords_per_subspace(
    num_rows: int, d: int, M: int, use_kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 16: 20 iterations from K random rows left 8-30 % of such rows wrong (two seeds in
    # one codeword's rows, one seed between two); k-means++ seeds one per codeword, and the
    # tolerance stops as soon as nothing moves.
    if not use_kernel:
        monkeypatch.setattr(pq_kernels, "HAS_KERNELS", False)
    rows, _ = _exact_table(num_rows, d, M, 16)
    weights = torch.rand(num_rows, generator=torch.Generator().manual_seed(1)) + 0.5
    for seed in range(3):
        pq = ProductQuantizer(d, M, 16)
        pq.train(rows, weights, generator=torch.Generator().manual_seed(seed))
        assert _rows_wrong(pq, rows) == 0.0
        assert len(pq.iteration_errors) <= 3  # assign, update, nothing changes: stop


def test_kmeans_stops_at_the_tolerance_and_never_gets_worse() -> None:
    gen = torch.Generator().manual_seed(3)
    x, weights = torch.randn(2000, 8, generator=gen), torch.rand(2000, generator=gen)
    runs = {}
    for tol in (1e-1, 1e-3, 0.0):
        pq = ProductQuantizer(8, 2, 32)
        pq.train(x, weights, niter=300, tol=tol, generator=torch.Generator().manual_seed(0))
        errors = pq.iteration_errors
        assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:], strict=False))
        runs[tol] = errors
    assert len(runs[1e-1]) < len(runs[1e-3]) < len(runs[0.0]) < 300
    stop = runs[1e-3]
    assert stop[-2] - stop[-1] <= 1e-3 * stop[-1] < stop[-3] - stop[-2]
    # the error right after assignment equals the one reconstruction_mse measures
    pq = ProductQuantizer(8, 2, 32)
    pq.train(x, weights, niter=5, tol=0.0, generator=torch.Generator().manual_seed(0))
    mse = reconstruction_mse(x, pq.compute_codes(x), pq.codebooks, weights)
    assert pq.iteration_errors[-1] >= mse * 8 * float(weights.sum()) * (1 - 1e-5)


def test_kmeans_is_deterministic_for_a_seed() -> None:
    gen = torch.Generator().manual_seed(4)
    x, weights = torch.randn(3000, 16, generator=gen), torch.rand(3000, generator=gen)
    books = []
    for _ in range(2):
        pq = ProductQuantizer(16, 4, 32)
        pq.train(x, weights, generator=torch.Generator().manual_seed(9))
        books.append(pq.codebooks)
    assert torch.equal(books[0], books[1])


def test_kmeans_plus_plus_seeds_every_distinct_row_first() -> None:
    # 5 distinct rows repeated, 8 seeds: the first 5 seeds are the 5 rows, the rest repeat them
    rows = torch.arange(5.0).repeat(40).view(1, 200, 1)
    seeds = kmeans_plus_plus(rows, torch.ones(200), 8, torch.Generator().manual_seed(0))
    assert sorted(seeds[0, :5, 0].tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert set(seeds[0, 5:, 0].tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    # a zero-weight row is never a seed
    weights = torch.ones(200)
    weights[rows[0, :, 0] == 4.0] = 0.0
    seeds = kmeans_plus_plus(rows, weights, 8, torch.Generator().manual_seed(0))
    assert 4.0 not in seeds.flatten().tolist()


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="divisor"):
        ProductQuantizer(10, 3, 4)
    pq = ProductQuantizer(8, 2, 4)
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        pq.compute_codes(torch.randn(3, 6))
    with pytest.raises(ValueError, match="weights"):
        pq.train(torch.randn(5, 8), weights=torch.zeros(5))
    with pytest.raises(ValueError, match="tol"):
        pq.train(torch.randn(5, 8), tol=-1.0)


def test_metrics() -> None:
    codes = torch.tensor([[0, 0], [1, 0], [2, 0], [3, 0]], dtype=torch.uint8)
    torch.testing.assert_close(
        codebook_perplexity(codes, 4), torch.tensor([4.0, 1.0], dtype=torch.float64)
    )
    weighted = codebook_perplexity(codes, 4, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(weighted, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert distinct_code_tuples(torch.cat([codes, codes])) == 4
    books = torch.zeros(2, 4, 1)
    rows = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert reconstruction_mse(rows, codes, books, chunk_size=3) == pytest.approx(0.25)
    assert reconstruction_mse(rows, codes, books, torch.tensor([1.0, 0, 0, 1])) == pytest.approx(
        0.5
    )


@pytest.mark.parametrize("num_subspaces", [1, 2, 4, 8])
def test_balanced_subspaces_is_a_permutation_with_even_variance_products(
    num_subspaces: int,
) -> None:
    # principal-component-like variances: a steep geometric decay over 16 columns
    variances = torch.logspace(3, -3, 16)
    order = balanced_subspaces(variances, num_subspaces)
    assert sorted(order.tolist()) == list(range(16))
    log_products = variances[order].log().view(num_subspaces, -1).sum(1)
    contiguous = variances.log().view(num_subspaces, -1).sum(1)
    # the spread of per-block products (what sets the largest block's error) shrinks to ~0
    assert float(log_products.max() - log_products.min()) < 1e-3
    if num_subspaces > 1:
        assert float(contiguous.max() - contiguous.min()) > 10


def test_balanced_subspaces_rejects_a_non_divisor() -> None:
    with pytest.raises(ValueError, match="must divide 6"):
        balanced_subspaces(torch.ones(6), 4)
