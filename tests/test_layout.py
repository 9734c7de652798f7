"""Compression layouts: describe a compressed DLRM as JSON, rebuild it on an uncompressed one.

For every method and chain (AFM with MLP layers, SVD, PQ, MEC, AFM+PQ, AFM x int8, AFM x fp16,
int8 and fp16 tables), the layout of the compressed model, through JSON, turns a freshly built
uncompressed DLRM into one whose state dict takes the compressed state strictly and whose
outputs equal the compressed model's.
"""

import json
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchrec.datasets.utils import Batch

from torchrec_compress.api import compress_
from torchrec_compress.config import CompressionConfig
from torchrec_compress.layout import CompressionLayout, compression_layout, restore_layout_
from torchrec_compress.methods.lowrank.config import AFMConfig, SVDConfig
from torchrec_compress.methods.pq.config import MECConfig, MECTraining, PQConfig
from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig
from torchrec_compress.testing.models import tiny_batch, tiny_dlrm

CPU = torch.device("cpu")
EBC = "model.sparse_arch.embedding_bag_collection"
AFM = AFMConfig(rank=8, linear=True, linear_rank=8, keep_mlp_ends=False)
PQ = PQConfig(num_subspaces=4, num_centroids=16, popularity_weighting=False)
MEC = MECConfig(
    num_subspaces=4, num_centroids=16, popularity_weighting=False, training=MECTraining(steps=2)
)

CHAINS: dict[str, list[CompressionConfig]] = {
    "afm_linear": [AFM],
    "svd": [SVDConfig(rank=4)],
    "afm_k2_packed": [AFMConfig(rank=2, rank_multiple=1)],
    "pq": [PQ],
    "mec": [MEC],
    "afm+pq": [AFMConfig(rank=8), PQConfig(num_subspaces=2, num_centroids=16)],
    "afm+int8": [AFMConfig(rank=8), RowWiseQuantConfig(bits=8)],
    "afm+fp16": [AFMConfig(rank=8), RowWiseQuantConfig(bits=16)],
    "int8": [RowWiseQuantConfig(bits=8)],
    "fp16": [RowWiseQuantConfig(bits=16)],
}
KINDS = {
    "afm_linear": "lowrank",
    "svd": "lowrank",
    "afm_k2_packed": "lowrank",
    "pq": "pq",
    "mec": "pq",
    "afm+pq": "composite",
    "afm+int8": "composite",
    "afm+fp16": "lowrank",
    "int8": "rowwise_quant",
    "fp16": "rowwise_quant",
}


def _forward(model: nn.Module, batch: Batch) -> object:
    return model(batch)


def _compressed(configs: list[CompressionConfig]) -> nn.Module:
    model = tiny_dlrm(CPU, dim=16, seed=3)
    calibration = [tiny_batch(32, seed=100 + i) for i in range(2)]
    for config in configs:
        compress_(model, config, calibration=calibration, forward_fn=_forward)
    return model


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch)[1][1]


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_layout_rebuilds_every_method_on_an_uncompressed_dlrm(chain: str) -> None:
    configs = CHAINS[chain]
    compressed = _compressed(configs)
    data = json.loads(json.dumps(compression_layout(compressed, configs).to_dict()))
    layout = CompressionLayout.from_dict(data)
    entry = layout.modules[EBC]
    assert entry["kind"] == KINDS[chain]
    assert entry["config"]["class"] == type(configs[0]).__name__
    assert [type(c) for c in layout.configs] == [type(c) for c in configs]
    if chain == "afm+pq":
        assert entry["ranks"] == {"t_f0": 8, "t_f1": 8, "t_f2": 8}
        factors = entry["factors"]
        assert factors["kind"] == "pq" and factors["config"]["class"] == "PQConfig"
        assert factors["tables"]["t_f0"] == {"num_subspaces": 2, "num_centroids": 16}
    if chain == "afm_linear":
        linears = {p: e for p, e in layout.modules.items() if e["kind"] == "lowrank_linear"}
        assert linears and all(e["rank"] == 8 for e in linears.values())
    if chain == "int8":
        assert set(entry["data_types"].values()) == {"INT8"} and entry["kept"] == []

    rebuilt = restore_layout_(tiny_dlrm(CPU, dim=16, seed=9), layout, device=CPU)
    rebuilt.load_state_dict(compressed.state_dict(), strict=True)
    batch = tiny_batch(16, seed=7)
    assert torch.equal(_logits(rebuilt, batch), _logits(compressed, batch))


def test_uncompressed_model_has_an_empty_layout() -> None:
    layout = compression_layout(tiny_dlrm(CPU, dim=16))
    assert not layout and layout.to_dict()["modules"] == {}
    model = restore_layout_(tiny_dlrm(CPU, dim=16), layout)
    assert type(model.get_submodule(EBC)).__name__ == "EmbeddingBagCollection"


def _bad_layouts() -> dict[str, tuple[Callable[[], object], str]]:
    lowrank = {"kind": "lowrank", "ranks": {"t_f0": 4}}
    return {
        "already compressed": (
            lambda: restore_layout_(
                _compressed([SVDConfig(rank=4)]), CompressionLayout({EBC: lowrank})
            ),
            f"layout of {EBC!r}: a lowrank collection replaces an EmbeddingBagCollection, "
            "found LowRankEmbeddingBagCollection",
        ),
        "missing path": (
            lambda: restore_layout_(tiny_dlrm(CPU), CompressionLayout({"model.nope": lowrank})),
            "names module 'model.nope', which the model (DLRMTrain) does not have",
        ),
        "unknown table": (
            lambda: restore_layout_(
                tiny_dlrm(CPU), CompressionLayout({EBC: {"kind": "lowrank", "ranks": {"t_x": 4}}})
            ),
            "names table(s) ['t_x'] that it does not hold",
        ),
        "rank too large": (
            lambda: restore_layout_(
                tiny_dlrm(CPU), CompressionLayout({EBC: {"kind": "lowrank", "ranks": {"t_f0": 99}}})
            ),
            "table 't_f0': rank 99 is invalid",
        ),
        "unknown kind": (
            lambda: CompressionLayout.from_dict({"modules": {EBC: {"kind": "zip"}}}),
            f"module {EBC!r} has kind 'zip'",
        ),
        "version": (
            lambda: CompressionLayout.from_dict({"version": 99, "modules": {}}),
            "compression layout version 99 is not supported",
        ),
        "config class": (
            lambda: CompressionLayout.from_dict({"configs": [{"class": "Nope", "options": {}}]}),
            "unknown config class 'Nope'",
        ),
    }


@pytest.mark.parametrize("case", sorted(_bad_layouts()))
def test_bad_layouts_name_the_module_and_value(case: str) -> None:
    make, message = _bad_layouts()[case]
    with pytest.raises(ValueError) as error:
        make()
    assert message in str(error.value)
