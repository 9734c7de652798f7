"""bf16 / fp16 collections of every method pool to float32, like TorchRec's EmbeddingBagCollection.

TorchRec's collection stores a table whose ``EmbeddingBagConfig.data_type`` is not FP32 in fp16
(``BF16`` included) and casts every pooled output to float32; a model cast with ``.to(dtype)``
keeps bf16 / fp16 rows and float32 outputs.  MEC / PQ collections cast to bf16 returned bf16,
AFM at a packed rank raised (float32 slot weights against fp16 rows) and int8 of a bf16 table
raised inside fbgemm's quantizer.
"""

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress import (
    AFMConfig,
    MECConfig,
    MECTraining,
    PQConfig,
    RowWiseQuantConfig,
    SVDConfig,
    compress_,
)
from torchrec_compress.config import CompressionConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = 300
METHODS: dict[str, list[CompressionConfig]] = {
    "afm": [AFMConfig(rank=4)],
    "afm_k2_packed": [AFMConfig(rank=2)],
    "svd": [SVDConfig(rank=4)],
    "mec": [MECConfig(num_subspaces=4, num_centroids=16, training=MECTraining(steps=2))],
    "pq": [PQConfig(num_subspaces=4, num_centroids=16)],
    "int8": [RowWiseQuantConfig(bits=8)],
    "afm+int8": [AFMConfig(rank=4), RowWiseQuantConfig(bits=8)],
    "afm+mec": [
        AFMConfig(rank=4),
        MECConfig(num_subspaces=2, num_centroids=16, training=MECTraining(steps=2)),
    ],
}


def _collection(data_type: DataType) -> nn.Sequential:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}",
            embedding_dim=16,
            num_embeddings=ROWS,
            feature_names=[f"f{i}"],
            data_type=data_type,
            pooling=pooling,
        )
        for i, pooling in enumerate((PoolingType.SUM, PoolingType.MEAN))
    ]
    return nn.Sequential(EmbeddingBagCollection(tables))


def _features() -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 4, (2 * 20,), generator=g)
    values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(keys=["f0", "f1"], values=values, lengths=lengths)


def _compressed(configs: list[CompressionConfig], model: nn.Sequential) -> nn.Sequential:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tables kept by MEC's K, not what this test is about
        for config in configs:
            compress_(model, config, calibration=[_features()])
    return model


def _pooled(model: nn.Sequential) -> torch.Tensor:
    with torch.no_grad():
        return model[0](_features()).values()


# how a user gets half-precision tables: TorchRec's table configs, or casting the model
# (before compressing it, or the compressed model, e.g. for serving)
ROUTES: dict[str, Callable[[list[CompressionConfig]], nn.Sequential]] = {
    "config_fp16": lambda c: _compressed(c, _collection(DataType.FP16)),
    "config_bf16": lambda c: _compressed(c, _collection(DataType.BF16)),
    "bf16_then_compressed": lambda c: _compressed(c, _collection(DataType.FP32).to(torch.bfloat16)),
    "compressed_then_bf16": lambda c: _compressed(c, _collection(DataType.FP32)).to(torch.bfloat16),
    "compressed_then_fp16": lambda c: _compressed(c, _collection(DataType.FP32)).to(torch.float16),
}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("method", list(METHODS))
def test_half_precision_collections_pool_to_float32(method: str, route: str) -> None:
    reference = _collection(DataType.FP32)
    assert _pooled(reference).dtype == torch.float32
    model = ROUTES[route](METHODS[method])
    assert type(model[0]) is not EmbeddingBagCollection  # compressed
    got = _pooled(model)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    if route.startswith("compressed_then"):  # the same compressed rows, rounded
        expected = _pooled(_compressed(METHODS[method], _collection(DataType.FP32)))
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, atol=0.02 * scale, rtol=0)
