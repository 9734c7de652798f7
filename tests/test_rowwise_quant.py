"""compress_ with RowWiseQuantConfig: a third method registered through ``torchrec_compress.registry`` alone.

On torchrec's DLRM: int8 / int4 / int2 outputs close to float, exact report bytes, the same
outputs as TorchRec's own serving conversion, kept and skipped tables, atomic failure; AFM then
int8 of the factor tables (fine-tuning around frozen rows); and TorchRec's planner sizing an
int8 factor table of k = 16 (from a 128-dim table) at 20 bytes per row on a meta model.
"""

import copy
import doctest
import io
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.planner import Topology
from torchrec.inference.modules import quantize_embeddings
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.tensor_types import UInt2Tensor, UInt4Tensor

from torchrec_compress.api import compress_
from torchrec_compress.distributed import planning
from torchrec_compress.distributed.planning import plan_storage
from torchrec_compress.methods.lowrank.config import AFMConfig
from torchrec_compress.methods.lowrank.module import LowRankEmbeddingBagCollection
from torchrec_compress.methods.rowwise_quant import quantize as rowwise_quant
from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig, RowWiseQuantOverride
from torchrec_compress.methods.rowwise_quant.method import RowWiseQuantMethod
from torchrec_compress.registry import method_of

ROWS = {"t0": 300, "t1": 120, "t2": 40}
DIM = 16
TORCH_DTYPES = {8: torch.qint8, 4: torch.quint4x2, 2: torch.quint2x4}
# max |logit error| / max |logit| of the quantized DLRM: about 5x what was measured (0.0003,
# 0.006, 0.026)
TOLERANCE = {8: 0.002, 4: 0.03, 2: 0.12}


# one intra-op thread for every test of this module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _dlrm() -> DLRM:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(
            name=n,
            embedding_dim=DIM,
            num_embeddings=r,
            feature_names=[f"f{i}"],
            pooling=PoolingType.MEAN if n == "t1" else PoolingType.SUM,
        )
        for i, (n, r) in enumerate(ROWS.items())
    ]
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables),
        dense_in_features=4,
        dense_arch_layer_sizes=[16, DIM],
        over_arch_layer_sizes=[16, 1],
    )


def _batches(num: int = 3, batch_size: int = 32) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    limits = torch.tensor(list(ROWS.values())).repeat_interleave(batch_size)
    out = []
    for _ in range(num):
        lengths = torch.randint(0, 4, (3 * batch_size,), generator=g)
        u = torch.rand(int(lengths.sum()), generator=g)
        ids = (u**3 * limits.repeat_interleave(lengths)).long()
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=["f0", "f1", "f2"], values=ids, lengths=lengths
        )
        out.append(
            Batch(
                dense_features=torch.randn(batch_size, 4, generator=g),
                sparse_features=sparse,
                labels=torch.randint(0, 2, (batch_size,), generator=g).float(),
            )
        )
    return out


@torch.no_grad()
def _logits(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(b.dense_features, b.sparse_features) for b in batches])


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def test_registered_through_the_registry_alone() -> None:
    # both drivers reach it through its registered method (the sharded one:
    # tests/distributed/test_rowwise_quant_sharded.py)
    assert isinstance(method_of(RowWiseQuantConfig(bits=8)), RowWiseQuantMethod)


@pytest.mark.parametrize("module", [rowwise_quant, planning])
def test_docstring_examples_run(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_dlrm_quantized_close_to_float_with_true_bytes(bits: int) -> None:
    model, batches = _dlrm(), _batches()
    expected = _logits(model, batches)
    report = compress_(model, RowWiseQuantConfig(bits=bits))
    ebc = model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, QuantEmbeddingBagCollection)
    assert _rel(_logits(model, batches), expected) < TOLERANCE[bits]
    # d * bits / 8 bytes of integers + fp16 scale and bias per row (no padding on CPU)
    row_bytes = DIM * bits // 8 + 4
    assert [(r.name, r.method, r.bytes_before, r.bytes_after) for r in report.rows] == [
        (name, f"INT{bits}", rows * DIM * 4, rows * row_bytes) for name, rows in ROWS.items()
    ]
    # what fbgemm allocated: the reported rows, each table padded to a 128-byte boundary
    stored = sum(
        getattr(m, name).numel()
        for m in ebc._emb_modules
        for name in ("weights_host", "weights_dev", "weights_uvm")
    )
    assert 0 <= stored - report.bytes_after < 128 * len(ROWS)


@pytest.mark.parametrize("bits", [8, 4])
def test_outputs_equal_torchrec_serving_conversion(bits: int) -> None:
    """The compressed model is what TorchRec serves: ``quantize_embeddings`` gives the same."""
    model, batches = _dlrm(), _batches()
    served = quantize_embeddings(copy.deepcopy(model), TORCH_DTYPES[bits], inplace=False)
    compress_(model, RowWiseQuantConfig(bits=bits))
    torch.testing.assert_close(_logits(model, batches), _logits(served, batches), rtol=0, atol=0)


