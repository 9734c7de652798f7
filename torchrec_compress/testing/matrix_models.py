"""The models and batches of the differential test matrix: the TorchRec model of a
:class:`~torchrec_compress.testing.matrix_cases.Case`, each process's batches and their union."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.test_utils.test_model import ModelInput, TestSparseNN
from torchrec.models.deepfm import SimpleDeepFMNN
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection, DLRMTrain

from torchrec_compress.testing.matrix_cases import (
    META,
    MODELS,
    NUM_DENSE,
    Case,
)

# --- models and batches -----------------------------------------------------------------


class DeepFMTrain(nn.Module):
    """TorchRec's ``SimpleDeepFMNN`` with a loss, taking a ``Batch`` like ``DLRMTrain``."""

    def __init__(self, model: SimpleDeepFMNN) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        logits = self.model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())


def build_model(case: Case, device: torch.device) -> nn.Module:
    """The case's uncompressed model; weights depend only on ``case.seed`` (when on CPU)."""
    torch.manual_seed(case.seed)
    plain = [t.config() for t in case.tables if t.kind in ("plain", "position")]
    if case.model == "sparsenn":
        weighted = [t.config() for t in case.tables if t.kind == "weighted"]
        position = {t.name: 4 for t in case.tables if t.kind == "position"}
        names = [
            f"{f}@{t.name}" if case.shared(t) else f
            for t in case.tables
            if t.kind != "weighted"
            for f in t.features
        ]
        model = TestSparseNN(
            tables=plain,
            weighted_tables=weighted,
            num_float_features=NUM_DENSE,
            embedding_groups={"group_0": names},
            dense_device=device,
            sparse_device=device,
            max_feature_lengths=position or None,
        )
        if position and device != META:
            with torch.no_grad():  # position weights start at 1: make them matter
                for name, p in model.named_parameters():
                    if "position_weight" in name:
                        p.uniform_(0.5, 1.5)
        return model
    dim = case.tables[0].dim
    ebc = EmbeddingBagCollection(tables=plain, device=device)
    if case.model == "deepfm":
        return DeepFMTrain(
            SimpleDeepFMNN(
                num_dense_features=NUM_DENSE,
                embedding_bag_collection=ebc,
                hidden_layer_size=8,
                deep_fm_dimension=4,
            ).to(device)
        )
    arch: dict[str, Any] = dict(
        embedding_bag_collection=ebc,
        dense_in_features=NUM_DENSE,
        dense_arch_layer_sizes=[16, dim],
        over_arch_layer_sizes=[8, 1],
        dense_device=device,
    )
    if case.model == "dlrm":
        return DLRMTrain(DLRM(**arch))
    if case.model == "dcn":
        return DLRMTrain(DLRM_DCN(**arch, dcn_num_layers=2, dcn_low_rank_dim=4))
    if case.model == "projection":
        return DLRMTrain(
            DLRM_Projection(
                **arch,
                interaction_branch1_layer_sizes=[16, 2 * dim],
                interaction_branch2_layer_sizes=[16, 2 * dim],
            )
        )
    raise ValueError(f"unknown model {case.model!r}; valid: {', '.join(MODELS)}")


def sparse_arch(model: nn.Module) -> nn.Module:
    """The module holding the case model's embedding collections (DMP-wrapped or not)."""
    module = model.module if isinstance(model, DistributedModelParallel) else model
    if isinstance(module, TestSparseNN):
        return module.sparse
    inner = module.model
    arch = getattr(inner, "sparse_arch", None) or getattr(inner, "sparse_arch_module", None)
    assert isinstance(arch, nn.Module)
    return arch


def random_kjt(
    features: list[tuple[str, int, int]], batch: int, g: torch.Generator, weighted: bool
) -> KeyedJaggedTensor:
    """Bags of 0..max ids (empty bags included) for ``(feature, rows, max length)``."""
    lengths = [torch.randint(0, m + 1, (batch,), generator=g) for _, _, m in features]
    values = [
        torch.randint(0, rows, (int(n.sum()),), generator=g)
        for (_, rows, _), n in zip(features, lengths, strict=True)
    ]
    total = int(sum(int(n.sum()) for n in lengths))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f for f, _, _ in features],
        values=torch.cat(values) if values else torch.empty(0, dtype=torch.long),
        lengths=torch.cat(lengths).int(),
        weights=torch.rand(total, generator=g) + 0.5 if weighted else None,
    )


def _features(case: Case, kinds: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """``(feature, rows every table reading it has, max bag length)`` of the given kinds."""
    rows: dict[str, int] = {}
    longest: dict[str, int] = {}
    for t in case.tables:
        if t.kind in kinds:
            for f in t.features:
                rows[f] = min(rows.get(f, t.rows), t.rows)
                longest[f] = 4 if t.kind == "position" else 5
    return [(f, rows[f], longest[f]) for f in rows]


def make_batch(case: Case, rank: int, step: int) -> Any:
    """Process ``rank``'s batch number ``step`` (a ``ModelInput`` or a ``Batch``)."""
    g = torch.Generator().manual_seed(case.seed * 1000 + 100 * step + rank)
    size = case.batch_size
    dense = torch.randn(size, NUM_DENSE, generator=g)
    labels = torch.randint(0, 2, (size,), generator=g).float()
    idlist = random_kjt(_features(case, ("plain", "position")), size, g, weighted=False)
    if case.model == "sparsenn":
        weighted = _features(case, ("weighted",))
        return ModelInput(
            float_features=dense,
            idlist_features=idlist,
            idscore_features=random_kjt(weighted, size, g, weighted=True) if weighted else None,
            label=labels,
        )
    return Batch(dense_features=dense, sparse_features=idlist, labels=labels)


def _concat_kjt(kjts: list[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    keys = kjts[0].keys()
    per_key = [k.to_dict() for k in kjts]
    lengths, values, weights = [], [], []
    for key in keys:
        for d in per_key:
            jt = d[key]
            lengths.append(jt.lengths())
            values.append(jt.values())
            if jt.weights_or_none() is not None:
                weights.append(jt.weights())
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat(values),
        lengths=torch.cat(lengths).int(),
        weights=torch.cat(weights) if weights else None,
    )


def union_batch(case: Case, step: int) -> Any:
    """All processes' batches of ``step`` as one (what the unsharded model trains on)."""
    batches = [make_batch(case, r, step) for r in range(case.world_size)]
    if isinstance(batches[0], ModelInput):
        return ModelInput(
            float_features=torch.cat([b.float_features for b in batches]),
            idlist_features=_concat_kjt([b.idlist_features for b in batches]),
            idscore_features=(
                _concat_kjt([b.idscore_features for b in batches])
                if batches[0].idscore_features is not None
                else None
            ),
            label=torch.cat([b.label for b in batches]),
        )
    return Batch(
        dense_features=torch.cat([b.dense_features for b in batches]),
        sparse_features=_concat_kjt([b.sparse_features for b in batches]),
        labels=torch.cat([b.labels for b in batches]),
    )


def forward_fn(model: nn.Module, batch: Any) -> Any:
    """How calibration runs a case model on one batch."""
    return model(batch)


def predictions(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's outputs on ``batch`` in eval mode (logits, or TestSparseNN's predictions)."""
    model.eval()
    with torch.no_grad():
        out = model(batch)
    model.train()
    if isinstance(out, tuple):
        out = out[1][1] if isinstance(out[1], tuple) else out[1]
    return out.detach().float().flatten()
