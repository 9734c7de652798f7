"""Fine-tuning AFM x int8 and AFM x fp16 DLRMs under DMP, in 1 and 2 gloo processes.

The int8 factor rows are frozen (fbgemm has no CPU backward for uint8 rows, see
``torchrec_compress.methods.rowwise_quant.method``); with ``torchrec_compress.sharders(model)`` DMP keeps the
quantized collection whole on every rank while the projections, means and MLPs train
data-parallel.
One SGD step must equal the unsharded step on the same (global) data, and leave the int8 rows
as they were.  TorchRec's default sharders, which include its inference-only quantized sharder,
cannot shard the quantized collection on CPU at all.

With ``bits=16`` the factor rows stay trainable: DMP's fused TBE stores them as fp16 and one
step (fused SGD on the rows, SGD on the rest) matches the unsharded step.

``compress_(dmp, RowWiseQuantConfig(...))`` (which raised ``TypeError`` before) quantizes the rows
where they live (row-wise and table-wise shards, AFM factor tables) and ``report.reshard`` gives
the same model, report and outputs as the config applied unsharded; int4/int2 and column-split
tables are refused by name.
"""

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_compress
from torchrec_compress.api import compress_
from torchrec_compress.distributed.compression import read_compression_layout
from torchrec_compress.distributed.planning import default_sharders, plan_model, shard_model
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.layout import restore_layout_
from torchrec_compress.methods.lowrank.config import AFMConfig
from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig
from torchrec_compress.methods.rowwise_quant.sharded import ShardedReplicatedCollection
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import DENSE_IN, tiny_batch, tiny_dlrm

CPU = torch.device("cpu")
META = torch.device("meta")
LR = 0.5
EBC = "model.sparse_arch.embedding_bag_collection"


def _forward(model: nn.Module, batch: Batch) -> object:
    return model(batch)


def _quantized_model() -> nn.Module:
    """The same AFM(k=8) x int8 DLRM on every rank (same seed, same calibration data)."""
    model = tiny_dlrm(CPU, dim=16, seed=3)
    calibration = [tiny_batch(32, seed=100 + i) for i in range(2)]
    compress_(model, AFMConfig(rank=8), calibration=calibration, forward_fn=_forward)
    compress_(model, RowWiseQuantConfig(bits=8))
    return model


def _sgd_step(model: nn.Module, batches: list[Batch]) -> None:
    """One SGD step on the mean of the batches' losses (what DDP's gradient averaging gives)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for batch in batches:
        (model(batch)[0] / len(batches)).backward()
    with torch.no_grad():
        for p in params:
            p -= LR * p.grad
            p.grad = None


def _fp16_model() -> nn.Module:
    """The same AFM(k=8) x fp16 DLRM on every rank: its fp16 factor rows keep training."""
    model = tiny_dlrm(CPU, dim=16, seed=3)
    calibration = [tiny_batch(32, seed=100 + i) for i in range(2)]
    compress_(model, AFMConfig(rank=8), calibration=calibration, forward_fn=_forward)
    compress_(model, RowWiseQuantConfig(bits=16))
    return model


def _fp16_reference_step(model: nn.Module, batches: list[Batch]) -> None:
    """The step DMP takes on ``batches`` (one per rank): DDP averages the dense gradients over
    ranks, while every rank's gradient of a pooled lookup reaches the table shard (summed)."""
    model.train()
    for batch in batches:
        model(batch)[0].backward()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if "factor_ebc" in name else 1.0 / len(batches)
            p -= LR * scale * p.grad
            p.grad = None


def _finetune_fp16(rank: int, world_size: int) -> dict[str, Any]:
    batches = [tiny_batch(16, seed=10 + r) for r in range(world_size)]
    probe = tiny_batch(16, seed=99)
    reference = _fp16_model()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.eval()
    with torch.no_grad():
        logits_before = reference(probe)[1][1]
    _fp16_reference_step(reference, batches)
    reference.eval()
    with torch.no_grad():
        expected = reference(probe)[1][1]

    model = _fp16_model()
    tables = [p for n, p in model.named_parameters() if "factor_ebc" in n]
    apply_optimizer_in_backward(torch.optim.SGD, tables, {"lr": LR})
    dmp = shard_model(model, CPU, "table_wise")
    load_full_state_dict_(dmp, state)
    table = dmp.state_dict()[f"{EBC}.factor_ebc.embedding_bags.t_f0.weight"]
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optimizer = torch.optim.SGD(list(dense.values()), lr=LR)
    dmp.train()
    dmp(batches[rank])[0].backward()
    optimizer.step()
    dmp.eval()
    with torch.no_grad():
        got = dmp(probe)[1][1]
    return {
        "fp16_shards": all(s.tensor.dtype == torch.float16 for s in table.local_shards()),
        "step_diff": float((got - expected).abs().max()),
        "step_size": float((expected - logits_before).abs().max()),
    }