def test_fp16_rows_train_and_convert_to_int8_for_serving() -> None:
    """``bits=16``: a trainable TorchRec collection of fp16 rows (half the bytes); a later
    ``bits=8`` pass serves it in int8."""
    model, batches = _dlrm(), _batches()
    expected = _logits(model, batches)
    report = compress_(model, RowWiseQuantConfig(bits=16))
    ebc = model.sparse_arch.embedding_bag_collection
    assert type(ebc) is EmbeddingBagCollection
    assert {t.data_type for t in ebc.embedding_bag_configs()} == {DataType.FP16}
    assert ebc.embedding_bags["t0"].weight.dtype == torch.float16
    assert [(r.method, r.bytes_after) for r in report.rows] == [
        ("FP16", rows * DIM * 2) for rows in ROWS.values()
    ]
    assert _rel(_logits(model, batches), expected) < 1e-3

    rows_before = ebc.embedding_bags["t0"].weight.detach().clone()
    model.train()
    batch = batches[0]
    logits = model(batch.dense_features, batch.sparse_features).squeeze(1)
    nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    looked_up = batch.sparse_features["f0"].values().unique()
    moved = (ebc.embedding_bags["t0"].weight.detach() - rows_before)[looked_up].abs().amax(1)
    assert bool((moved > 0).all())

    served = compress_(model, RowWiseQuantConfig(bits=8))
    assert isinstance(model.sparse_arch.embedding_bag_collection, QuantEmbeddingBagCollection)
    assert [r.bytes_before for r in served.rows] == [r.bytes_after for r in report.rows]


def _perturbed_quantized(bits: int) -> DLRM:
    """A quantized DLRM whose every value differs from ``_dlrm()``'s."""
    model = _dlrm()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    compress_(model, RowWiseQuantConfig(bits=bits))
    return model


def test_state_dict_round_trip() -> None:
    """Quantized rows, scales and biases travel in the state dict (split, as the planner sees)."""
    model, batches = _dlrm(), _batches()
    compress_(model, RowWiseQuantConfig(bits=4))
    state = model.state_dict()
    scale = state["sparse_arch.embedding_bag_collection.embedding_bags.t0.weight_qscale"]
    assert scale.shape == (ROWS["t0"], 1)
    other = _perturbed_quantized(bits=4)
    other.load_state_dict(state)
    torch.testing.assert_close(_logits(other, batches), _logits(model, batches), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_torch_save_of_the_state_dict_round_trips(bits: int) -> None:
    """``torch.save(model.state_dict())`` raised "Cannot save multiple tensors or storages that
    view the same data as different types" (the fp16 scales viewed fbgemm's uint8 rows)."""
    model, batches = _dlrm(), _batches()
    compress_(model, RowWiseQuantConfig(bits=bits))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = _perturbed_quantized(bits=bits)
    # torchrec wraps int4 / int2 rows in its own tensor types, which weights_only must allow
    with torch.serialization.safe_globals([UInt2Tensor, UInt4Tensor]):
        other.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(_logits(other, batches), _logits(model, batches), rtol=0, atol=0)
    # the copies are the module's scales, and writing the state dict leaves the module alone
    state = model.state_dict()
    scale = state["sparse_arch.embedding_bag_collection.embedding_bags.t0.weight_qscale"]
    scale.fill_(0.0)
    torch.testing.assert_close(_logits(other, batches), _logits(model, batches), rtol=0, atol=0)


def test_variable_batch_input_is_refused() -> None:
    """TorchRec's quantized collection pooled a VBE batch of 4 into 3 rows, silently."""
    model = _dlrm()
    float_ebc = model.sparse_arch.embedding_bag_collection
    features = KeyedJaggedTensor(
        keys=["f0", "f1", "f2"],
        values=torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9]),
        lengths=torch.ones(9, dtype=torch.int32),
        stride_per_key_per_rank=[[3], [3], [3]],
        inverse_indices=(["f0", "f1", "f2"], torch.tensor([[0, 1, 2, 0]] * 3)),
    )
    assert float_ebc(features).values().shape[0] == 4  # a valid batch of 4
    compress_(model, RowWiseQuantConfig(bits=8))
    quantized = model.sparse_arch.embedding_bag_collection
    with pytest.raises(ValueError, match=r"\['t0', 't1', 't2'\] does not support variable batch"):
        quantized(features)


