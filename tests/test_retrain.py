"""The MEC paper's retraining protocol: ``reinitialize_dense_`` redraws the MLPs of a compressed
TorchRec model (DLRM, DLRM_DCN; plain and under DMP on 2 gloo processes) and leaves every
embedding collection (codes, codebooks, factor tables, projections) as it was."""

import copy

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM_DCN, DLRMTrain

from torchrec_compress import PQConfig, compress_, reinitialize_dense_
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.methods.lowrank.config import AFMConfig
from torchrec_compress.methods.pq.config import KMeansTraining
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import tiny_batch, tiny_dlrm, tiny_tables

CPU = torch.device("cpu")
SPARSE = "model.sparse_arch."


def _forward(model: nn.Module, batch: Batch) -> object:
    return model(batch)


def _compressed(config: object, seed: int = 0) -> nn.Module:
    model = tiny_dlrm(CPU, dim=16, seed=seed)
    calibration = [tiny_batch(64, seed=10 + i) for i in range(2)]
    compress_(model, config, calibration=calibration, forward_fn=_forward)  # type: ignore[arg-type]
    return model


def _split(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sparse = {k: v for k, v in state.items() if k.startswith(SPARSE)}
    dense = {k: v for k, v in state.items() if not k.startswith(SPARSE)}
    return sparse, dense


def test_pq_and_afm_models_keep_their_embeddings_and_redraw_every_dense_layer() -> None:
    pq = PQConfig(num_subspaces=4, num_centroids=16, training=KMeansTraining(kmeans_iterations=5))
    for config in (pq, AFMConfig(rank=4)):
        model = _compressed(config)
        sparse, dense = _split(model)
        assert any("codes" in k or "projection" in k for k in sparse), sorted(sparse)
        rng = torch.get_rng_state()
        names = reinitialize_dense_(model, seed=1)
        assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG stream is untouched
        assert names and not any(n.startswith(SPARSE) for n in names)
        sparse_after, dense_after = _split(model)
        for key, value in sparse.items():
            assert torch.equal(value, sparse_after[key]), key
        for key, value in dense.items():
            if key.endswith("bias") and not value.any():
                continue  # a zero bias may be redrawn as zero
            assert not torch.equal(value, dense_after[key]), f"{config}: {key} not redrawn"


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    model = _compressed(AFMConfig(rank=4))
    a, b, c = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    reinitialize_dense_(a, seed=7)
    reinitialize_dense_(b, seed=7)
    reinitialize_dense_(c, seed=8)
    for (key, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), key
        if not key.startswith(SPARSE) and pa.dim() > 1:
            assert not torch.equal(pa, pc), key


def test_dcn_cross_layers_without_reset_parameters_are_redrawn() -> None:
    torch.manual_seed(0)
    from torchrec import EmbeddingBagCollection

    model = DLRMTrain(
        DLRM_DCN(
            embedding_bag_collection=EmbeddingBagCollection(tables=tiny_tables(8)),
            dense_in_features=5,
            dense_arch_layer_sizes=[16, 8],
            over_arch_layer_sizes=[16, 1],
            dcn_num_layers=2,
            dcn_low_rank_dim=4,
        )
    )
    cross = model.model.inter_arch.crossnet  # type: ignore[union-attr]
    with torch.no_grad():
        for p in cross.bias:
            p.fill_(1.0)
    kernel = cross.W_kernels[0].detach().clone()
    names = reinitialize_dense_(model, seed=0)
    assert "model.inter_arch.crossnet.W_kernels" in names
    assert not torch.equal(kernel, cross.W_kernels[0])
    assert all(not p.any() for p in cross.bias)  # torchrec's own init: zero biases


def _reinit_sharded(rank: int, world_size: int) -> dict[str, object]:
    pq = PQConfig(num_subspaces=4, num_centroids=16, training=KMeansTraining(kmeans_iterations=5))
    model = shard_model(_compressed(pq), CPU)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reinitialize_dense_(model, seed=rank * 0 + 3)
    after = model.state_dict()
    dense = [k for k in after if "sparse_arch" not in k]
    sparse = [k for k in after if "sparse_arch" in k]
    local = {
        k: (v.local_tensor() if hasattr(v, "local_tensor") else v).detach().clone()
        for k, v in after.items()
        if k in dense
    }
    unchanged = all(
        torch.equal(
            before[k].local_tensor() if hasattr(before[k], "local_tensor") else before[k],
            after[k].local_tensor() if hasattr(after[k], "local_tensor") else after[k],
        )
        for k in sparse
    )
    return {"dense": local, "sparse_unchanged": unchanged, "n_sparse": len(sparse)}


def test_two_processes_draw_the_same_dense_weights_and_keep_their_shards() -> None:
    r0, r1 = run_multiprocess(_reinit_sharded, world_size=2)
    assert r0["sparse_unchanged"] and r1["sparse_unchanged"] and r0["n_sparse"] > 0
    dense0, dense1 = r0["dense"], r1["dense"]
    assert isinstance(dense0, dict) and isinstance(dense1, dict) and dense0
    for key, value in dense0.items():
        assert torch.equal(value, dense1[key]), key
