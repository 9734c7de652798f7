"""Training speed (examples/s) of compressed DLRMs against the uncompressed one, in one invocation.

Every method's model is built from the same DLRM (``examples.dlrm``, synthetic default schema),
compressed with ``compress_``, given the CLI's optimizers (fused in-backward table optimizer, Adam
for the rest) and sharded with DMP; then all models train on the same pre-generated batches,
``--steps`` steps per method per round, in a fresh random order every round, and the median
examples/s over ``--rounds`` rounds is reported with its ratio to the baseline's.  With
``--world-sizes 1,2`` each world size is one group of gloo processes (``run_multiprocess``), one
thread per process (``--threads``).

The codes and factors only need the right shapes here, not good values, so MEC is trained with
few steps (speed of training does not depend on where the codewords sit).

Run: ``python benchmarks/train_speed.py --world-sizes 1,2``
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import markdown_table, run_header  # noqa: E402

from examples.dlrm.compression import train_forward  # noqa: E402
from examples.dlrm.main import quiet_torchrec  # noqa: E402
from examples.dlrm.model import ModelConfig, build_model  # noqa: E402
from examples.dlrm.train import TrainConfig, attach_sparse_optimizer, build_optimizer  # noqa: E402
from torchrec_compress.api import compress_  # noqa: E402
from torchrec_compress.config import CompressionConfig
from torchrec_compress.data import get_dataset  # noqa: E402
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.methods.lowrank.config import AFMConfig
from torchrec_compress.methods.pq.config import MECConfig, MECTraining
from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig
from torchrec_compress.testing import run_multiprocess  # noqa: E402


def method_configs(name: str, rank: int, subspaces: int) -> list[CompressionConfig]:
    """The ``compress_`` stages of one method name (``baseline`` has none)."""
    mec = MECConfig(
        num_subspaces=subspaces,
        training=MECTraining(steps=5, kmeans_iterations=2, reseed_interval=0),
    )
    stages: dict[str, list[CompressionConfig]] = {
        "baseline": [],
        "afm": [AFMConfig(rank=rank)],
        # the AFM paper's full method: tables and the hidden layers of the MLPs
        "afm-mlp": [AFMConfig(rank=rank, linear=True, linear_rank=64)],
        "mec": [mec],
        "afm+mec": [AFMConfig(rank=rank), mec],
        # frozen int8 rows (fbgemm cannot train them on CPU), replicated; the rest trains
        "int8": [RowWiseQuantConfig(bits=8)],
        "afm+int8": [AFMConfig(rank=rank), RowWiseQuantConfig(bits=8)],
    }
    if name not in stages:
        raise SystemExit(f"unknown method {name!r}; choose from {sorted(stages)}")
    return stages[name]


def _train_steps(model: nn.Module, optimizer: Any, batches: list[Any]) -> None:
    for batch in batches:
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _measure(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, list[float]]:
    quiet_torchrec()
    torch.set_num_threads(args.threads)
    data = get_dataset("synthetic", seed=0)
    batches = list(islice(data.batches("train", args.batch_size, rank, world_size), args.steps + 4))
    calibration = batches[:4]
    timed = batches[4:]
    torch.manual_seed(0)
    source = build_model(data.schema, ModelConfig(embedding_dim=args.dim), torch.device("cpu"))
    train_config = TrainConfig(batch_size=args.batch_size)
    steps: dict[str, Callable[[], None]] = {}
    for name in args.methods.split(","):
        model = copy.deepcopy(source)
        for config in method_configs(name, args.rank, args.subspaces):
            compress_(model, config, calibration=calibration, forward_fn=train_forward)
        attach_sparse_optimizer(model, train_config)
        dmp = shard_model(model, torch.device("cpu"))
        optimizer = build_optimizer(dmp, train_config)
        dmp.train()
        _train_steps(dmp, optimizer, calibration)  # warm-up: lazy init, allocator
        steps[name] = lambda m=dmp, o=optimizer: _train_steps(m, o, timed)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    order = torch.Generator().manual_seed(0)
    names = list(steps)
    for _ in range(args.rounds):
        for index in torch.randperm(len(names), generator=order).tolist():
            dist.barrier()
            start = time.perf_counter()
            steps[names[index]]()
            dist.barrier()
            elapsed = time.perf_counter() - start
            rates[names[index]].append(len(timed) * args.batch_size * world_size / elapsed)
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="baseline,afm,afm-mlp,mec,afm+mec,int8,afm+int8")
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--batch-size", type=int, default=1024, help="per process")
    p.add_argument("--steps", type=int, default=20, help="timed steps per method and round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rank", type=int, default=16, help="AFM rank")
    p.add_argument("--subspaces", type=int, default=8, help="MEC M")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args()
    print(run_header("Training speed: compressed DLRM vs the uncompressed one"))
    rows = []
    for world_size in [int(w) for w in args.world_sizes.split(",")]:
        rates = run_multiprocess(_measure, world_size=world_size, timeout_s=3600.0, args=args)[0]
        base = statistics.median(rates["baseline"]) if "baseline" in rates else None
        for name, samples in rates.items():
            median = statistics.median(samples)
            ratio = f"{median / base:.2f}x" if base else "-"
            rows.append((world_size, name, f"{median:,.0f}", f"{min(samples):,.0f}", ratio))
    print(
        markdown_table(
            ("processes", "method", "median examples/s", "min examples/s", "vs baseline"), rows
        )
    )


if __name__ == "__main__":
    main()