def _finetune(rank: int, world_size: int) -> dict[str, Any]:
    batches = [tiny_batch(16, seed=10 + r) for r in range(world_size)]
    reference = _quantized_model()
    with torch.no_grad():
        reference.eval()
        expected_logits = reference(batches[rank])[1][1]
    _sgd_step(reference, batches)

    model = _quantized_model()
    projection = model.get_parameter(f"{EBC}.projection.t_f0").detach().clone()
    factor_rows = {
        k: v.clone() for k, v in model.get_submodule(f"{EBC}.factor_ebc").state_dict().items()
    }
    sharders = torchrec_compress.sharders(model)  # the one list the README promises
    topology = Topology(world_size=world_size, local_world_size=world_size, compute_device="cpu")
    plan = plan_model(model, topology, sharders=sharders, pg=dist.group.WORLD)
    dmp = DistributedModelParallel(model, device=CPU, plan=plan, sharders=sharders)
    dmp.eval()
    with torch.no_grad():
        logits = dmp(batches[rank])[1][1]
    optimizer = torch.optim.SGD([p for p in dmp.parameters() if p.requires_grad], lr=LR)
    dmp.train()
    dmp(batches[rank])[0].backward()
    optimizer.step()

    got = dict(dmp.module.named_parameters())
    params = dict(reference.named_parameters())
    factor_ebc = dmp.module.get_submodule(f"{EBC}.factor_ebc")
    return {
        "logits_diff": float((logits - expected_logits).abs().max()),
        "param_diff": max(float((got[n] - p).abs().max()) for n, p in params.items()),
        "projection_moved": float((got[f"{EBC}.projection.t_f0"] - projection).abs().max()),
        "rows_unchanged": all(
            torch.equal(v, factor_rows[k]) for k, v in factor_ebc.state_dict().items()
        ),
        # the int8 factor collection runs whole on every process, inside the sharded low-rank
        # collection (whose projections are replicas of its own)
        "factor_quantized": isinstance(factor_ebc, ShardedReplicatedCollection)
        and isinstance(factor_ebc.collection, QuantEmbeddingBagCollection),
        "default_sharders": _default_shard() if world_size == 1 else None,
        **_finetune_fp16(rank, world_size),
    }


def _int8_model() -> nn.Module:
    """A DLRM whose tables are row-wise int8 (TorchRec's quantized collection, no AFM)."""
    model = tiny_dlrm(CPU, dim=16, seed=3)
    compress_(model, RowWiseQuantConfig(bits=8))
    return model


def _default_shard() -> str:
    """TorchRec's default sharders include its inference-only quantized sharder: DMP given
    them fails on CPU for an int8 collection; ``shard_model`` and ``torchrec_compress.sharders``
    leave it out (``training_sharders``; ``sharders(model)`` included it and failed the same
    way).  (An AFM x int8 collection is sharded as one unit by this package's sharder.)"""
    shard_model(_int8_model(), CPU)
    try:
        DistributedModelParallel(_int8_model(), device=CPU, sharders=default_sharders())
    except AssertionError as e:
        return str(e)
    return "sharded"


@pytest.mark.parametrize("world_size", [1, 2])
def test_afm_int8_and_fp16_finetune_under_dmp(world_size: int) -> None:
    for result in run_multiprocess(_finetune, world_size=world_size):
        assert result["factor_quantized"]
        assert result["logits_diff"] < 1e-6
        assert result["param_diff"] < 1e-5
        assert result["projection_moved"] > 1e-6
        assert result["rows_unchanged"]
        # fp16 factor rows: stored fp16 in DMP's fused TBE and trained like the unsharded step
        # (up to fp16 rounding of the updated rows)
        assert result["fp16_shards"]
        assert result["step_size"] > 1e-3
        assert result["step_diff"] < 1e-4
    if world_size == 1:
        # why training_sharders exists: TorchRec's quantized sharder builds CUDA kernels
        assert "CUDA" in result["default_sharders"]


# --------------------------------------------------------------------------------------------
# compress_(dmp, RowWiseQuantConfig(...)): rows quantized where they live, then report.reshard
# (before: TypeError, "no sharded compression for RowWiseQuantConfig")
# --------------------------------------------------------------------------------------------


def _sharded(reference: nn.Module, sharding_type: str) -> DistributedModelParallel:
    dmp = shard_model(tiny_dlrm(META, dim=16), CPU, sharding_type)
    load_full_state_dict_(dmp, reference.state_dict())
    return dmp


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch)[1][1]


def _variable_batch(batch_size: int = 4) -> Batch:
    """A valid VBE batch of ``batch_size``: 3 distinct bags per feature, deduplicated."""
    features = KeyedJaggedTensor(
        keys=["f0", "f1", "f2"],
        values=torch.arange(9),
        lengths=torch.ones(9, dtype=torch.int32),
        stride_per_key_per_rank=[[3], [3], [3]],
        inverse_indices=(["f0", "f1", "f2"], torch.tensor([[0, 1, 2, 0]] * 3)),
    )
    return Batch(torch.randn(batch_size, DENSE_IN), features, torch.zeros(batch_size))


