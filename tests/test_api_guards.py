"""compress_ is never bigger and never silent, on TorchRec's own models.

* A table or layer is replaced only when that makes it smaller; otherwise it is kept, with a
  warning and a note in its report row (bytes_after == bytes_before).
* A sharded (DMP) or DDP-wrapped model, nothing to compress, a second compression with the same
  method, calibration data without batches: clear errors.  EmbeddingCollection tables and
  ``linear=True`` finding no layer: warnings that say why.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.test_utils.test_model import ModelInput
from torchrec.distributed.test_utils.test_model import TestSparseNN as SparseNN  # not a test class
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress import LowRankEmbeddingBagCollection, LowRankLinear
from torchrec_compress.api import compress_
from torchrec_compress.config import CompressionConfig
from torchrec_compress.methods.lowrank.config import AFMConfig, SVDConfig
from torchrec_compress.methods.pq.config import (
    KMeansTraining,
    MECConfig,
    MECOverride,
    MECTraining,
    PQConfig,
)
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
from torchrec_compress.testing import run_multiprocess

ROOT = Path(__file__).resolve().parents[1]


# one intra-op thread for every test of this module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _dlrm(rows: dict[str, int], dim: int = 16, over: tuple[int, ...] = (16, 1)) -> DLRM:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=n, embedding_dim=dim, num_embeddings=r, feature_names=[f"f_{n}"])
        for n, r in rows.items()
    ]
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables),
        dense_in_features=4,
        dense_arch_layer_sizes=[16, dim],
        over_arch_layer_sizes=list(over),
    )


def _batches(rows: dict[str, int], num: int = 3, batch_size: int = 16) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(num):
        lengths = torch.randint(1, 4, (len(rows) * batch_size,), generator=g)
        limits = torch.tensor(list(rows.values())).repeat_interleave(batch_size)
        ids = (
            torch.rand(int(lengths.sum()), generator=g) * limits.repeat_interleave(lengths)
        ).long()
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f"f_{n}" for n in rows], values=ids, lengths=lengths
        )
        out.append(Batch(torch.randn(batch_size, 4, generator=g), kjt, torch.zeros(batch_size)))
    return out


def _ebc(model: DLRM) -> nn.Module:
    return model.sparse_arch.embedding_bag_collection


def _rows(report) -> dict:  # noqa: ANN001
    return {r.name: r for r in report.rows}


# --- never bigger -------------------------------------------------------------------------


def test_afm_rank_8_keeps_a_6_row_table() -> None:
    """Was: 384 -> 768 bytes."""
    rows = {"tiny": 6, "big": 500}
    model = _dlrm(rows)
    tiny_weight = _ebc(model).embedding_bags["tiny"].weight.detach().clone()
    with pytest.warns(UserWarning, match="table 'tiny': rank 8 would not be smaller"):
        report = compress_(model, AFMConfig(rank=8), calibration=_batches(rows))
    tiny, big = _rows(report)["tiny"], _rows(report)["big"]
    assert (tiny.method, tiny.rank, tiny.bytes_before, tiny.bytes_after) == ("kept", None, 384, 384)
    assert tiny.note == "rank 8 would not be smaller (768 >= 384 bytes)"
    assert big.method == "AFM" and big.bytes_after < big.bytes_before
    assert report.bytes_after < report.bytes_before
    ebc = _ebc(model)
    assert isinstance(ebc, LowRankEmbeddingBagCollection) and ebc.ranks() == {"big": 8}
    torch.testing.assert_close(ebc.factor_ebc.embedding_bags["tiny"].weight, tiny_weight)
    assert "note" in str(report) and "768 >= 384 bytes" in str(report)


def test_rank_above_the_rows_keeps_the_demo_table() -> None:
    """The demo's 50 x 64 table at rank 56 (more than its 50 rows): was 12,800 -> 25,792."""
    rows = {"t50": 50, "t2000": 2000}
    model = _dlrm(rows, dim=64)
    with pytest.warns(UserWarning, match="table 't50'"):
        report = compress_(model, SVDConfig(rank=56))
    t50 = _rows(report)["t50"]
    assert (t50.method, t50.bytes_after) == ("kept", 12_800)
    assert t50.note == "rank 56 would not be smaller (25792 >= 12800 bytes)"
    assert _rows(report)["t2000"].rank == 56


