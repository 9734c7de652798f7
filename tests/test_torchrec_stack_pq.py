"""A PQ (MEC) compressed model wherever TorchRec's EBC goes: its pipeline, tracers, optimizers.

Models are TorchRec's own (``torchrec.models.dlrm.DLRM``, ``TestSparseNN`` with an EBC, a
position-weighted ``FeatureProcessedEmbeddingBagCollection`` and a weighted EBC, and an FPEBC with
``PositionWeightedModuleCollection``) compressed by ``compress_(model, MECConfig(mode="pq"))``.

Single process: ``torchrec.fx.symbolic_trace`` -> ``torch.jit.script``, ``torch.export`` and
``torch.compile(fullgraph=True)`` reproduce eager outputs (and codebook gradients), with and
without grad; ``model.to(torch.bfloat16)`` runs.

1 and 2 gloo processes (one spawn each): ``TrainPipelineSparseDist`` trains DLRM and TestSparseNN
to the weights of a plain loop; an in-backward optimizer on the codebooks survives sharding (updates as expected,
exposed in ``fused_optimizer``); an FPEBC over a PQ collection plans, shards and matches the
unsharded module; DMP without the PQ sharder warns.
"""

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torchrec.fx
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.test_utils import test_model  # a module: pytest would collect Test*
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ModuleSharder
from torchrec.models.dlrm import DLRMTrain
from torchrec.modules.feature_processor_ import (
    PositionWeightedModule,
    PositionWeightedModuleCollection,
)
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_compress.api import compress_
from torchrec_compress.distributed.planning import default_sharders, shard_model
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.methods.pq import kernels as _ops
from torchrec_compress.methods.pq.config import MECConfig, MECTraining
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
from torchrec_compress.methods.pq.sharded import PQEmbeddingBagCollectionSharder
from torchrec_compress.methods.pq.sharded_fp import (
    PQFeatureProcessedEmbeddingBagCollectionSharder,
    ShardedPQFeatureProcessedEmbeddingBagCollection,
)
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import tiny_batch, tiny_dlrm

PQ_CONFIG = MECConfig(
    mode="pq",
    num_subspaces=4,
    num_centroids=16,
    training=MECTraining(steps=5, sample_size=64, validation_size=64),
)
PQ_PATH = "model.sparse_arch.embedding_bag_collection"
CPU = torch.device("cpu")
LR = 0.05


# one intra-op thread for every test of this module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _pq_dlrm() -> DLRMTrain:
    """A DLRM whose three tables are PQ codes (same weights on every process)."""
    model = tiny_dlrm(CPU)
    compress_(model.model, PQ_CONFIG, calibration=[tiny_batch(16, seed=s) for s in range(3)])
    assert isinstance(model.model.sparse_arch.embedding_bag_collection, PQEmbeddingBagCollection)
    return model


def _codebook_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name.rpartition("codebooks.")[2]: p.grad.clone()
        for name, p in model.named_parameters()
        if "codebooks." in name and p.grad is not None
    }


# ---------------------------------------------------------------- single process: tracers, bf16


@pytest.fixture(scope="module")
def dlrm_and_batch() -> tuple[nn.Module, tuple[torch.Tensor, KeyedJaggedTensor]]:
    batch = tiny_batch(8, seed=99)
    return _pq_dlrm().model, (batch.dense_features, batch.sparse_features)


def _check_matches_eager(
    model: nn.Module, compiled: Any, args: tuple[torch.Tensor, KeyedJaggedTensor]
) -> None:
    with torch.no_grad():
        assert (compiled(*args) - model(*args)).abs().max() <= 1e-5
    model.zero_grad()
    model(*args).sum().backward()
    expected = _codebook_grads(model)
    model.zero_grad()
    compiled(*args).sum().backward()
    got = _codebook_grads(model)
    assert sorted(got) == sorted(expected) == ["t_f0", "t_f1", "t_f2"]
    for name, grad in expected.items():
        assert grad.abs().max() > 0 and (got[name] - grad).abs().max() <= 1e-5, name


