"""Peak memory that torch's CPU allocator hands out while a function runs (for tests).

Resident-set figures (``ru_maxrss``) depend on the allocator's caching and on everything else in
the process; tests that bound the *working memory* of a function need a figure that depends on
that function alone.  :func:`peak_cpu_allocation` replays the allocations and frees that
``torch.profiler`` records (``profile_memory=True``) in time order and returns the highest
running total: the peak of tensor memory the function held above what existed before it.
Memory outside torch's allocator (numpy arrays, Python objects) is not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")


def peak_cpu_allocation(fn: Callable[[], T]) -> tuple[int, T]:
    """Runs ``fn()`` and returns the peak bytes of CPU tensor memory it held, and its result.

    Args:
        fn (Callable[[], T]): the code to measure (no arguments).

    Returns:
        Tuple[int, T]: peak bytes allocated above the level at the call (``>= 0``), ``fn()``.

    Example::

        >>> import torch
        >>> peak, total = peak_cpu_allocation(lambda: torch.ones(1000, dtype=torch.float64).sum())
        >>> peak >= 8000, float(total)
        (True, 1000.0)
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # An op's own allocations net of its own frees, and frees outside any op ("[memory]").
    deltas = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in prof.events()
        if event.self_cpu_memory_usage
    )
    level = peak = 0
    for _, delta in deltas:
        level += delta
        peak = max(peak, level)
    return peak, result