def test_high_variance_target_leaves_the_model_as_it_was() -> None:
    """explained_variance=0.99 picked rank = dim everywhere: every table grew."""
    rows = {"a": 40, "b": 60}
    model = _dlrm(rows)
    ebc = _ebc(model)
    with pytest.warns(UserWarning, match="keeps 2 table"):
        report = compress_(model, AFMConfig(explained_variance=0.99), calibration=_batches(rows))
    assert _ebc(model) is ebc  # every table kept: the original module stays
    assert all(r.method == "kept" and r.bytes_after == r.bytes_before for r in report.rows)
    assert report.bytes_after == report.bytes_before


def test_budget_with_two_row_tables_does_not_raise() -> None:
    """`--budget-ratio 4` on d=16 with 26 fields raised: every 2-row table had to take rank 4."""
    rows = {f"t{i}": 2 for i in range(20)} | {"u0": 300, "u1": 1000, "u2": 3000}
    model = _dlrm(rows)
    total = sum(rows.values()) * 16 * 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = compress_(
            model, AFMConfig(memory_budget_bytes=total // 3), calibration=_batches(rows)
        )
    assert any(
        "table 't0': smallest allowed rank 4 would not be smaller" in str(w.message) for w in caught
    )
    for name, row in _rows(report).items():
        if name.startswith("t"):
            assert row.method == "kept" and row.bytes_after == row.bytes_before == 128
        else:  # compressed, or affordable whole (the budget's best use of its bytes)
            assert row.method == "AFM" or row.note == "budget keeps the whole table"
    assert _rows(report)["u2"].method == "AFM"
    assert report.bytes_after <= total // 3


def test_mec_defaults_keep_a_6_row_table() -> None:
    """MEC defaults (M=8, K=256) on a 6-row table: was 384 -> 432 bytes."""
    rows = {"tiny": 6}
    model = _dlrm(rows)
    ebc = _ebc(model)
    with pytest.warns(UserWarning, match=r"table 'tiny': num_subspaces 8 x num_centroids 6 would"):
        report = compress_(model, MECConfig(), calibration=_batches(rows))
    assert _ebc(model) is ebc
    (row,) = report.rows
    assert (row.method, row.bytes_before, row.bytes_after) == ("kept", 384, 384)
    assert row.note == "num_subspaces 8 x num_centroids 6 would not be smaller (432 >= 384 bytes)"


def test_mec_keeps_tables_m_does_not_divide_and_quantizes_the_others() -> None:
    """A global M that does not fit a table keeps that table (it raised for the whole model)."""
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name="d12", embedding_dim=12, num_embeddings=400, feature_names=["a"]),
        EmbeddingBagConfig(name="d16", embedding_dim=16, num_embeddings=400, feature_names=["b"]),
    ]
    model = nn.Sequential(EmbeddingBagCollection(tables))
    d12 = model[0].embedding_bags["d12"].weight.detach().clone()
    config = MECConfig(
        num_subspaces=8, num_centroids=16, popularity_weighting=False, training=MECTraining(steps=5)
    )
    with pytest.warns(UserWarning, match="table 'd12': num_subspaces 8 does not divide"):
        report = compress_(model, config)
    assert isinstance(model[0], PQEmbeddingBagCollection)
    torch.testing.assert_close(model[0].decoded_weight("d12"), d12)  # kept exactly
    kept, quantized = _rows(report)["d12"], _rows(report)["d16"]
    # its int16 identity codes are its row ids: not held (they added 800 bytes)
    assert kept.method == "kept" and kept.bytes_after == kept.bytes_before
    assert "no bytes added" in kept.note and not model[0].codes._buffers.get("d12")
    assert quantized.method == "MEC" and quantized.bytes_after < quantized.bytes_before
    assert report.bytes_after < report.bytes_before