def test_symbolic_trace_then_script_matches_eager(
    dlrm_and_batch: tuple[nn.Module, tuple[torch.Tensor, KeyedJaggedTensor]],
) -> None:
    model, args = dlrm_and_batch
    traced = torchrec.fx.symbolic_trace(model)
    # the per-feature lookup is one leaf call (keeps the C++ kernel), not traced through
    assert "pq_feature_lookup" in traced.code
    scripted = torch.jit.script(traced)
    if _ops.HAS_KERNELS:
        assert "torchrec_compress::pq_pooled_lookup" in str(scripted.inlined_graph)
    # scripted modules share the parameters of the traced one, which shares the model's
    _check_matches_eager(model, scripted, args)


def test_scripted_bfloat16_model_takes_the_torch_path_and_matches_eager(
    dlrm_and_batch: tuple[nn.Module, tuple[torch.Tensor, KeyedJaggedTensor]],
) -> None:
    """bf16 codebooks have no kernel: the scripted pure-torch lookup runs instead.  The
    collection pools to float32 like TorchRec's EBC, so (as with a plain EBC) a whole bf16
    DLRM would feed float32 into bf16 layers: its sparse arch is what runs in bf16."""
    model, (_, sparse) = dlrm_and_batch
    low = copy.deepcopy(model.sparse_arch).to(torch.bfloat16)
    scripted = torch.jit.script(torchrec.fx.symbolic_trace(low))
    assert "embedding_bag" in str(scripted.inlined_graph)
    with torch.no_grad():
        assert scripted(sparse).dtype == torch.float32
    _check_matches_eager(low, scripted, (sparse,))


def test_export_matches_eager_and_keeps_the_kernel(
    dlrm_and_batch: tuple[nn.Module, tuple[torch.Tensor, KeyedJaggedTensor]],
) -> None:
    model, args = dlrm_and_batch
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            program = torch.export.export(model, args)
        if _ops.HAS_KERNELS:
            assert "torchrec_compress.pq_pooled_lookup" in str(program.graph)
        with torch.no_grad():
            assert (program.module()(*args) - model(*args)).abs().max() <= 1e-5


def test_compile_fullgraph_matches_eager(
    dlrm_and_batch: tuple[nn.Module, tuple[torch.Tensor, KeyedJaggedTensor]],
) -> None:
    model, args = dlrm_and_batch
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    _check_matches_eager(model, compiled, args)


def test_bfloat16_collection_pools_to_float32_and_trains() -> None:
    """Like TorchRec's EmbeddingBagCollection (float32 pooled outputs whatever its rows' type),
    a bf16 PQ collection returns float32 (it returned bf16), and its bf16 codebooks train."""
    pq = _pq_dlrm().model.sparse_arch.embedding_bag_collection
    features = tiny_batch(8, seed=5).sparse_features
    expected = pq(features).values()
    low = copy.deepcopy(pq).to(torch.bfloat16)
    assert low.codebooks["t_f0"].dtype == torch.bfloat16 and low.codes.t_f0.dtype == torch.uint8
    got = low(features).values()
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    got.sum().backward()
    assert low.codebooks["t_f0"].grad is not None and low.codebooks["t_f0"].grad.abs().max() > 0


# ---------------------------------------------------------------- 1 and 2 processes


def _pipeline_checks(rank: int, world_size: int) -> dict[str, float]:
    """TrainPipelineSparseDist vs a plain loop, 3 SGD steps, on the same sharded DLRM."""
    out = {}
    batches = [tiny_batch(8, seed=40 + 2 * step + rank) for step in range(3)]
    for sharding_type in ("table_wise", "row_wise"):
        trained = []
        for use_pipeline in (False, True):
            model = _pq_dlrm()
            state = copy.deepcopy(model.state_dict())
            dmp = shard_model(model, CPU, sharding_type=sharding_type)
            load_full_state_dict_(dmp, state)
            optimizer = torch.optim.SGD(dmp.parameters(), lr=LR)
            if use_pipeline:
                pipeline = TrainPipelineSparseDist(dmp, optimizer, CPU)
                iterator = iter(batches)
                for _ in batches:
                    pipeline.progress(iterator)
            else:
                for batch in batches:
                    optimizer.zero_grad()
                    loss, _ = dmp(batch)
                    loss.backward()
                    optimizer.step()
            trained.append(
                {k: v.detach().clone() for k, v in dmp.named_parameters() if "codes." not in k}
            )
        plain, piped = trained
        assert sorted(plain) == sorted(piped) and any("codebooks." in k for k in plain)
        out[f"pipeline/{sharding_type}"] = max(
            float((plain[k] - piped[k]).abs().max()) for k in plain
        )
        out[f"pipeline/{sharding_type}/moved"] = max(
            # parameters are [M * K, dsub] (a row per codeword), state dicts [M, K, dsub]
            float((plain[k].view_as(state[key]) - state[key]).abs().max())
            for k in plain
            if "codebooks." in k
            for key in [k.removeprefix("module.")]
        )
    return out


