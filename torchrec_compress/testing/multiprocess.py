"""One reusable harness for multi-process (gloo) tests.

Every multi-process test in this project goes through :func:`run_multiprocess`: it spawns
``world_size`` processes, initialises a gloo process group in each, runs a picklable function and
returns each rank's result, re-raising the first failure with the rank's traceback.
"""

import datetime
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    kwargs: dict[str, Any],
    results: "mp.Queue[Any]",
    pg_timeout_s: float,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        out = fn(rank=rank, world_size=world_size, **kwargs)
        # Plain pickle bytes: torch's queue would hand tensors over as shared memory that
        # disappears when this process exits.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_multiprocess(
    fn: Callable[..., Any],
    world_size: int = 2,
    timeout_s: float = 300.0,
    pg_timeout_s: float | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank=..., world_size=..., **kwargs)`` in ``world_size`` gloo processes.

    ``fn`` must be importable (a module-level function) and its result picklable.

    Args:
        fn: the per-rank body; the process group is initialised before it is called.
        world_size: number of processes.
        timeout_s: fail if the processes do not all finish within this time.
        pg_timeout_s: the process group's timeout: a collective that waits longer for a peer
            (frozen, stopped, deadlocked) raises on the ranks still running instead of blocking
            for torch's 30-minute default.  ``None``: ``timeout_s`` (no collective may outlast
            the run).
        **kwargs: passed to ``fn`` (picklable).

    Returns:
        The results of ``fn`` ordered by rank.

    Example::

        >>> from torchrec_compress.testing.multiprocess import run_multiprocess
        >>> from torchrec_compress.testing.multiprocess import all_reduce_rank
        >>> run_multiprocess(all_reduce_rank, world_size=2)
        [1.0, 1.0]
    """
    ctx = mp.get_context("spawn")
    results: mp.Queue[Any] = ctx.Queue()
    port = _free_port()
    pg_timeout = timeout_s if pg_timeout_s is None else pg_timeout_s
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, kwargs, results, pg_timeout))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    failure: str | None = None
    try:
        failure = _collect(procs, results, outputs, timeout_s)
    finally:
        for p in procs:
            p.join(timeout=5 if failure else timeout_s)
            if p.is_alive():
                p.kill()
    if failure is not None:
        raise RuntimeError(failure)
    return [outputs[r] for r in range(world_size)]


def _collect(
    procs: list[Any], results: Any, outputs: dict[int, Any], timeout_s: float
) -> str | None:
    """Fills ``outputs`` (rank -> result) from ``results``; returns the first failure's text.

    Polls once a second, so a process that dies without reporting (killed, ``os._exit``, a
    crash in native code) fails the run at once, naming its rank and exit code, instead of
    leaving the others to wait for ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while len(outputs) < len(procs):
        try:
            rank, ok, out = results.get(timeout=1.0)
        except queue.Empty:
            dead = [
                (r, p.exitcode)
                for r, p in enumerate(procs)
                if r not in outputs and p.exitcode not in (None, 0)
            ]
            if dead:
                return "; ".join(f"rank {r} exited with code {c} before reporting" for r, c in dead)
            if time.monotonic() > deadline:
                waiting = [r for r in range(len(procs)) if r not in outputs]
                return f"ranks {waiting} did not finish within {timeout_s} s"
            continue
        if not ok:
            return f"rank {rank} failed:\n{out}"
        outputs[rank] = pickle.loads(out)
    return None


def all_reduce_rank(rank: int, world_size: int) -> float:
    """Sum of all ranks, as a float (the harness's own smoke test)."""
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return float(t.item())