def test_keep_mlp_ends_false_keeps_the_logit_layer() -> None:
    """Any linear rank failed on the 1-output logit layer instead of keeping it."""
    rows = {"a": 100}
    model = _dlrm(rows, over=(32, 32, 1))
    config = AFMConfig(rank=4, linear=True, linear_rank=4, keep_mlp_ends=False)
    with pytest.warns(UserWarning, match="layer 'over_arch.model.1'"):
        report = compress_(model, config, calibration=_batches(rows))
    logit = _rows(report)["over_arch.model.1"]
    assert (logit.method, logit.bytes_after) == ("kept", logit.bytes_before)
    assert logit.note == "linear_rank 4 exceeds the layer's 1 principal directions"
    assert type(model.over_arch.model[1]) is nn.Linear
    assert isinstance(model.over_arch.model[0]._mlp[1]._linear, LowRankLinear)


# --- never silent -------------------------------------------------------------------------


def _sparse_nn_inputs(tables: list, weighted: list, num: int = 3) -> list[ModelInput]:
    torch.manual_seed(1)
    return [
        ModelInput.generate(
            batch_size=8,
            world_size=1,
            num_float_features=10,
            tables=tables,
            weighted_tables=weighted,
        )[0]
        for _ in range(num)
    ]


def _call(model: nn.Module, batch: ModelInput) -> torch.Tensor:
    return model(batch)


def _sparse_nn_tables() -> tuple[list[EmbeddingBagConfig], list[EmbeddingBagConfig]]:
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=16, num_embeddings=200, feature_names=[f"f{i}"]
        )
        for i in range(2)
    ]
    weighted = [
        EmbeddingBagConfig(name="w0", embedding_dim=16, num_embeddings=100, feature_names=["w0"])
    ]
    return tables, weighted


def test_linear_on_test_sparse_nn_finds_its_layers() -> None:
    """TestSparseNN's dense arch (hidden_layers + linear) and over arch (linear0, linear1)."""
    tables, weighted = _sparse_nn_tables()
    torch.manual_seed(0)
    model = SparseNN(
        tables=tables,
        weighted_tables=weighted,
        submodule_kwargs={"dense_arch_hidden_sizes": [32, 32]},
    )
    batches = _sparse_nn_inputs(tables, weighted)
    config = AFMConfig(rank=4, linear=True, linear_rank=4)
    report = compress_(model, config, calibration=batches, forward_fn=_call)
    linears = {r.name: r.method for r in report.rows if r.kind == "linear"}
    assert linears == {"dense.hidden_layers.1": "AFM"}
    assert isinstance(model.dense.hidden_layers[1], LowRankLinear)
    model.eval()
    assert model(batches[0]).shape == (8,)

    torch.manual_seed(0)
    model = SparseNN(tables=tables, weighted_tables=weighted)
    config = AFMConfig(rank=4, linear=True, linear_rank=4, keep_mlp_ends=False)
    report = compress_(model, config, calibration=batches, forward_fn=_call)
    assert {r.name for r in report.rows if r.kind == "linear"} == {
        "dense.linear",
        "over.dhn_arch.linear0",
        "over.dhn_arch.linear1",
    }


def test_linear_finding_nothing_says_why() -> None:
    tables, weighted = _sparse_nn_tables()
    torch.manual_seed(0)
    model = SparseNN(tables=tables, weighted_tables=weighted)
    config = AFMConfig(rank=4, linear=True, linear_rank=4)
    with pytest.warns(
        UserWarning, match=r"found no Linear layer.*'over.dhn_arch': 2.*keep_mlp_ends"
    ):
        report = compress_(
            model, config, calibration=_sparse_nn_inputs(tables, weighted), forward_fn=_call
        )
    assert {r.kind for r in report.rows} == {"table"}


def test_embedding_collection_tables_are_named() -> None:
    tables = [
        EmbeddingConfig(
            name=f"seq{i}", embedding_dim=16, num_embeddings=100, feature_names=[f"f{i}"]
        )
        for i in range(2)
    ]
    torch.manual_seed(0)
    model = SparseNN(tables=tables)
    with pytest.warns(UserWarning, match=r"EmbeddingCollection.*'sparse.ec': \['seq0', 'seq1'\]"):
        with pytest.raises(ValueError, match="found nothing to compress in TestSparseNN"):
            compress_(model, SVDConfig(rank=4))