def test_int8_dcp_round_trip(tmp_path: Path) -> None:
    """int8 collections save and load with ``torch.distributed.checkpoint``.  (int4 / int2 do
    not in torchrec 1.8: its ``UInt4Tensor`` / ``UInt2Tensor`` state-dict wrappers lack
    ``is_pinned``; ``state_dict`` / ``load_state_dict`` work, see above.)"""
    model, batches = _dlrm(), _batches()
    compress_(model, RowWiseQuantConfig(bits=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-process DCP warns that no process group exists
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path))
        other = _perturbed_quantized(bits=8)
        state = {"model": other.state_dict()}
        dcp.load(state, checkpoint_id=str(tmp_path))
    other.load_state_dict(state["model"])
    torch.testing.assert_close(_logits(other, batches), _logits(model, batches), rtol=0, atol=0)


def _weighted_model_and_batch() -> tuple[
    list[EmbeddingBagConfig], nn.Sequential, KeyedJaggedTensor
]:
    """A weighted collection of the ROWS tables (seed 0) and one batch with random per-id weights."""
    tables = [
        EmbeddingBagConfig(name=n, embedding_dim=DIM, num_embeddings=r, feature_names=[f"f{i}"])
        for i, (n, r) in enumerate(ROWS.items())
    ]
    torch.manual_seed(0)
    model = nn.Sequential(EmbeddingBagCollection(tables, is_weighted=True))
    kjt = _batches(1)[0].sparse_features
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(),
        values=kjt.values(),
        lengths=kjt.lengths(),
        weights=torch.rand(kjt.values().numel()),
    )
    return tables, model, kjt


def test_weighted_collection_equals_torchrec_serving_conversion() -> None:
    tables, model, kjt = _weighted_model_and_batch()
    served = quantize_embeddings(copy.deepcopy(model), torch.qint8, inplace=False)
    expected = model[0](kjt).values()
    compress_(model, RowWiseQuantConfig(bits=8))
    got = model[0](kjt).values()
    torch.testing.assert_close(got, served[0](kjt).values(), rtol=0, atol=0)
    # pooled rows: about half an int8 step of each row's range (1/510) per id, measured 0.003
    assert _rel(got, expected.detach()) < 0.01


def test_weighted_fp16_collection_runs_and_trains() -> None:
    """fp16 rows of a weighted collection: before, its first forward raised (``nn.EmbeddingBag``
    wants per-sample weights of its rows' dtype); now the rows are weighted in float32."""
    tables, model, kjt = _weighted_model_and_batch()
    expected = model[0](kjt).values().detach()
    compress_(model, RowWiseQuantConfig(bits=16))
    got = model[0](kjt).values()
    assert got.dtype == torch.float32
    assert _rel(got, expected) < 1e-3  # fp16 rows, float32 sums: measured 2e-4
    # the same sums as float32 rows rounded to fp16
    rounded = EmbeddingBagCollection(tables, is_weighted=True)
    for t in tables:
        rounded.embedding_bags[t.name].weight.data.copy_(model[0].embedding_bags[t.name].weight)
    torch.testing.assert_close(got, rounded(kjt).values(), rtol=1e-6, atol=1e-6)
    got.sum().backward()
    grad = model[0].embedding_bags["t0"].weight.grad
    assert grad is not None and grad.dtype == torch.float16 and bool(grad.abs().sum() > 0)
    state = model.state_dict()
    assert all(v.dtype == torch.float16 for v in state.values())


def test_skipped_and_not_smaller_tables_are_kept() -> None:
    """``skip`` keeps a table's float rows (fbgemm's float pooling: equal to rounding); a
    1-dim table in int8 (1 + 4 bytes per row, 4 now) is kept; all kept: module not swapped."""
    model = _dlrm()
    ebc = model.sparse_arch.embedding_bag_collection
    kjt = _batches(1)[0].sparse_features
    expected = ebc(kjt).to_dict()
    config = RowWiseQuantConfig(bits=8, table_overrides={"t1": RowWiseQuantOverride(skip=True)})
    report = compress_(model, config)
    got = model.sparse_arch.embedding_bag_collection(kjt).to_dict()
    torch.testing.assert_close(got["f1"], expected["f1"], rtol=1e-6, atol=1e-7)
    assert [r.method for r in report.rows] == ["INT8", "kept", "INT8"]
    kept = report.rows[1]
    assert kept.bytes_before == kept.bytes_after == ROWS["t1"] * DIM * 4

    tables = [EmbeddingBagConfig(name="tiny", embedding_dim=1, num_embeddings=10)]
    tiny = nn.Sequential(EmbeddingBagCollection(tables))
    report = compress_(tiny, RowWiseQuantConfig(bits=8))
    assert [(r.method, r.bytes_after) for r in report.rows] == [("kept", 40)]
    assert type(tiny[0]) is EmbeddingBagCollection  # nothing quantized: module left in place


