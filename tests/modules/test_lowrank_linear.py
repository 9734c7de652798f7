"""LowRankLinear and the AFM / SVD factorisations of nn.Linear."""

import torch
from torch import nn

from torchrec_compress import LowRankLinear
from torchrec_compress.methods.lowrank.factors import afm_basis, afm_linear, svd_linear
from torchrec_compress.statistics import LinearOutputCollector


def _layer_and_inputs() -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    # correlated inputs with a non-zero mean, so the outputs have a skewed spectrum
    x = torch.randn(512, 4) @ torch.randn(4, 16) + 0.1 * torch.randn(512, 16) + 2.0
    return layer, x


def _afm(layer: nn.Linear, x: torch.Tensor, rank: int) -> LowRankLinear:
    with LinearOutputCollector({"fc": layer}) as collector:
        layer(x)
    return afm_linear(layer, afm_basis(collector.moments["fc"], "layer 'fc'"), rank)


def test_shapes_and_product() -> None:
    layer = LowRankLinear(in_features=6, rank=2, out_features=5)
    x = torch.randn(3, 6)
    assert (layer.in_features, layer.rank, layer.out_features) == (6, 2, 5)
    torch.testing.assert_close(layer(x), layer.up(layer.down(x)))


def test_afm_full_rank_is_exact() -> None:
    layer, x = _layer_and_inputs()
    torch.testing.assert_close(_afm(layer, x, 12)(x), layer(x), atol=1e-5, rtol=1e-5)


def test_svd_full_rank_is_exact() -> None:
    layer, x = _layer_and_inputs()
    low, kept = svd_linear(layer, 12)
    torch.testing.assert_close(low(x), layer(x), atol=1e-5, rtol=1e-5)
    assert abs(kept - 1.0) < 1e-12


def test_afm_beats_svd_on_data_at_equal_rank() -> None:
    layer, x = _layer_and_inputs()
    y = layer(x).detach()
    afm_err = (_afm(layer, x, 3)(x) - y).pow(2).mean().item()
    svd_err = (svd_linear(layer, 3)[0](x) - y).pow(2).mean().item()
    assert afm_err < 0.5 * svd_err
