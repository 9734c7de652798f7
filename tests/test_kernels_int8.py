"""The int8 row-wise pooled lookup kernel against fbgemm's lookup and a pure-torch dequantization."""

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from torchrec_compress import RowWiseQuantConfig, RowWiseQuantOverride, compress_
from torchrec_compress.kernels import HAS_KERNELS, int8_pooled_lookup, use_int8_kernel_

pytestmark = pytest.mark.skipif(not HAS_KERNELS, reason="C++ kernels not built")


@pytest.fixture(params=["auto", "generic"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test on the best instruction set of this CPU, then on the portable kernels."""
    yield torch.ops.torchrec_compress.pq_set_kernel_isa(request.param)
    torch.ops.torchrec_compress.pq_set_kernel_isa("auto")


def _int8_model(configs: list[EmbeddingBagConfig], weighted: bool = False) -> nn.Sequential:
    model = nn.Sequential(EmbeddingBagCollection(configs, is_weighted=weighted))
    compress_(model, RowWiseQuantConfig(bits=8))
    return model


def _batch(
    features: dict[str, int], batch: int, gen: torch.Generator, weighted: bool = False
) -> KeyedJaggedTensor:
    """Bags of 0..40 ids (every fifth empty) per feature, ids below the feature's table size."""
    lengths = torch.randint(0, 41, (len(features) * batch,), generator=gen)
    lengths[::5] = 0
    ids = torch.cat(
        [
            torch.randint(rows, (int(lengths[f * batch : (f + 1) * batch].sum()),), generator=gen)
            for f, rows in enumerate(features.values())
        ]
    )
    weights = torch.rand(ids.numel(), generator=gen) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(list(features), ids, lengths, weights=weights)


def _dequantized(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """fbgemm's rows as float: scale * q + bias (the pure-torch reference)."""
    scale = rows[:, 0:2].contiguous().view(torch.float16).float()
    bias = rows[:, 2:4].contiguous().view(torch.float16).float()
    return rows[:, 4 : 4 + dim].float() * scale + bias


@pytest.mark.parametrize("dim", [128, 100, 12, 2])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_kernel_equals_fbgemm_and_torch(
    isa: str, dim: int, pooling: PoolingType, weighted: bool, index_dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(dim)
    config = EmbeddingBagConfig(
        name="t", embedding_dim=dim, num_embeddings=500, feature_names=["f"], pooling=pooling
    )
    model = _int8_model([config], weighted)
    kjt = _batch({"f": 500}, 96, gen, weighted)
    collection: Any = model[0]  # TorchRec's quantized collection; fbgemm ships no stubs
    tbe = collection._emb_modules[0]
    rows = tbe.split_embedding_weights(split_scale_shifts=False)[0][0]
    mean = pooling == PoolingType.MEAN
    weights = kjt.weights_or_none()
    out = int8_pooled_lookup(
        rows, dim, kjt.values().to(index_dtype), kjt.offsets().to(index_dtype), weights, mean
    )
    reference = F.embedding_bag(
        kjt.values(),
        _dequantized(rows, dim),
        kjt.offsets(),
        mode="sum",
        per_sample_weights=weights,
        include_last_offset=True,
    )
    if mean:  # fbgemm's weighted MEAN: the weighted sum over the bag length
        reference = reference / kjt.lengths().clamp(min=1).unsqueeze(1)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, model(kjt).values(), rtol=1e-6, atol=1e-6)


def test_threads_split_bags_without_changing_results() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(256, (3000, 68), dtype=torch.uint8, generator=gen)
    rows[:, :4] = torch.tensor([0.01, -0.5], dtype=torch.float16).view(torch.uint8)
    ids = torch.randint(3000, (20_000,), generator=gen)
    offsets = torch.arange(0, 20_001, 20)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int8_pooled_lookup(rows, 64, ids, offsets)
        torch.set_num_threads(2)
        two = int8_pooled_lookup(rows, 64, ids, offsets)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # a bag's sum is computed by one thread, in one order


def test_out_of_range_ids_and_bad_rows_are_refused() -> None:
    rows = torch.zeros(10, 12, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="id 10 at position 2 is outside"):
        int8_pooled_lookup(rows, 8, torch.tensor([1, 2, 10]), torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="rows must be uint8"):
        int8_pooled_lookup(rows, 9, torch.tensor([1]), torch.tensor([0, 1]))


def test_use_int8_kernel_gives_fbgemms_outputs() -> None:
    gen = torch.Generator().manual_seed(0)
    configs = [
        EmbeddingBagConfig(
            name="a", embedding_dim=64, num_embeddings=300, feature_names=["f", "g"]
        ),
        EmbeddingBagConfig(
            name="b",
            embedding_dim=16,
            num_embeddings=50,
            feature_names=["h"],
            pooling=PoolingType.MEAN,
        ),
    ]
    model = _int8_model(configs)
    kjt = _batch({"f": 300, "g": 300, "h": 50}, 32, gen)
    expected = model(kjt)
    assert use_int8_kernel_(model) == 2  # one TBE per pooling type
    out = model(kjt)
    assert out.keys() == expected.keys()
    torch.testing.assert_close(out.values(), expected.values(), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="outside"):
        model(
            KeyedJaggedTensor.from_lengths_sync(
                ["f", "g", "h"], torch.tensor([0, 1, 50]), torch.tensor([1, 1, 1])
            )
        )


def test_use_int8_kernel_leaves_other_row_types_to_fbgemm() -> None:
    config = EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=20, feature_names=["f"])
    model = nn.Sequential(EmbeddingBagCollection([config]))
    compress_(model, RowWiseQuantConfig(table_overrides={"t": RowWiseQuantOverride(bits=4)}))
    assert use_int8_kernel_(model) == 0
