import os
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress.methods.lowrank import kernels as _lowrank_ops  # registers its fake impl
from torchrec_compress.methods.pq import ProductQuantizer, assign, decode
from torchrec_compress.methods.pq import kernels as _ops
from torchrec_compress.methods.pq.lookup import pq_pooled_lookup
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection

needs_kernels = pytest.mark.skipif(not _ops.HAS_KERNELS, reason="C++ kernels not built")


@pytest.fixture(params=["auto", "generic"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test on the best instruction set of this CPU, then on the portable kernels."""
    if not _ops.HAS_KERNELS:
        pytest.skip("C++ kernels not built")
    yield torch.ops.torchrec_compress.pq_set_kernel_isa(request.param)
    torch.ops.torchrec_compress.pq_set_kernel_isa("auto")


def _bags(num_rows: int, num_bags: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of 0..6 ids (some empty), as ids and include-last offsets."""
    lengths = torch.randint(0, 7, (num_bags,), generator=gen)
    lengths[::5] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return torch.randint(num_rows, (int(lengths.sum()),), generator=gen), offsets


def _torch_lookup(
    monkeypatch: pytest.MonkeyPatch, *args: torch.Tensor | None
) -> torch.Tensor:  # the fallback, whatever is built
    with monkeypatch.context() as patch:
        patch.setattr(_ops, "HAS_KERNELS", False)
        return pq_pooled_lookup(*args)


# (M, K, dsub, code dtype): every templated subspace width (2, 4, 8, 16), the generic widths
# (1, 3), partial subspace blocks (M=9 with dsub=8), and codes that need range checks.
SHAPES = [
    (16, 256, 8, torch.uint8),
    (9, 256, 8, torch.uint8),
    (4, 16, 2, torch.uint8),
    (3, 40, 4, torch.uint8),
    (2, 256, 16, torch.uint8),
    (5, 7, 1, torch.int32),
    (3, 300, 3, torch.int16),
]


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}K{s[1]}d{s[2]}{s[3]}")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_kernel_lookup_and_gradients_equal_torch_path(
    isa: str,
    shape: tuple[int, int, int, torch.dtype],
    weighted: bool,
    index_dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    num_subspaces, ksub, dsub, dtype = shape
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(ksub, (300, num_subspaces), generator=gen).to(dtype)
    books = torch.randn(num_subspaces, ksub, dsub, generator=gen)
    ids, offsets = _bags(300, 64, gen)
    ids, offsets = ids.to(index_dtype), offsets.to(index_dtype)
    weights = torch.rand(ids.numel(), generator=gen) if weighted else None
    upstream = torch.randn(64, num_subspaces * dsub, generator=gen)
    results = []
    for use_kernel in (True, False):
        leaf_books = books.clone().requires_grad_()
        leaf_weights = None if weights is None else weights.clone().requires_grad_()
        args = (codes, leaf_books, ids, offsets, leaf_weights)
        if use_kernel:
            assert _ops.lookup_kernel_applies(*args)
            out = pq_pooled_lookup(*args)
        else:
            out = _torch_lookup(monkeypatch, *args)
        (out * upstream).sum().backward()
        results.append((out, leaf_books.grad, None if weights is None else leaf_weights.grad))
    (kernel_out, kernel_gb, kernel_gw), (torch_out, torch_gb, torch_gw) = results
    torch.testing.assert_close(kernel_out, torch_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kernel_gb, torch_gb, atol=1e-6, rtol=1e-6)
    if weighted:
        torch.testing.assert_close(kernel_gw, torch_gw, atol=1e-5, rtol=1e-6)
    assert kernel_out[offsets[1:] == offsets[:-1]].abs().sum() == 0  # empty bags are zeros


@needs_kernels
def test_kernel_is_used_and_rejects_out_of_range_ids_and_codes(isa: str) -> None:
    codes, books = torch.zeros(10, 2, dtype=torch.uint8), torch.zeros(2, 16, 4)
    offsets = torch.tensor([0, 2, 3])
    op = torch.ops.torchrec_compress.pq_pooled_lookup
    with pytest.raises(RuntimeError, match=r"id 10 at position 2 is outside \[0, 10\)"):
        op(codes, books, torch.tensor([1, 2, 10]), offsets)
    with pytest.raises(RuntimeError, match=r"id -1 at position 0"):
        op(codes, books, torch.tensor([-1, 2, 3]), offsets)
    bad_codes = codes.clone()
    bad_codes[7, 1] = 16  # K = 16
    with pytest.raises(RuntimeError, match=r"id 7 at position 1 .* codes are outside \[0, 16\)"):
        op(bad_codes, books, torch.tensor([1, 7, 3]), offsets)
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        op(codes, books, torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1, 3]))
    with pytest.raises(RuntimeError, match=r"offsets must lie in \[0, 3\]"):
        op(codes, books, torch.tensor([1, 2, 3]), torch.tensor([0, 4]))


