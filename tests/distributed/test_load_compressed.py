"""``load_compressed``: a compressed DMP checkpoint into the *uncompressed* model, any world size.

A DLRM is compressed under DMP with AFM, then its factor tables with PQ (AFM+PQ) or int8; each stage's
checkpoint (``report.reshard(checkpoint_dir=...)``, ``save_compressed``) carries its layout, and
``load_compressed(tiny_dlrm(meta), path, device)`` rebuilds, shards and loads it: the logits equal
the compressed model's, in 1 and 2 processes, and a checkpoint written by 2 processes loads in 1.
"""

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.datasets.utils import Batch

from torchrec_compress import checkpoint
from torchrec_compress.api import compress_
from torchrec_compress.distributed.compression import (
    load_compressed,
    read_compression_layout,
    save_compressed,
)
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.distributed.state import load_full_state_dict_
from torchrec_compress.methods.lowrank.config import AFMConfig
from torchrec_compress.methods.pq.config import PQConfig
from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig
from torchrec_compress.testing import run_multiprocess
from torchrec_compress.testing.models import tiny_batch, tiny_dlrm

CPU = torch.device("cpu")
META = torch.device("meta")
EBC = "model.sparse_arch.embedding_bag_collection"
AFM = AFMConfig(rank=8)
PQ = PQConfig(num_subspaces=2, num_centroids=16)


def _forward(model: nn.Module, batch: Batch) -> object:
    return model(batch)


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch)[1][1]


def _compress_and_load(rank: int, world_size: int, out: str) -> dict[str, Any]:
    reference = tiny_dlrm(CPU, dim=16, seed=3)
    dmp = shard_model(tiny_dlrm(META, dim=16), CPU)
    load_full_state_dict_(dmp, reference.state_dict())
    calibration = [tiny_batch(32, seed=100 + rank)]
    probe = tiny_batch(16, seed=7 + rank)

    afm_dir = str(Path(out, "afm"))
    afm = compress_(dmp, AFM, calibration, forward_fn=_forward).reshard(CPU, checkpoint_dir=afm_dir)
    loaded_afm = load_compressed(tiny_dlrm(META, dim=16), afm_dir, CPU)

    both_dir = str(Path(out, "afm_pq"))
    both = compress_(afm, PQ, calibration, forward_fn=_forward).reshard(CPU)
    save_compressed(both, both_dir, [AFM, PQ])
    loaded_both = load_compressed(tiny_dlrm(META, dim=16), both_dir, CPU)
    layout = read_compression_layout(both_dir)
    assert layout is not None

    int8_dir = str(Path(out, "afm_int8"))
    int8 = compress_(afm, RowWiseQuantConfig(bits=8)).reshard(CPU, checkpoint_dir=int8_dir)
    loaded_int8 = load_compressed(tiny_dlrm(META, dim=16), int8_dir, CPU)
    return {
        "afm_diff": float((_logits(loaded_afm, probe) - _logits(afm, probe)).abs().max()),
        "both_diff": float((_logits(loaded_both, probe) - _logits(both, probe)).abs().max()),
        "int8_diff": float((_logits(loaded_int8, probe) - _logits(int8, probe)).abs().max()),
        "kinds": (layout.modules[EBC]["kind"], layout.modules[EBC]["factors"]["kind"]),
        "configs": [type(c).__name__ for c in layout.configs],
        "logits": _logits(loaded_both, probe),
    }


def _load_written_by_two(rank: int, world_size: int, out: str) -> torch.Tensor:
    both = load_compressed(tiny_dlrm(META, dim=16), str(Path(out, "afm_pq")), CPU)
    return torch.cat([_logits(both, tiny_batch(16, seed=7 + r)) for r in range(2)])


@pytest.mark.parametrize("world_size", [1, 2])
def test_load_compressed_afm_and_afm_pq(world_size: int, tmp_path: Path) -> None:
    results = run_multiprocess(_compress_and_load, world_size=world_size, out=str(tmp_path))
    for result in results:
        assert result["afm_diff"] < 1e-6 and result["both_diff"] < 1e-6
        assert result["int8_diff"] < 1e-6
        assert result["kinds"] == ("composite", "pq")
        assert result["configs"] == ["AFMConfig", "PQConfig"]
    if world_size == 2:
        (one,) = run_multiprocess(_load_written_by_two, world_size=1, out=str(tmp_path))
        written = torch.cat([r["logits"] for r in results])
        assert float((one - written).abs().max()) < 1e-6


def test_checkpoint_without_layout_is_refused_by_name(tmp_path: Path) -> None:
    path = str(tmp_path / "checkpoint")
    checkpoint.save({"model": {"w": torch.ones(2)}}, path)
    assert read_compression_layout(path) is None
    with pytest.raises(ValueError, match="holds no compression layout .* pass layout="):
        load_compressed(tiny_dlrm(META), path, CPU)


def test_layout_is_read_only_after_the_manifest_verifies(tmp_path: Path) -> None:
    """DCP's ``.metadata`` is a pickle: it was unpickled before any check (issue 15)."""
    path = str(tmp_path / "checkpoint")
    checkpoint.save({"model": {"w": torch.ones(2)}}, path)
    Path(path, ".metadata").write_bytes(b"not a pickle")  # unpickling this would raise
    with pytest.raises(checkpoint.CheckpointError, match="'.metadata' has .* bytes"):
        read_compression_layout(path)
    os.remove(Path(path, checkpoint.MANIFEST))
    with pytest.raises(checkpoint.CheckpointError, match="has no MANIFEST.json"):
        read_compression_layout(path)
    # a plain DCP checkpoint (no manifest) names what is missing, before anything is read
    plain = str(tmp_path / "plain")
    dcp.save({"model": {"w": torch.ones(2)}}, checkpoint_id=plain, no_dist=True)
    with pytest.raises(checkpoint.CheckpointError, match="has no MANIFEST.json"):
        read_compression_layout(plain)