SPARSENN_TABLES = [
    EmbeddingBagConfig(
        name=f"feature_{i}", feature_names=[f"feature_{i}"], embedding_dim=16, num_embeddings=n
    )
    for i, n in enumerate((100, 120, 140))
]
SPARSENN_WEIGHTED = [
    EmbeddingBagConfig(
        name="weighted_0", feature_names=["weighted_feature_0"], embedding_dim=8, num_embeddings=50
    )
]


def _sparsenn_batches(num: int, seed: int) -> list[test_model.ModelInput]:
    return [
        test_model.ModelInput.generate(
            batch_size=8,
            world_size=1,
            num_float_features=10,
            tables=SPARSENN_TABLES,
            weighted_tables=SPARSENN_WEIGHTED,
            random_seed=seed + i,
            pooling_avg=4,
        )[1][0]
        for i in range(num)
    ]


def _pq_sparsenn() -> test_model.TestSparseNN:
    """TorchRec's TestSparseNN with an EBC, a position-weighted FPEBC (``feature_1``) and a
    weighted EBC, all three product-quantized."""
    torch.manual_seed(0)
    model = test_model.TestSparseNN(
        tables=SPARSENN_TABLES,
        weighted_tables=SPARSENN_WEIGHTED,
        num_float_features=10,
        max_feature_lengths={"feature_1": 64},  # the FPEBC's table (named as its feature)
    )
    compress_(model, PQ_CONFIG, calibration=_sparsenn_batches(3, seed=0))
    assert isinstance(model.sparse.fp_ebc._embedding_bag_collection, PQEmbeddingBagCollection)
    return model


def _fp_sharders() -> list[ModuleSharder[nn.Module]]:
    """The project's sharders with the PQ FPEBC sharder in place of TorchRec's FPEBC sharder
    (one sharder per module type)."""
    return [
        *(
            s
            for s in default_sharders()
            if s.module_type is not FeatureProcessedEmbeddingBagCollection
        ),
        PQFeatureProcessedEmbeddingBagCollectionSharder(),  # type: ignore[list-item]
    ]


def _pipeline_sparsenn_checks(rank: int, world_size: int) -> dict[str, float]:
    """TrainPipelineSparseDist vs a plain loop on TestSparseNN (EBC + FPEBC + weighted EBC)."""
    batches = _sparsenn_batches(3, seed=100 + 10 * rank)
    topology = Topology(world_size=world_size, compute_device="cpu")
    trained = []
    for use_pipeline in (False, True):
        model = _pq_sparsenn()
        state = copy.deepcopy(model.state_dict())
        plan = EmbeddingShardingPlanner(topology).collective_plan(
            model, _fp_sharders(), dist.group.WORLD
        )
        dmp = DistributedModelParallel(model, device=CPU, plan=plan, sharders=_fp_sharders())
        load_full_state_dict_(dmp, state)
        optimizer = torch.optim.SGD(dmp.parameters(), lr=1.0)
        if use_pipeline:
            pipeline = TrainPipelineSparseDist(dmp, optimizer, CPU)
            iterator = iter(batches)
            for _ in batches:
                pipeline.progress(iterator)
        else:
            for batch in batches:
                optimizer.zero_grad()
                loss, _ = dmp(batch)
                loss.backward()
                optimizer.step()
        trained.append({k: v.detach().clone() for k, v in dmp.named_parameters()})
    plain, piped = trained
    position_weights = "sparse.fp_ebc._feature_processors.position_weights.feature_1"
    return {
        "pipeline/sparsenn": max(float((plain[k] - piped[k]).abs().max()) for k in plain),
        "pipeline/sparsenn/position_weights_moved": float(
            (plain[position_weights] - state[position_weights]).abs().max()
        ),
    }