def _collection(dims: dict[str, int]) -> nn.Sequential:
    tables = [
        EmbeddingBagConfig(name=n, embedding_dim=dims[n], num_embeddings=r, feature_names=[f"f{i}"])
        for i, (n, r) in enumerate(ROWS.items())
    ]
    return nn.Sequential(EmbeddingBagCollection(tables))


def test_per_table_bits_and_errors_leave_model_unchanged() -> None:
    dims = {"t0": 16, "t1": 16, "t2": 12}
    model = _collection(dims)
    config = RowWiseQuantConfig(bits=8, table_overrides={"t0": RowWiseQuantOverride(bits=4)})
    report = compress_(model, config)
    assert [(r.method, r.bytes_after) for r in report.rows] == [
        ("INT4", 300 * 12),
        ("INT8", 120 * 20),
        ("INT8", 40 * 16),
    ]

    model = _collection(dims)
    with pytest.raises(ValueError, match="table 't2': embedding_dim 12 cannot be stored in 2 bits"):
        compress_(model, RowWiseQuantConfig(bits=2))
    assert type(model[0]) is EmbeddingBagCollection
    with pytest.raises(ValueError, match=r"unknown table\(s\) \['nope'\]"):
        compress_(model, RowWiseQuantConfig(table_overrides={"nope": RowWiseQuantOverride()}))
    with pytest.raises(ValueError, match=r"RowWiseQuantConfig.bits must be one of \[2, 4, 8, 16\]"):
        RowWiseQuantConfig(bits=3)
    config = RowWiseQuantConfig(bits=2, table_overrides={"t": RowWiseQuantOverride(skip=True)})
    assert RowWiseQuantConfig.from_dict(config.to_dict()) == config


def test_afm_then_int8_factor_tables_fine_tune_around_frozen_rows() -> None:
    model, batches = _dlrm(), _batches()
    afm = compress_(model, AFMConfig(rank=8), calibration=batches, forward_fn=_forward)
    expected = _logits(model, batches)
    with pytest.raises(ValueError, match="nothing to compress"):  # never silent
        compress_(model, RowWiseQuantConfig(bits=8, factor_tables=False))
    quant = compress_(model, RowWiseQuantConfig(bits=8))
    lowrank = model.sparse_arch.embedding_bag_collection
    assert isinstance(lowrank, LowRankEmbeddingBagCollection)
    assert isinstance(lowrank.factor_ebc, QuantEmbeddingBagCollection)
    assert _rel(_logits(model, batches), expected) < TOLERANCE[8]
    combined = afm.followed_by(quant)
    # float factors: rows x 8 x 4 bytes; int8: rows x (8 + 4); projections and means unchanged
    assert [r.method for r in combined.rows] == ["AFM+INT8"] * 3
    for row, rows in zip(combined.rows, ROWS.values(), strict=True):
        assert row.bytes_after == rows * 12 + (8 * DIM + DIM) * 4

    rows_before = {k: v.clone() for k, v in lowrank.factor_ebc.state_dict().items()}
    projection = lowrank.projection["t0"].detach().clone()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = batches[0]
    logits = model(batch.dense_features, batch.sparse_features).squeeze(1)
    nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    optimizer.step()
    assert not torch.equal(lowrank.projection["t0"].detach(), projection)
    for key, value in lowrank.factor_ebc.state_dict().items():
        assert torch.equal(value, rows_before[key]), key


def _forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(batch.dense_features, batch.sparse_features)


def test_afm_int8_factors_planned_at_true_size() -> None:
    """AFM k = 16 of a 128-dim table, int8 factors: the planner's bytes per row on meta.

    Original 512, float factors 64, fp16 factors 32, int8 factors 16 + 4 (fp16 scale, bias).
    """
    rows = 10**8
    table = EmbeddingBagConfig(name="t", embedding_dim=128, num_embeddings=rows)
    meta = torch.device("meta")
    topology = Topology(world_size=8, local_world_size=8, compute_device="cuda")

    def per_row(model: nn.Module) -> float:
        (storage,) = plan_storage(model, topology).tables
        return (storage.hbm + storage.ddr) / rows

    original = nn.Sequential(EmbeddingBagCollection([table], device=meta))
    model = nn.Sequential(LowRankEmbeddingBagCollection([table], {"t": 16}, device=meta))
    float_factors = per_row(model)
    compress_(model, RowWiseQuantConfig(bits=8))
    assert isinstance(model[0].factor_ebc, QuantEmbeddingBagCollection)
    int8_factors = per_row(model)
    fp16 = nn.Sequential(LowRankEmbeddingBagCollection([table], {"t": 16}, device=meta))
    compress_(fp16, RowWiseQuantConfig(bits=16))
    assert 512 <= per_row(original) < 513
    assert 64 <= float_factors < 65
    assert 32 <= per_row(fp16) < 33  # trainable fp16 factors
    assert 20 <= int8_factors < 21