def _variable_batch_error(model: nn.Module) -> str:
    """The error a VBE batch raises (TorchRec's quantized collection pooled it to 3 rows)."""
    try:
        rows = model(_variable_batch())[1][1].shape[0]
    except ValueError as e:
        return str(e)
    return f"no error: {rows} rows"


def _whole_tables(reference: nn.Module, probe: Batch, bits: int, sharding_type: str) -> dict:
    """int8 / fp16 of the float tables under DMP == the same config applied unsharded."""
    expected = copy.deepcopy(reference)
    expected_rows = compress_(expected, RowWiseQuantConfig(bits=bits)).rows
    report = compress_(_sharded(reference, sharding_type), RowWiseQuantConfig(bits=bits))
    quantized = report.reshard(CPU)
    return {
        "variable_batch": _variable_batch_error(quantized) if bits == 8 else None,
        "rows_equal": report.rows == expected_rows,
        "diff": float((_logits(quantized, probe) - _logits(expected, probe)).abs().max()),
        "quantized": isinstance(quantized.module.get_submodule(EBC), QuantEmbeddingBagCollection),
        "layout": report.layout().modules[EBC]["data_types"],
    }


def _afm_then_int8(reference: nn.Module, probe: Batch, rank: int, out: str) -> dict:
    """AFM under DMP (row-wise), then int8 of its factor tables under DMP == int8 of the same
    AFM model's factors applied unsharded (the AFM checkpoint loaded whole)."""
    calibration = [tiny_batch(32, seed=100 + rank)]
    afm_dir = str(Path(out, "afm"))
    afm = compress_(
        _sharded(reference, "row_wise"), AFMConfig(rank=8), calibration, forward_fn=_forward
    ).reshard(CPU, sharding_type="row_wise", checkpoint_dir=afm_dir)
    layout = read_compression_layout(afm_dir)
    assert layout is not None
    expected = restore_layout_(tiny_dlrm(CPU, dim=16), layout, device=CPU)
    state = {"model": expected.state_dict()}
    dcp.load(state, checkpoint_id=afm_dir)
    expected.load_state_dict(state["model"])
    compress_(expected, RowWiseQuantConfig(bits=8))
    report = compress_(afm, RowWiseQuantConfig(bits=8))
    quantized = report.reshard(CPU)
    return {
        "diff": float((_logits(quantized, probe) - _logits(expected, probe)).abs().max()),
        "kinds": [
            (e["kind"], (e["factors"] or {}).get("kind")) for e in report.layout().modules.values()
        ],
        "methods": sorted({r.method for r in report.rows}),
    }


def _refusals(reference: nn.Module, world_size: int) -> dict[str, str]:
    errors = {}
    cases = [("int4", "table_wise", RowWiseQuantConfig(bits=4))]
    if world_size > 1:  # a 16-dim table splits by columns only over several processes
        cases.append(("column_wise", "column_wise", RowWiseQuantConfig(bits=8)))
    for name, sharding_type, config in cases:
        try:
            compress_(_sharded(reference, sharding_type), config)
        except ValueError as e:
            errors[name] = str(e)
    return errors


def _quantize_sharded(rank: int, world_size: int, out: str) -> dict[str, Any]:
    reference = tiny_dlrm(CPU, dim=16, seed=3)
    probe = tiny_batch(16, seed=7 + rank)
    return {
        "int8_row_wise": _whole_tables(reference, probe, 8, "row_wise"),
        "int8_table_wise": _whole_tables(reference, probe, 8, "table_wise"),
        "fp16_row_wise": _whole_tables(reference, probe, 16, "row_wise"),
        "afm_int8": _afm_then_int8(reference, probe, rank, out),
        "refusals": _refusals(reference, world_size),
    }


@pytest.mark.parametrize("world_size", [1, 2])
def test_rowwise_quant_of_a_dmp_model_where_rows_live(world_size: int, tmp_path: Path) -> None:
    results = run_multiprocess(_quantize_sharded, world_size=world_size, out=str(tmp_path))
    for result in results:
        for case in ("int8_row_wise", "int8_table_wise"):
            assert "does not support variable batch" in result[case]["variable_batch"], case
            assert result[case]["rows_equal"], case
            assert result[case]["quantized"], case
            assert result[case]["diff"] < 1e-6, (case, result[case]["diff"])
            assert set(result[case]["layout"].values()) == {"INT8"}
        fp16 = result["fp16_row_wise"]
        # trainable fp16 rows stay a (sharded) float collection; fbgemm pools them in fp16
        assert fp16["rows_equal"] and not fp16["quantized"] and fp16["diff"] < 1e-3
        afm = result["afm_int8"]
        assert afm["diff"] < 1e-6, afm["diff"]
        assert afm["kinds"] == [("composite", "rowwise_quant")]
        assert afm["methods"] == ["INT8"]
        refusals = result["refusals"]
        assert "{'t_f0': 'INT4', 't_f1': 'INT4', 't_f2': 'INT4'}" in refusals["int4"]
        if world_size > 1:
            assert "table 't_f0' is split by columns" in refusals["column_wise"]