def _in_backward_optimizer_checks(rank: int, world_size: int) -> dict[str, Any]:
    """Adagrad attached in backward to ``sparse_arch.parameters()`` (the codebooks) survives DMP."""
    model = _pq_dlrm()
    reference = copy.deepcopy(model)
    batch = tiny_batch(16, seed=70 + rank)
    loss, _ = reference(batch)
    loss.backward()
    expected = {}
    for name, grad in _codebook_grads(reference).items():
        dist.all_reduce(grad)
        books = reference.model.sparse_arch.embedding_bag_collection.codebooks[name]
        books = nn.Parameter(books.detach().clone())
        books.grad = grad / world_size  # DDP averages before the in-backward step
        torch.optim.Adagrad([books], lr=LR).step()
        expected[name] = books.detach()

    sparse_arch = model.model.sparse_arch
    _apply_optimizer_in_backward(torch.optim.Adagrad, sparse_arch.parameters(), {"lr": LR})
    state = copy.deepcopy(model.state_dict())
    dmp = shard_model(model, CPU, sharding_type="row_wise")
    load_full_state_dict_(dmp, state)
    loss, _ = dmp(batch)
    loss.backward()
    got = {
        name: dmp.module.model.sparse_arch.embedding_bag_collection.codebooks[name].detach()
        for name in expected
    }
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    # the fused optimizer's state dict is the live Adagrad state: a load writes into it
    saved = dmp.fused_optimizer.state_dict()
    modified = copy.deepcopy(saved)
    modified["state"][f"{PQ_PATH}.codebooks.t_f0"]["sum"].fill_(7.0)
    dmp.fused_optimizer.load_state_dict(modified)
    books = dmp.module.model.sparse_arch.embedding_bag_collection.codebooks["t_f0"]
    return {
        "in_backward/update": max(float((got[n] - expected[n]).abs().max()) for n in expected),
        "in_backward/fused_keys": sorted(k for k in saved["state"] if "codebooks." in k),
        "in_backward/loaded_state": books._in_backward_optimizers[0].state[books]["sum"].tolist(),
        "in_backward/codebooks_left_to_dense_optimizer": sorted(
            k for k in dense if "codebooks." in k
        ),
    }