def test_nothing_to_compress_raises() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="AFMConfig found nothing to compress in Sequential"):
        compress_(model, AFMConfig(rank=4), calibration=[torch.randn(2, 4)])
    with pytest.raises(ValueError, match="MECConfig found nothing to compress"):
        compress_(model, MECConfig())


@pytest.mark.parametrize(
    "first,second",
    [
        (SVDConfig(rank=4), SVDConfig(rank=4)),
        (AFMConfig(rank=4), AFMConfig(rank=4)),
        (
            MECConfig(num_subspaces=4, num_centroids=16, training=MECTraining(steps=2)),
            MECConfig(num_subspaces=4, num_centroids=16, training=MECTraining(steps=2)),
        ),
    ],
)
def test_compressing_twice_raises(first, second) -> None:  # noqa: ANN001
    rows = {"a": 300, "b": 200}
    model, batches = _dlrm(rows), _batches(rows)
    compress_(model, first, calibration=batches)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match="already compressed .*'sparse_arch.embedding_bag_collection'"
    ):
        compress_(model, second, calibration=batches)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_exhausted_calibration_iterator_raises() -> None:
    rows = {"a": 300}
    model = _dlrm(rows)
    batches = iter(_batches(rows))
    compress_(model, AFMConfig(rank=4), calibration=batches)  # consumes the iterator
    model = _dlrm(rows)
    with pytest.raises(ValueError, match="yielded no batch"):
        compress_(model, AFMConfig(rank=4), calibration=batches)
    assert isinstance(_ebc(model), EmbeddingBagCollection)
    with pytest.raises(ValueError, match="yielded no batch"):
        compress_(model, MECConfig(), calibration=[])


def test_default_forward_takes_torchrec_models_as_they_take_a_batch() -> None:
    """``DLRMTrain`` takes the ``Batch`` whole, ``DLRM`` its dense and sparse parts: the default
    calibration forward runs both (and gives the same statistics); a model it cannot run gets
    an error that points at ``forward_fn``."""
    from torchrec.models.dlrm import DLRMTrain

    rows = {"a": 300, "b": 200}
    batches = _batches(rows)
    train = DLRMTrain(_dlrm(rows))
    plain = _dlrm(rows)
    by_batch = compress_(train, AFMConfig(rank=4), calibration=batches)
    by_parts = compress_(plain, AFMConfig(rank=4), calibration=batches)
    assert isinstance(
        train.model.sparse_arch.embedding_bag_collection, LowRankEmbeddingBagCollection
    )
    assert [r.explained_variance for r in by_batch.rows] == [
        r.explained_variance for r in by_parts.rows
    ]

    class ThreeInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = _ebc(_dlrm(rows))

        def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor, extra: int) -> None:
            self.ebc(sparse)

    with pytest.raises(TypeError, match="forward_fn=lambda model, batch"):
        compress_(ThreeInputs(), AFMConfig(rank=4), calibration=batches)


def _compress_sharded_model(rank: int, world_size: int) -> list[str]:
    """compress_ on the module tree inside DMP (sharded modules outside DMP) and on a DDP-wrapped
    model raises and swaps nothing (DMP models themselves: tests/distributed/test_compress_dmp.py)."""
    from torch.nn.parallel import DistributedDataParallel

    from torchrec_compress.distributed.planning import shard_model
    from torchrec_compress.testing.models import tiny_batch, tiny_dlrm

    messages = []
    dmp = shard_model(tiny_dlrm(torch.device("cpu")), torch.device("cpu"))
    batches = [tiny_batch(8, seed=rank)]
    types = [type(m) for m in dmp.modules()]
    with pytest.raises(TypeError) as error:
        compress_(dmp.module, SVDConfig(rank=4), calibration=batches, forward_fn=_call)
    messages.append(str(error.value))
    assert [type(m) for m in dmp.modules()] == types
    ddp = DistributedDataParallel(nn.Sequential(tiny_dlrm(torch.device("cpu")).model.dense_arch))
    with pytest.raises(TypeError) as error:
        compress_(ddp, SVDConfig(rank=4, embeddings=False, linear=True, linear_rank=2))
    messages.append(str(error.value))
    return messages