@needs_kernels
def test_ops_pass_opcheck() -> None:
    """Schemas, fake (meta) kernels and autograd registration agree with the CPU kernels."""
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(16, (20, 4), generator=gen, dtype=torch.uint8)
    books = torch.randn(4, 16, 2, generator=gen, requires_grad=True)
    ids, offsets = _bags(20, 8, gen)
    weights = torch.rand(ids.numel(), generator=gen, requires_grad=True)
    ops = torch.ops.torchrec_compress
    torch.library.opcheck(ops.pq_pooled_lookup, (codes, books, ids, offsets, weights))
    torch.library.opcheck(ops.pq_pooled_lookup, (codes, books, ids, offsets))
    grad = torch.randn(8, 8, generator=gen)
    torch.library.opcheck(ops.pq_pooled_lookup_backward, (grad, codes, ids, offsets, None, 16))
    torch.library.opcheck(ops.pq_encode, (torch.randn(6, 8), books.detach(), torch.int16))


@needs_kernels
def test_op_traces_with_torch_fx() -> None:
    class Pool(torch.nn.Module):
        def forward(
            self, codes: torch.Tensor, books: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor
        ) -> torch.Tensor:
            return torch.ops.torchrec_compress.pq_pooled_lookup(codes, books, ids, offsets)

    traced = torch.fx.symbolic_trace(Pool())
    assert "torchrec_compress.pq_pooled_lookup" in traced.code
    codes, books = (
        torch.tensor([[1, 0], [0, 1]], dtype=torch.uint8),
        torch.arange(8.0).view(2, 2, 2),
    )
    ids, offsets = torch.tensor([0, 1]), torch.tensor([0, 1, 2])
    torch.testing.assert_close(
        traced(codes, books, ids, offsets), pq_pooled_lookup(codes, books, ids, offsets)
    )


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("pooling,weighted", [(PoolingType.SUM, True), (PoolingType.MEAN, False)])
def test_module_forward_and_backward_match_decoded_embedding_bag(
    use_kernels: bool, pooling: PoolingType, weighted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if use_kernels and not _ops.HAS_KERNELS:
        pytest.skip("C++ kernels not built")
    monkeypatch.setattr(_ops, "HAS_KERNELS", use_kernels)
    gen = torch.Generator().manual_seed(2)
    table = EmbeddingBagConfig(
        name="t", embedding_dim=32, num_embeddings=100, feature_names=["f"], pooling=pooling
    )
    codes = torch.randint(256, (100, 4), generator=gen, dtype=torch.uint8)
    books = torch.randn(4, 256, 8, generator=gen)
    ebc = PQEmbeddingBagCollection([table], {"t": codes}, {"t": books}, is_weighted=weighted)
    ids, offsets = _bags(100, 16, gen)
    weights = torch.rand(ids.numel(), generator=gen) if weighted else None
    kjt = KeyedJaggedTensor.from_offsets_sync(["f"], ids, offsets, weights)
    upstream = torch.randn(16, 32, generator=gen)
    (ebc(kjt).values() * upstream).sum().backward()
    ref_books = books.clone().requires_grad_()
    want = F.embedding_bag(
        ids,
        decode(codes, ref_books),
        offsets,
        mode="mean" if pooling == PoolingType.MEAN else "sum",
        include_last_offset=True,
        per_sample_weights=weights,
    )
    (want * upstream).sum().backward()
    torch.testing.assert_close(ebc(kjt).values(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        ebc.codebooks["t"].grad.view_as(ref_books), ref_books.grad, atol=1e-6, rtol=1e-6
    )


def _nearest_distances(x: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Brute-force ``[n, M]`` squared distance to the nearest codeword of each subspace."""
    num_subspaces, _, dsub = books.shape
    sub = x.view(x.shape[0], num_subspaces, 1, dsub)
    return (sub - books.unsqueeze(0)).pow(2).sum(-1).min(-1).values


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}K{s[1]}d{s[2]}{s[3]}")
def test_encode_kernel_finds_nearest_codewords(
    isa: str, shape: tuple[int, int, int, torch.dtype]
) -> None:
    num_subspaces, ksub, dsub, dtype = shape
    gen = torch.Generator().manual_seed(3)
    books = torch.randn(num_subspaces, ksub, dsub, generator=gen)
    x = torch.randn(203, num_subspaces * dsub, generator=gen)  # 203: a partial 4-row tail
    codes = torch.ops.torchrec_compress.pq_encode(x, books, dtype)
    assert codes.dtype == dtype and codes.shape == (203, num_subspaces)
    reference = assign(x.view(203, num_subspaces, dsub).transpose(0, 1), books)[0].t()
    # Same formula as the torch path; rounding may only flip exact near-ties.
    assert (codes.long() != reference).float().mean() < 0.01
    chosen = (x - decode(codes, books)).view(203, num_subspaces, dsub).pow(2).sum(-1)
    torch.testing.assert_close(chosen, _nearest_distances(x, books), atol=1e-5, rtol=1e-5)
    # Strided rows (a column slice of a wider table) are read in place.
    wide = torch.cat([x, torch.randn(203, 5, generator=gen)], dim=1)[:, : x.shape[1]]
    assert torch.equal(torch.ops.torchrec_compress.pq_encode(wide, books, dtype), codes)


@needs_kernels
def test_encode_kernel_breaks_ties_like_argmin(isa: str) -> None:
    books = torch.zeros(1, 20, 2)  # 20 identical codewords, then a better one at index 13
    books[0, 13] = 1.0
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert torch.ops.torchrec_compress.pq_encode(x, books, torch.uint8).tolist() == [[0], [13]]


def _encode_on(isa: str, x: torch.Tensor, books: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    ops = torch.ops.torchrec_compress
    ops.pq_set_kernel_isa(isa)
    try:
        return ops.pq_encode(x, books, dtype)
    finally:
        ops.pq_set_kernel_isa("auto")


def _supported_isas() -> list[str]:
    """The instruction sets of this CPU, portable first (the ones ``pq_set_kernel_isa`` takes)."""
    best = torch.ops.torchrec_compress.pq_set_kernel_isa("auto")
    order = ["generic", "avx2", "avx512"]
    return order[: order.index(best) + 1]


ENCODE_SHAPES = [
    (3, 256, 4, torch.uint8),
    (2, 7, 1, torch.uint8),
    (4, 9, 2, torch.uint8),
    (3, 20, 4, torch.int32),
    (2, 33, 8, torch.uint8),
    (2, 100, 16, torch.int16),
    (3, 300, 4, torch.int16),
    (2, 24, 3, torch.uint8),
    (2, 40, 5, torch.int32),
    (1, 1, 4, torch.uint8),
]


@needs_kernels
@pytest.mark.parametrize("shape", ENCODE_SHAPES, ids=lambda s: f"M{s[0]}K{s[1]}d{s[2]}{s[3]}")
def test_encode_kernel_gives_the_same_codes_on_every_isa(
    shape: tuple[int, int, int, torch.dtype],
) -> None:
    """Every instruction set finds the same codes, the first codeword on ties included: exactly
    on small integers (every product and sum is exact, so fused and unfused arithmetic agree, and
    ties are everywhere), and on random floats between the fused paths (AVX2 and AVX-512 compute
    each distance with the same operations in the same order)."""
    num_subspaces, ksub, dsub, dtype = shape
    gen = torch.Generator().manual_seed(ksub * 31 + dsub)
    rows = 197  # a partial 4-row group and a partial 64-row block
    isas = _supported_isas()
    books = torch.randint(-2, 3, (num_subspaces, ksub, dsub), generator=gen).float()
    books[:, ksub // 2 :] = books[:, : ksub - ksub // 2]  # duplicated codewords: exact ties
    x = torch.randint(-3, 4, (rows, num_subspaces * dsub), generator=gen).float()
    x[:5] = 0.0  # every codeword of norm 0 ties with the first
    want = _encode_on("generic", x, books, dtype)
    reference = assign(x.view(rows, num_subspaces, dsub).transpose(0, 1), books)[0].t()
    assert torch.equal(want.long(), reference)  # torch.argmin: the first index on ties
    for isa in isas[1:]:
        assert torch.equal(_encode_on(isa, x, books, dtype), want), isa
    fused = isas[1:]
    if len(fused) < 2:
        return
    books = torch.randn(num_subspaces, ksub, dsub, generator=gen)
    books[:, ksub // 2 :] = books[:, : ksub - ksub // 2]
    x = torch.randn(rows, num_subspaces * dsub, generator=gen)
    x[0, 0] = float("nan")
    x[1] = float("inf")
    x[2, -1] = -float("inf")
    codes = [_encode_on(isa, x, books, dtype) for isa in fused]
    for isa, other in zip(fused[1:], codes[1:], strict=True):
        assert torch.equal(other, codes[0]), isa
    strided = torch.cat([x, torch.randn(rows, 3, generator=gen)], dim=1)[:, : x.shape[1]]
    for isa, other in zip(fused, codes, strict=True):
        assert torch.equal(_encode_on(isa, strided, books, dtype), other), isa


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compute_codes_paths_agree(
    use_kernels: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    if use_kernels and not _ops.HAS_KERNELS:
        pytest.skip("C++ kernels not built")
    gen = torch.Generator().manual_seed(4)
    pq = ProductQuantizer(16, 4, 32)
    pq.codebooks = torch.randn(4, 32, 4, generator=gen)
    # Rows near known codewords: every path must find exactly those codes.
    want = torch.randint(32, (500, 4), generator=gen)
    x = (decode(want, pq.codebooks) + 1e-3 * torch.randn(500, 16, generator=gen)).to(dtype)
    monkeypatch.setattr(_ops, "HAS_KERNELS", use_kernels)
    assert torch.equal(pq.compute_codes(x, chunk_size=37).long(), want)
    assert torch.equal(pq.compute_codes(x.t().contiguous().t()).long(), want)  # column-major


def test_kernel_isa_switch() -> None:
    if not _ops.HAS_KERNELS:
        pytest.skip("C++ kernels not built")
    ops = torch.ops.torchrec_compress
    best = ops.pq_set_kernel_isa("auto")
    assert best in ("avx512", "avx2", "generic") and ops.pq_kernel_isa() == best
    assert ops.pq_set_kernel_isa("generic") == "generic" == ops.pq_kernel_isa()
    for isa in _supported_isas():
        assert ops.pq_set_kernel_isa(isa) == isa == ops.pq_kernel_isa()
    for isa in ("avx2", "avx512")[len(_supported_isas()) - 1 :]:
        with pytest.raises(RuntimeError, match="this CPU lacks"):
            ops.pq_set_kernel_isa(isa)
    with pytest.raises(
        RuntimeError, match="expected 'auto', 'generic', 'avx2' or 'avx512', got 'sse9'"
    ):
        ops.pq_set_kernel_isa("sse9")
    assert ops.pq_set_kernel_isa("auto") == best


def test_kernels_are_built_where_required() -> None:
    """``make test`` builds the extension and sets TORCHREC_COMPRESS_REQUIRE_KERNELS=1, so a
    broken build fails CI instead of silently skipping every kernel test."""
    if os.environ.get("TORCHREC_COMPRESS_REQUIRE_KERNELS") != "1":
        pytest.skip("kernels not required in this environment")
    assert _ops.HAS_KERNELS, "torchrec_compress._C was not built (see pip's build output)"


@needs_kernels
@pytest.mark.parametrize("isa", ["auto", "generic"])
@pytest.mark.parametrize("k", [4, 8, 12, 20, 32, 36, 40, 64, 68, 120, 128, 132])
def test_lowrank_pooled_lookup_matches_embedding_bag(isa: str, k: int) -> None:
    # every register-blocked width of both instruction sets, and the scalar fallback (k > 128)
    gen = torch.Generator().manual_seed(k)
    table = torch.randn(50, k, generator=gen)
    ids, offsets = _bags(50, 12, gen)
    weights = torch.rand(ids.numel(), generator=gen)
    lengths = (offsets[1:] - offsets[:-1]).float()
    op = torch.ops.torchrec_compress.lowrank_pooled_lookup
    torch.ops.torchrec_compress.pq_set_kernel_isa(isa)
    try:
        for per_sample_weights in (None, weights):
            pooled = F.embedding_bag(
                ids,
                table,
                offsets,
                mode="sum",
                include_last_offset=True,
                per_sample_weights=per_sample_weights,
            )
            coef = (
                lengths
                if per_sample_weights is None
                else torch.zeros(12).index_add_(
                    0, torch.repeat_interleave(torch.arange(12), lengths.long()), weights
                )
            )
            for mean in (False, True):
                scale = 1 / lengths.clamp(min=1) if mean else torch.ones(12)
                out = op(table, ids, offsets, per_sample_weights, mean)
                assert out.shape == (12, k + 1)
                torch.testing.assert_close(out[:, :k], pooled * scale[:, None])
                torch.testing.assert_close(out[:, k], coef * scale)
    finally:
        torch.ops.torchrec_compress.pq_set_kernel_isa("auto")


@needs_kernels
def test_lowrank_pooled_lookup_checks_ids_and_passes_opcheck() -> None:
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(20, 8, generator=gen)
    ids, offsets = _bags(20, 6, gen)
    assert _lowrank_ops.HAS_KERNELS  # the module registering the op's fake impl is loaded
    op = torch.ops.torchrec_compress.lowrank_pooled_lookup
    with pytest.raises(RuntimeError, match=r"id 20 at position 1 is outside \[0, 20\)"):
        op(table, torch.tensor([3, 20, 1]), torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        op(table, torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1, 3]))
    torch.library.opcheck(op, (table, ids, offsets, torch.rand(ids.numel(), generator=gen), True))
    torch.library.opcheck(op, (table, ids.int(), offsets.int()))