class _FPModel(nn.Module):
    """TorchRec's position-weighted FPEBC (the feature-processor recipe) and a linear head;
    the processors as one ``PositionWeightedModuleCollection`` or one module per feature."""

    def __init__(self, per_feature: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        tables = [
            EmbeddingBagConfig(
                name=f"t{i}", embedding_dim=8, num_embeddings=rows, feature_names=[f"f{i}"]
            )
            for i, rows in enumerate((60, 90))
        ]
        self.fpebc = FeatureProcessedEmbeddingBagCollection(
            EmbeddingBagCollection(tables, is_weighted=True),
            {"f0": PositionWeightedModule(4), "f1": PositionWeightedModule(4)}  # type: ignore[arg-type]
            if per_feature
            else PositionWeightedModuleCollection({"f0": 4, "f1": 4}),
        )
        with torch.no_grad():  # non-trivial position weights
            for weight in self.fpebc._feature_processors.parameters():
                weight.copy_(torch.linspace(0.5, 2.0, weight.numel()))
        self.head = nn.Linear(16, 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.fpebc(features).values())


def _fp_batch(seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (2, 8), generator=g)
    values = torch.cat(
        [
            torch.randint(0, r, (int(n),), generator=g)
            for r, n in zip((60, 90), lengths.sum(1), strict=True)
        ]
    )
    return KeyedJaggedTensor.from_lengths_sync(["f0", "f1"], values, lengths.flatten())


def _fp_model(per_feature: bool = False) -> _FPModel:
    model = _FPModel(per_feature)
    compress_(model, PQ_CONFIG, calibration=[_fp_batch(s) for s in range(3)])
    assert isinstance(model.fpebc._embedding_bag_collection, PQEmbeddingBagCollection)
    return model


def _adagrad_step(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``param`` after one Adagrad step on ``grad`` (what an in-backward Adagrad must give;
    ``param`` as the parameter is shaped: codebooks are ``[M * K, dsub]``, ``[M, K, dsub]`` in
    state dicts)."""
    updated = nn.Parameter(param.detach().clone().view_as(grad))
    updated.grad = grad
    torch.optim.Adagrad([updated], lr=LR).step()
    return updated.detach()


def _fp_reference(
    batch: KeyedJaggedTensor, world_size: int, per_feature: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Unsharded output and ``fpebc`` gradients averaged over the processes (DDP's)."""
    reference = _fp_model(per_feature)
    reference(batch).sum().backward()
    grads = {n: p.grad.clone() for n, p in reference.named_parameters() if n.startswith("fpebc.")}
    assert any("position_weight" in n for n in grads)
    for grad in grads.values():
        dist.all_reduce(grad)
        grad /= world_size
    return reference(batch).detach(), grads


def _fp_checks(rank: int, world_size: int) -> dict[str, Any]:
    """An FPEBC over a PQ collection plans and shards (table- and row-wise) and matches; an
    in-backward Adagrad on ``fpebc.parameters()`` (codebooks and position weights) steps on the
    averaged gradients."""
    out: dict[str, Any] = {}
    batch = _fp_batch(100 + rank)
    references = {flag: _fp_reference(batch, world_size, flag) for flag in (False, True)}
    sharders = _fp_sharders()
    topology = Topology(world_size=world_size, compute_device="cpu")
    for key, sharding_type, in_backward, per_feature in (
        ("fp/table_wise", "table_wise", False, False),
        ("fp/row_wise", "row_wise", False, False),
        ("fp/row_wise/in_backward", "row_wise", True, False),
        ("fp/row_wise/per_feature", "row_wise", False, True),
    ):
        expected_out, expected_grads = references[per_feature]
        model = _fp_model(per_feature)
        if in_backward:
            _apply_optimizer_in_backward(torch.optim.Adagrad, model.fpebc.parameters(), {"lr": LR})
        constraints = {
            t: ParameterConstraints(sharding_types=[sharding_type]) for t in ("t0", "t1")
        }
        plan = EmbeddingShardingPlanner(topology, constraints=constraints).collective_plan(
            model, sharders, dist.group.WORLD
        )
        out[f"{key}/plan"] = sorted(
            {(p.sharding_type, p.compute_kernel) for p in plan.plan["fpebc"].values()}
        )
        state = copy.deepcopy(model.state_dict())
        dmp = DistributedModelParallel(model, device=CPU, plan=plan, sharders=sharders)
        assert isinstance(dmp.module.fpebc, ShardedPQFeatureProcessedEmbeddingBagCollection)
        load_full_state_dict_(dmp, state)
        got = dmp(batch)
        got.sum().backward()
        params = {n.removeprefix("module."): p for n, p in dmp.named_parameters()}
        out[f"{key}/forward"] = float((got - expected_out).abs().max())
        if in_backward:
            out[f"{key}/update"] = max(
                float((params[n] - _adagrad_step(state[n], g)).abs().max())
                for n, g in expected_grads.items()
            )
            out[f"{key}/fused_keys"] = sorted(dmp.fused_optimizer.params)
        else:
            out[f"{key}/grad"] = max(
                float((params[n].grad - g).abs().max()) for n, g in expected_grads.items()
            )
    return out


def _unsharded_warning_checks(rank: int, world_size: int) -> dict[str, list[str]]:
    """DMP given every sharder but the PQ one replicates the codes: a warning says so."""
    out = {}
    batch = tiny_batch(4, seed=rank)
    for name, keep in (("without", False), ("with", True)):
        sharders = [
            s
            for s in default_sharders()
            if keep or not isinstance(s, PQEmbeddingBagCollectionSharder)
        ]
        dmp = DistributedModelParallel(_pq_dlrm(), device=CPU, sharders=sharders)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dmp(batch)
        out[f"warning/{name}_sharder"] = [
            str(w.message) for w in caught if "PQEmbeddingBagCollection" in str(w.message)
        ]
    return out


def _run(rank: int, world_size: int) -> dict[str, Any]:
    return {
        **_pipeline_checks(rank, world_size),
        **_pipeline_sparsenn_checks(rank, world_size),
        **_in_backward_optimizer_checks(rank, world_size),
        **_fp_checks(rank, world_size),
        **_unsharded_warning_checks(rank, world_size),
    }


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2proc"])
def results(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return run_multiprocess(_run, world_size=request.param)


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_train_pipeline_sparse_dist_matches_plain_loop(
    results: list[dict[str, Any]], sharding_type: str
) -> None:
    for r in results:
        assert r[f"pipeline/{sharding_type}/moved"] > 1e-4, r  # the codebooks did train
        assert r[f"pipeline/{sharding_type}"] <= 1e-6, r


def test_train_pipeline_sparse_dist_on_test_sparse_nn_with_fpebc(
    results: list[dict[str, Any]],
) -> None:
    for r in results:
        assert r["pipeline/sparsenn/position_weights_moved"] > 1e-6, r
        assert r["pipeline/sparsenn"] <= 1e-6, r


def test_in_backward_optimizer_on_codebooks_survives_sharding(
    results: list[dict[str, Any]],
) -> None:
    for r in results:
        assert r["in_backward/update"] <= 1e-6, r
        assert r["in_backward/fused_keys"] == [f"{PQ_PATH}.codebooks.t_f{i}" for i in range(3)]
        assert r["in_backward/codebooks_left_to_dense_optimizer"] == []
        assert torch.tensor(r["in_backward/loaded_state"]).eq(7.0).all()


@pytest.mark.parametrize("case", ["table_wise", "row_wise", "row_wise/per_feature"])
def test_fpebc_over_pq_plans_shards_and_matches(results: list[dict[str, Any]], case: str) -> None:
    sharding_type = case.split("/")[0]
    for r in results:
        assert r[f"fp/{case}/plan"] == [(sharding_type, "quant")]
        assert r[f"fp/{case}/forward"] <= 1e-6, r
        assert r[f"fp/{case}/grad"] <= 1e-6, r


def test_fpebc_over_pq_in_backward_optimizer(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["fp/row_wise/in_backward/forward"] <= 1e-6, r
        assert r["fp/row_wise/in_backward/update"] <= 1e-6, r
        assert r["fp/row_wise/in_backward/fused_keys"] == [
            "fpebc._embedding_bag_collection.codebooks.t0",
            "fpebc._embedding_bag_collection.codebooks.t1",
            "fpebc._feature_processors.position_weights.f0",
            "fpebc._feature_processors.position_weights.f1",
        ]


def test_dmp_without_pq_sharder_warns(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["warning/with_sharder"] == []
        if len(results) == 1:  # one process: nothing is replicated
            assert r["warning/without_sharder"] == []
            continue
        (message,) = r["warning/without_sharder"]
        assert "t_f0" in message and "PQEmbeddingBagCollectionSharder" in message
        assert "2 processes" in message


def test_torchrec_fpebc_sharder_on_pq_says_which_sharder_to_use() -> None:
    topology = Topology(world_size=2, compute_device="cpu")
    with pytest.raises(ValueError, match=r"\['t0', 't1'\].*PQFeatureProcessedEmbeddingBag"):
        EmbeddingShardingPlanner(topology).plan(_fp_model(), default_sharders())
    plan = EmbeddingShardingPlanner(topology).plan(_fp_model(), _fp_sharders())
    assert {p.compute_kernel for p in plan.plan["fpebc"].values()} == {"quant"}


def test_default_sharders_of_a_model_pick_its_fpebc_sharder() -> None:
    topology = Topology(world_size=2, compute_device="cpu")
    model = _fp_model()
    plan = EmbeddingShardingPlanner(topology).plan(model, default_sharders(model))
    assert {p.compute_kernel for p in plan.plan["fpebc"].values()} == {"quant"}
    mixed = nn.ModuleDict({"pq": _fp_model().fpebc, "plain": _FPModel().fpebc})
    with pytest.raises(ValueError, match=r"\['pq'\].*\['plain'\]"):
        default_sharders(mixed)


def test_fp_sharder_refuses_an_uncompressed_fpebc() -> None:
    sharder = PQFeatureProcessedEmbeddingBagCollectionSharder()
    with pytest.raises(TypeError, match=r"EmbeddingBagCollection \(tables \['t0', 't1'\]\)"):
        sharder.shardable_parameters(_FPModel().fpebc)