@pytest.mark.parametrize("world_size", [1, 2])
def test_sharded_modules_outside_dmp_or_ddp_model_raise_naming_the_route(world_size: int) -> None:
    """compress_ on a DMP model returned an empty report and, with linear=True, swapped a Linear
    inside DDP.  A DMP model is now compressed (tests/distributed/test_compress_dmp.py); its
    inner module tree and DDP are refused."""
    for messages in run_multiprocess(_compress_sharded_model, world_size=world_size):
        inner, ddp = messages
        assert "DistributedModelParallel model itself" in inner and "reshard" in inner
        assert "embedding_bag_collection" in inner
        assert "DistributedDataParallel" in ddp and "compress the unwrapped module" in ddp


def test_examples_dlrm_budget_ratio_4_with_two_row_tables(tmp_path: Path) -> None:
    """examples/dlrm `--budget-ratio 4`, d=16, 26 fields of which 20 have 2 rows: it raised."""
    rows = ",".join(["2"] * 20 + ["50", "300", "1000", "3000", "5000", "8000"])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.dlrm.main",
            "--dataset",
            "synthetic",
            "--data-opt",
            "train_rows=2000",
            "val_rows=500",
            "test_rows=500",
            f"num_embeddings={rows}",
            "pooling=" + ",".join(["1"] * 26),
            "--embedding-dim",
            "16",
            "--dense-arch",
            "16",
            "--over-arch",
            "16",
            "--batch-size",
            "512",
            "--eval-batch-size",
            "1024",
            "--epochs",
            "1",
            "--compress",
            "afm",
            "--budget-ratio",
            "4",
            "--finetune-epochs",
            "0",
            "--out",
            str(tmp_path),
        ],  # fmt: skip
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "result.json").read_text())["compression"]["report"]
    methods = {r["name"]: r["method"] for r in report["rows"]}
    assert [methods[f"t_f{i}"] for i in range(20)] == ["kept"] * 20
    notes = {r["name"]: r["note"] for r in report["rows"]}
    assert notes["t_f0"] == "smallest allowed rank 4 would not be smaller (352 >= 128 bytes)"
    for i in range(20, 26):  # compressed, or affordable whole (the budget's best use of its bytes)
        assert methods[f"t_f{i}"] == "AFM" or notes[f"t_f{i}"] == "budget keeps the whole table"
    assert report["ratio"] >= 4  # the budget is met (rank 4 everywhere needed 282,080 bytes)


# --- one import line, PQConfig ---------------------------------------------------------------


