"""The PQ pooled-lookup kernel of byte codes: long bags, the prefetch window across bags, partial
subspace blocks and threads, against a pure-torch decode (forward and codebook gradient)."""

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from torchrec_compress.kernels import HAS_KERNELS

pytestmark = pytest.mark.skipif(not HAS_KERNELS, reason="C++ kernels not built")


@pytest.fixture(params=["auto", "generic"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test on the best instruction set of this CPU, then on the portable kernels."""
    yield torch.ops.torchrec_compress.pq_set_kernel_isa(request.param)
    torch.ops.torchrec_compress.pq_set_kernel_isa("auto")


def _decoded_lookup(
    codes: torch.Tensor,
    books: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """sum_j w_j * concat_m books[m, codes[ids[j], m]] per bag, in plain torch."""
    num_subspaces, ksub, _ = books.shape
    rows = books[torch.arange(num_subspaces), codes.long()].flatten(1)  # [N, M * dsub]
    return F.embedding_bag(
        ids, rows, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True
    )


# (M, K, dsub): one pass of 16 subspaces (M=16, dsub=8), a partial block (M=20), blocks of 8
# floats of generic words, K below 256 (codes checked, codebooks at a runtime stride), dsub 2, 16.
SHAPES = [(16, 256, 8), (20, 256, 8), (32, 256, 4), (7, 200, 8), (64, 256, 2), (8, 256, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}K{s[1]}d{s[2]}")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_long_and_many_bags_equal_decoded_lookup(
    isa: str, shape: tuple[int, int, int], weighted: bool, index_dtype: torch.dtype
) -> None:
    num_subspaces, ksub, dsub = shape
    gen = torch.Generator().manual_seed(num_subspaces)
    codes = torch.randint(ksub, (5000, num_subspaces), dtype=torch.uint8, generator=gen)
    books = torch.randn(num_subspaces, ksub, dsub, generator=gen, requires_grad=True)
    # bags longer than the prefetch window, short ones and empty ones side by side
    lengths = torch.tensor([300, 0, 1, 70, 0, 0, 2, 129] * 16)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.randint(5000, (int(lengths.sum()),), generator=gen)
    weights = torch.rand(ids.numel(), generator=gen) if weighted else None
    out = torch.ops.torchrec_compress.pq_pooled_lookup(
        codes, books, ids.to(index_dtype), offsets.to(index_dtype), weights
    )
    expected = _decoded_lookup(codes, books, ids, offsets, weights)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    upstream = torch.randn_like(expected)
    grad = torch.ops.torchrec_compress.pq_pooled_lookup_backward(
        upstream, codes, ids.to(index_dtype), offsets.to(index_dtype), weights, ksub
    )
    (expected_grad,) = torch.autograd.grad(expected, books, upstream)
    # a codeword's gradient sums ~100 float32 terms in an order the two sides do not share
    # (autograd's under load: 1.17e-05 off once at atol 1e-05); a wrong term is off by ~1
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=5e-5)


def test_threads_split_bags_without_changing_results() -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(256, (20_000, 16), dtype=torch.uint8, generator=gen)
    books = torch.randn(16, 256, 8, generator=gen)
    ids = torch.randint(20_000, (40_000,), generator=gen)
    offsets = torch.arange(0, 40_001, 20)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.torchrec_compress.pq_pooled_lookup(codes, books, ids, offsets)
        torch.set_num_threads(2)
        two = torch.ops.torchrec_compress.pq_pooled_lookup(codes, books, ids, offsets)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_first_bad_id_or_code_is_named_whatever_bag_it_is_in(isa: str) -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(200, (100, 16), dtype=torch.uint8, generator=gen)
    books = torch.randn(16, 200, 8, generator=gen)
    offsets = torch.tensor([0, 40, 41, 90])
    ids = torch.randperm(100, generator=gen)[:90]  # distinct: no earlier position has the row
    valid = int(ids[60])
    ids[60] = 100
    with pytest.raises(RuntimeError, match="id 100 at position 60 is outside"):
        torch.ops.torchrec_compress.pq_pooled_lookup(codes, books, ids, offsets)
    ids[60] = valid
    codes[ids[45], 3] = 200  # a code past K = 200 in the third bag
    with pytest.raises(RuntimeError, match="at position 45 is outside"):
        torch.ops.torchrec_compress.pq_pooled_lookup(codes, books, ids, offsets)
