"""Fault injection: kill this process with SIGKILL at a named point, chosen by an environment variable.

Production code marks the places where a crash must not lose work with :func:`fault_point`
(``"train.step"``, ``"save.written"``, ...); tests set ``TORCHREC_COMPRESS_FAULT`` to make a run
die there, exactly as a preempted or OOM-killed job would (no ``finally`` blocks, no flushing),
and then check that ``--resume`` recovers.  Without the variable a fault point costs one dict
lookup.

``TORCHREC_COMPRESS_FAULT=NAME:N[:RANK]`` kills the process the ``N``-th time (1-based) it reaches
point ``NAME`` (``*``: any point), only on rank ``RANK`` (the ``RANK`` environment variable) when
given.  ``TORCHREC_COMPRESS_FAULT_LOG=FILE`` appends ``NAME TIME`` (``time.time()``) of every
point reached to ``FILE`` (rank 0 only), to learn which points a run passes through and when
(``benchmarks/kill_loop.py`` names the phase a kill landed in from it).
"""

import os
import signal
import time
from collections import Counter

FAULT_ENV = "TORCHREC_COMPRESS_FAULT"
FAULT_LOG_ENV = "TORCHREC_COMPRESS_FAULT_LOG"

_hits: Counter[str] = Counter()


def parse_fault(spec: str) -> tuple[str, int, int | None]:
    """``"NAME:N[:RANK]"`` as ``(name, n, rank)``.

    Args:
        spec: the value of ``TORCHREC_COMPRESS_FAULT``.

    Returns:
        The point name (``"*"`` for any), the 1-based hit count and the rank (``None``: all).

    Example::

        >>> parse_fault("save.written:2:1")
        ('save.written', 2, 1)
        >>> parse_fault("*:5")
        ('*', 5, None)
    """
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]) or int(parts[1]) < 1:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected NAME:N or NAME:N:RANK with N >= 1")
    rank = int(parts[2]) if len(parts) == 3 else None
    return parts[0], int(parts[1]), rank


def fault_point(name: str) -> None:
    """Mark a place where the process may die; SIGKILL it here if ``TORCHREC_COMPRESS_FAULT`` says so.

    Args:
        name: the point's name, e.g. ``"save.written"``.

    Example::

        >>> fault_point("example.point")  # no TORCHREC_COMPRESS_FAULT set: nothing happens
    """
    spec = os.environ.get(FAULT_ENV)
    log = os.environ.get(FAULT_LOG_ENV)
    if spec is None and log is None:
        return
    rank = int(os.environ.get("RANK", "0"))
    if log is not None and rank == 0:
        with open(log, "a") as f:
            f.write(f"{name} {time.time():.3f}\n")
    if spec is None:
        return
    target, count, target_rank = parse_fault(spec)
    if target not in ("*", name) or target_rank not in (None, rank):
        return
    _hits[target] += 1
    if _hits[target] == count:
        os.kill(os.getpid(), signal.SIGKILL)