def test_public_names_import_from_the_package_in_a_fresh_interpreter() -> None:
    """`from torchrec_compress import compress_, AFMConfig` raised ImportError."""
    light = """
import sys
import torchrec_compress.config
assert "torch" not in sys.modules, "importing the configs must stay light"
"""
    code = """
from torchrec_compress import (
    AFMConfig, CompressionReport, CPURowWiseEmbeddingBagCollectionSharder, LowRankEmbeddingBagCollection,
    LowRankLinear, LowRankOverride, MECConfig, MECOverride, MECTraining, KMeansTraining, PQConfig, PQEmbeddingBagCollection,
    PQEmbeddingBagCollectionSharder, SVDConfig, compress_, sharders,
)
import torchrec_compress
from torchrec_compress.methods.pq.sharded_driver import compress_sharded_pq
from torchrec_compress.methods.pq.sharded_driver import compress_sharded_pq as direct
assert compress_sharded_pq is direct
kinds = [type(s) for s in sharders()]
assert kinds[:2] == [CPURowWiseEmbeddingBagCollectionSharder, PQEmbeddingBagCollectionSharder], kinds
assert set(torchrec_compress.__all__) <= set(dir(torchrec_compress))
print("ok")
"""
    for first in (light, "import torchrec_compress.methods.lowrank.sharded_driver\n"):
        proc = subprocess.run(
            [sys.executable, "-c", first + code],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_pq_config_is_plain_pq() -> None:
    from torchrec_compress.methods.pq.config import PQConfig
    from torchrec_compress.registry import method_of

    assert method_of(PQConfig()) is method_of(MECConfig())  # one method, two configs
    rows = {"a": 300, "b": 200}
    fields = dict(num_subspaces=4, num_centroids=16)
    pq = PQConfig(**fields, training=KMeansTraining(kmeans_iterations=5))
    mec = MECConfig(**fields, mode="pq", training=MECTraining(kmeans_iterations=5))
    codes = []
    for config in (pq, mec):
        model = _dlrm(rows)
        report = compress_(model, config, calibration=_batches(rows))
        assert [r.method for r in report.rows] == ["PQ", "PQ"]
        codes.append(_ebc(model).codes.a.clone())
    assert torch.equal(codes[0], codes[1])
    assert PQConfig.from_dict(pq.to_dict()) == pq
    assert pq.to_mec_config() == mec
    with pytest.raises(ValueError, match=r"PQConfig.table_overrides \['a'\] set steps"):
        PQConfig(table_overrides={"a": MECOverride(steps=5)})
    with pytest.raises(ValueError, match="PQConfig.num_centroids must be a positive int"):
        PQConfig(num_centroids=0)


def test_two_stage_report_keeps_the_later_note_and_bytes() -> None:
    """AFM then MEC with a table MEC keeps: the identity-code bytes and the note were dropped."""
    rows = {"a": 300, "b": 200}
    model, batches = _dlrm(rows), _batches(rows)
    first = compress_(model, AFMConfig(rank=4), calibration=batches)
    config = MECConfig(
        num_subspaces=2,
        num_centroids=16,
        table_overrides={"b": MECOverride(skip=True)},
        training=MECTraining(steps=2),
    )
    second = compress_(model, config, calibration=batches)
    both = _rows(first.followed_by(second))
    assert both["a"].method == "AFM+MEC"
    assert both["b"].method == "AFM"
    assert both["b"].bytes_after == _rows(first)["b"].bytes_after  # identity codes not held
    assert "stored exactly as identity codes (no bytes added" in both["b"].note
    assert (
        both["b"].bytes_after
        == _rows(second)["b"].bytes_after - 200 * 4 * 4 + _rows(first)["b"].bytes_after
    )


# --- one handler per config class ------------------------------------------------------------


def test_every_method_has_one_handler_that_the_local_driver_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The method's steps live in its registered handler (both drivers call it), not in the
    drivers: breaking the handler breaks ``compress_``."""
    from torchrec_compress.methods.lowrank.handler import LowRankHandler
    from torchrec_compress.methods.pq.handler import PQHandler
    from torchrec_compress.registry import handler_for

    pq = PQConfig(num_subspaces=4, num_centroids=16)
    assert isinstance(handler_for(AFMConfig(rank=4)), LowRankHandler)
    assert handler_for(SVDConfig(rank=4)).method == "SVD"
    assert handler_for(pq) == PQHandler(pq.to_mec_config())
    assert handler_for(MECConfig()).method == "MEC"
    with pytest.raises(TypeError, match="no compression method for CompressionConfig"):
        handler_for(CompressionConfig())

    rows = {"a": 300, "b": 200}

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("handler called")

    from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig
    from torchrec_compress.methods.rowwise_quant.quantize import RowWiseQuantHandler

    int8 = RowWiseQuantConfig(bits=8)
    assert handler_for(int8) == RowWiseQuantHandler(int8)
    for cls, step, config in (
        (LowRankHandler, "fit", SVDConfig(rank=4)),
        (PQHandler, "fit", pq),
        (RowWiseQuantHandler, "plan", int8),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(cls, step, broken)
            with pytest.raises(RuntimeError, match="handler called"):
                compress_(_dlrm(rows), config, calibration=_batches(rows))
