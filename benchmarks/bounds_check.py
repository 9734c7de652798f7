"""Cost of refusing out-of-range ids in a DMP-sharded DLRM training step.

``BoundsCheckedShardedEmbeddingBagCollection`` checks every batch's ids against their tables
before the input dist (:class:`~torchrec_compress.guards.FeatureIdRanges`).  This script trains
the example DLRM (synthetic default schema) sharded by DMP and times, interleaved in a fresh
random order every round, a training step with the check and one with the check switched off,
plus the check alone on the same batch; it reports the medians and the median ratios.

Run: ``python benchmarks/bounds_check.py`` (``--world-size 2`` for two gloo processes)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import markdown_table, run_header  # noqa: E402

from examples.dlrm.main import quiet_torchrec  # noqa: E402
from examples.dlrm.model import ModelConfig, build_model  # noqa: E402
from examples.dlrm.train import TrainConfig, attach_sparse_optimizer, build_optimizer  # noqa: E402
from torchrec_compress.data import get_dataset  # noqa: E402
from torchrec_compress.distributed.embeddingbag import BoundsCheckedShardedEmbeddingBagCollection
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.testing import run_multiprocess  # noqa: E402


class _NoCheck:
    def check(self, features: Any) -> None:
        return None


def _measure(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, list[float]]:
    quiet_torchrec()
    torch.set_num_threads(args.threads)
    data = get_dataset("synthetic", seed=0)
    batches = list(islice(data.batches("train", args.batch_size, rank, world_size), 8))
    torch.manual_seed(0)
    model = build_model(data.schema, ModelConfig(embedding_dim=args.dim), torch.device("meta"))
    config = TrainConfig(batch_size=args.batch_size)
    attach_sparse_optimizer(model, config)
    dmp = shard_model(model, torch.device("cpu"), args.sharding_type)
    optimizer = build_optimizer(dmp, config)
    (sharded,) = [
        m for m in dmp.modules() if isinstance(m, BoundsCheckedShardedEmbeddingBagCollection)
    ]
    checked = sharded._id_ranges

    def step(batch: Any) -> None:
        loss, _ = dmp(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for batch in batches:  # warm-up: lazy input dist, allocator
        step(batch)
    samples: dict[str, list[float]] = {"on": [], "off": [], "check": []}
    order = torch.Generator().manual_seed(0)
    for round_index in range(args.rounds):
        batch = batches[round_index % len(batches)]
        for index in torch.randperm(2, generator=order).tolist():
            name = ("on", "off")[index]
            sharded._id_ranges = checked if name == "on" else _NoCheck()
            dist.barrier()
            start = time.perf_counter()
            step(batch)
            samples[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        checked.check(batch.sparse_features)
        samples["check"].append(time.perf_counter() - start)
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024, help="per process")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--sharding-type", default="table_wise")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args()
    print(run_header("Out-of-range id check: cost per DMP training step"))
    samples = run_multiprocess(_measure, world_size=args.world_size, timeout_s=3600.0, args=args)[0]
    on, off, check = (statistics.median(samples[k]) * 1e3 for k in ("on", "off", "check"))
    ratios = [a / b for a, b in zip(samples["on"], samples["off"], strict=True)]
    print(
        markdown_table(
            (
                "step, check on (ms)",
                "step, check off (ms)",
                "median on/off ratio",
                "check alone (ms)",
                "check / step",
            ),
            [
                (
                    f"{on:.2f}",
                    f"{off:.2f}",
                    f"{statistics.median(ratios):.4f}",
                    f"{check:.3f}",
                    f"{check / off:.2%}",
                )
            ],
        )
    )


if __name__ == "__main__":
    main()
