"""Timing helpers shared by the benchmark scripts.

The benchmark machines are small and shared, so single timings are noisy.  Every script therefore
times its baseline and its candidates in the same process, interleaved (A B C B C A ...), so that
a burst of load from elsewhere hits all of them alike; it reports the median of many repeats and
the minimum, and prints the exact command, torch version, thread count and date next to the table.

On a machine with more runnable threads than cores, OpenMP's default spin-waiting makes every
parallel region wait for a descheduled thread; ``OMP_WAIT_POLICY=PASSIVE`` (set before Python
starts, recorded in the header) makes multi-thread medians far less erratic there.

Scripts import this file as ``from common import ...``: run them as ``python benchmarks/NAME.py``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torchrec.distributed.planner import Topology


@dataclass(frozen=True)
class Timing:
    """Median and minimum of one candidate's repeats, in milliseconds."""

    median_ms: float
    min_ms: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Timing:
        return cls(median_ms=statistics.median(samples_ms), min_ms=min(samples_ms))


def parse_threads(spec: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``: the ``--threads`` flag of every script."""
    threads = [int(t) for t in spec.split(",") if t.strip()]
    if not threads or min(threads) < 1:
        raise ValueError(f"--threads {spec!r}: expected positive integers such as '1,2'")
    return threads


def time_interleaved(
    runs: Mapping[str, Callable[[], object]],
    threads: int,
    repeats: int,
    warmup: int = 3,
) -> dict[str, Timing]:
    """Times each callable ``repeats`` times, round-robin, with ``threads`` torch threads.

    Args:
        runs (Mapping[str, Callable[[], object]]): name -> zero-argument callable to time.
        threads (int): ``torch.set_num_threads`` for the whole measurement.
        repeats (int): timed rounds; each round runs every callable once, in a random
            (seeded) order.
        warmup (int): untimed rounds first (allocator, caches, lazy initialisation).

    Returns:
        dict[str, Timing]: name -> median and minimum wall time of one call.

    Example::

        >>> timings = time_interleaved({"noop": lambda: None}, threads=1, repeats=3, warmup=1)
        >>> timings["noop"].median_ms >= 0.0
        True
    """
    torch.set_num_threads(threads)
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in runs.values():
                fn()
        order_gen = torch.Generator().manual_seed(0)
        for _ in range(repeats):
            # A fresh random order every round: a call right after a heavy one (evicted caches,
            # pages the allocator just gave back) is slower, and no candidate may always follow
            # the same one.  (Rotating a fixed order does not do that: it keeps each candidate's
            # predecessor, so the one listed after a big-table lookup always ran cache-cold.)
            for index in torch.randperm(len(names), generator=order_gen).tolist():
                name = names[index]
                start = time.perf_counter()
                runs[name]()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing.of(values) for name, values in samples.items()}


def zipf_ids(num_ids: int, num_rows: int, exponent: float, gen: torch.Generator) -> torch.Tensor:
    """``num_ids`` ids in ``[0, num_rows)`` whose popularity rank follows a Zipf law.

    Ranks are drawn from the continuous power law by inverse transform (no ``num_rows``-sized
    probability table), then scattered over the table by multiplying with an odd constant coprime
    with ``num_rows``, so that hot rows are not all neighbours in memory.
    """
    if exponent == 1.0:
        raise ValueError("zipf_ids: exponent must differ from 1.0 (use e.g. 1.05)")
    u = torch.rand(num_ids, dtype=torch.float64, generator=gen)
    one_minus_s = 1.0 - exponent
    ranks = ((num_rows**one_minus_s - 1.0) * u + 1.0).pow(1.0 / one_minus_s).long() - 1
    multiplier = 2_654_435_761
    while torch.gcd(torch.tensor(multiplier), torch.tensor(num_rows)).item() != 1:
        multiplier += 2
    return (ranks.clamp_(0, num_rows - 1) * multiplier) % num_rows


def run_header(title: str) -> str:
    """Markdown lines naming what was run, where and when, printed above each result table."""
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    # other jobs on a shared machine distort multi-thread timings most: say how busy it was
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    command = shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv])
    return (
        f"### {title}\n\n"
        f"- command: `{command}`\n"
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}\n"
        f"- date: {now}; load average at the start (1, 5, 15 min): {load}\n"
    )


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """``"mean ± std"`` over seeds (one value: the value; none: ``"-"``)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed with two decimals."""

    def cell(value: object) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def add_topology_arguments(parser: argparse.ArgumentParser) -> None:
    """``--world-size``, ``--local-world-size`` and ``--hbm-gib`` of the planning benchmarks."""
    parser.add_argument("--world-size", type=int, default=64)
    parser.add_argument("--local-world-size", type=int, default=8)
    parser.add_argument("--hbm-gib", type=float, default=80.0, help="device memory per GPU")


def planning_topology(args: argparse.Namespace) -> Topology:
    """The hypothetical GPU cluster those flags describe (planned on this CPU machine, on
    ``meta``), with one torch thread and the planner's dry-run warnings silenced: they are
    about the sizing of dense tensors, which the planning benchmarks do not report."""
    from torchrec.distributed.planner import Topology

    torch.set_num_threads(1)
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    return Topology(
        world_size=args.world_size,
        local_world_size=args.local_world_size,
        compute_device="cuda",
        hbm_cap=int(args.hbm_gib * 2**30),
    )
