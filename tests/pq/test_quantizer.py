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


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="divisor"):
        ProductQuantizer(10, 3, 4)
    pq = ProductQuantizer(8, 2, 4)
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        pq.compute_codes(torch.randn(3, 6))
    with pytest.raises(ValueError, match="weights"):
        pq.train(torch.randn(5, 8), weights=torch.zeros(5))


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
