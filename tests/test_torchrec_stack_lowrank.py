"""An AFM/SVD-compressed torchrec DLRM through the rest of the stack, unsharded.

TorchRec's fx tracer then TorchScript, ``torch.export``, ``torch.compile(fullgraph=True)`` (with
and without gradients), bf16/fp16 models, and TorchRec's ``RowWiseAdagrad`` in-backward recipe.
The sharded counterparts are in ``tests/distributed/test_lowrank_embeddingbag.py``.
"""

import pytest
import torch
import torchrec
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_compress import LowRankEmbeddingBagCollection
from torchrec_compress.api import compress_
from torchrec_compress.methods.lowrank.config import AFMConfig, LowRankOverride, SVDConfig
from torchrec_compress.testing.models import DENSE_IN, tiny_batch, tiny_tables

DIM = 16
KEEP_ONE = {"t_f2": LowRankOverride(skip=True)}  # one table stays uncompressed
CONFIGS = {
    "afm": AFMConfig(rank=8),
    "afm_one_kept": AFMConfig(rank=8, table_overrides=KEEP_ONE),
    "svd_one_kept": SVDConfig(rank=8, table_overrides=KEEP_ONE),
    # rank 2 of 16 dims, stored two factor rows to a row (the mean-pooled t_f1 too)
    "afm_packed": AFMConfig(
        rank=2, rank_multiple=1, table_overrides={"t_f0": LowRankOverride(skip=True)}
    ),
}


def _compressed_dlrm(config_name: str) -> DLRM:
    torch.manual_seed(0)
    model = DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tiny_tables(DIM)),
        dense_in_features=DENSE_IN,
        dense_arch_layer_sizes=[32, DIM],
        over_arch_layer_sizes=[32, 1],
    )
    compress_(model, CONFIGS[config_name], calibration=[tiny_batch(16, seed=i) for i in range(3)])
    assert isinstance(model.sparse_arch.embedding_bag_collection, LowRankEmbeddingBagCollection)
    return model


def _inputs(seed: int = 10) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    batch = tiny_batch(16, seed=seed)
    return batch.dense_features, batch.sparse_features


def _same_shapes(inputs: tuple[torch.Tensor, KeyedJaggedTensor]) -> tuple:
    """Other dense values and ids, same shapes (an exported program is specialised to them)."""
    dense, sparse = inputs
    other = KeyedJaggedTensor.from_lengths_sync(
        keys=sparse.keys(), values=(sparse.values() + 1) % 64, lengths=sparse.lengths()
    )
    return dense.flip(0), other


def _check_close(
    module: nn.Module, reference: nn.Module, grad: bool, same_shapes: bool = False
) -> None:
    batches = [_inputs(10), _same_shapes(_inputs(10)) if same_shapes else _inputs(11)]
    with torch.set_grad_enabled(grad):
        for inputs in batches:  # a second batch: nothing of the first is baked in
            expected = reference(*inputs).detach()
            got = module(*inputs)
            torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_fx_symbolic_trace_then_torchscript(config_name: str) -> None:
    model = _compressed_dlrm(config_name)
    traced = torchrec.fx.symbolic_trace(model)
    scripted = torch.jit.script(traced)
    for grad in (True, False):
        _check_close(traced, model, grad)
        _check_close(scripted, model, grad)


@pytest.mark.parametrize("config_name", ["afm_one_kept", "afm_packed"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_torch_export(grad: bool, config_name: str) -> None:
    model = _compressed_dlrm(config_name)
    with torch.set_grad_enabled(grad):
        exported = torch.export.export(model, _inputs())
    _check_close(exported.module(), model, grad, same_shapes=True)


@pytest.mark.parametrize("config_name", ["afm_one_kept", "afm_packed"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_torch_compile_fullgraph(grad: bool, config_name: str) -> None:
    torch._dynamo.reset()
    model = _compressed_dlrm(config_name)
    _check_close(torch.compile(model, fullgraph=True), model, grad)


@pytest.mark.parametrize(
    "dtype,tolerance", [(torch.bfloat16, 0.02), (torch.float16, 0.005)], ids=["bf16", "fp16"]
)
def test_half_precision_model(dtype: torch.dtype, tolerance: float) -> None:
    """``model.to(bf16/fp16)``: the compressed collection behaves like TorchRec's EBC in a half
    model (float32 output; DLRM's dense layers then need float32 inputs, as with a plain EBC)."""
    model = _compressed_dlrm("afm_one_kept")
    _, sparse = _inputs()
    with torch.no_grad():
        expected = model.sparse_arch(sparse)
    half = model.to(dtype)
    lowrank = half.sparse_arch.embedding_bag_collection
    assert lowrank.projection["t_f0"].dtype == lowrank.mean["t_f0"].dtype == dtype
    plain = EmbeddingBagCollection(tiny_tables(DIM)).to(dtype)
    for grad in (False, True):  # the inference path, then the training path
        with torch.set_grad_enabled(grad):
            got = half.sparse_arch(sparse)
        assert got.dtype == plain(sparse).values().dtype
        scale = float(expected.abs().max())
        assert float((got.float() - expected).abs().max()) <= tolerance * scale
    # one training step reaches the half-precision factors, projection and mean
    before = {n: p.detach().clone() for n, p in lowrank.named_parameters()}
    optimizer = torch.optim.SGD(lowrank.parameters(), lr=0.5)
    got.pow(2).mean().backward()
    optimizer.step()
    for name, param in lowrank.named_parameters():
        if "t_f0" in name:
            assert param.dtype == dtype and not torch.equal(param, before[name]), name


def test_rowwise_adagrad_in_backward_recipe() -> None:
    """TorchRec's recipe on every sparse-arch parameter (factor tables, projections, means)."""
    model = _compressed_dlrm("afm")
    sparse_arch = model.sparse_arch
    apply_optimizer_in_backward(RowWiseAdagrad, sparse_arch.parameters(), {"lr": 0.01})
    before = {n: p.detach().clone() for n, p in sparse_arch.named_parameters()}
    assert any(".mean." in n for n in before)
    for seed in (20, 21):
        model(*_inputs(seed)).sum().backward()
    for name, param in sparse_arch.named_parameters():
        assert param.dim() == 2, name  # row-wise state needs rows
        assert not torch.equal(param, before[name]), f"{name} was not trained"


def test_variable_batch_input_is_still_refused_eagerly() -> None:
    model = _compressed_dlrm("afm")
    kjt = KeyedJaggedTensor(
        keys=["f0", "f1", "f2"],
        values=torch.tensor([1, 2, 3, 4]),
        lengths=torch.tensor([1, 1, 1, 1]),
        stride_per_key_per_rank=[[2], [1], [1]],
    )
    with pytest.raises(ValueError, match="variable batch size per feature"):
        model.sparse_arch.embedding_bag_collection(kjt)
