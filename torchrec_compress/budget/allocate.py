"""Spending one byte budget over the tables: one option each, least total error.

A multiple-choice knapsack, solved exactly (:func:`exact_spend`: the tables' (bytes, error)
Pareto fronts merged one table at a time, dominated partial plans dropped) where the merged
front stays small, as it does for 10 tables of 34 options (thinned beyond, an approximation),
and as the rank budget of AFM is (:func:`spend`), the better of the two kept: every table
starts at its smallest option; then steps along each table's lower convex hull of (bytes,
error) are taken, the most error saved per byte first, while they fit; then the bytes left
over buy the single option change that saves the most error, again and again, among all
options (hull or not).  The greedy is optimal for the Lagrangian
relaxation but not for the knapsack: on random options of 10 tables it was up to 20 % worse
than the exact plan; a table whose next hull step does not fit stops there.
Product-quantized and row-wise quantized tables cannot share a collection, nor can either share
one with AFM factor tables stored packed (ranks not multiples of 4), so each collection gets one
family, ``"rowwise"``, ``"pq"`` or ``"float"`` (kept tables and other AFM tables go with all):
starting from all collections alike, each one's family is changed while that lowers the total
error.

Example::

    >>> from torchrec_compress.budget.options import Option
    >>> big = TableChoices("big", "ebc", [Option("fp32", 400), Option("int8", 120)], [0.0, 1.0])
    >>> small = TableChoices("small", "ebc", [Option("fp32", 40), Option("int8", 12)], [0.0, 5.0])
    >>> {n: o.kind for n, o in allocate([big, small], 200).items()}
    {'big': 'int8', 'small': 'fp32'}
    >>> allocate([big, small], 100)
    Traceback (most recent call last):
    ...
    ValueError: memory_budget_bytes=100 cannot be met: the smallest the tables can be stored in is 132 bytes (largest at their smallest: 'big' 120 bytes, 'small' 12 bytes), 32 bytes over; give a budget of at least 132
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torchrec_compress.budget.options import Option

#: the quantized collection a collection may become (see the module notes)
FAMILY_CHOICES: tuple[str, ...] = ("rowwise", "pq", "float")


@dataclass
class TableChoices:
    """One table as the allocator sees it: its collection, options and their errors.

    Args:
        name (str): the table.
        collection (str): fully qualified name of its collection.
        options (list[Option]): what it may become, ``"fp32"`` (kept) first.
        costs (list[float]): the error of each option (scaled as the objective weighs it).
        pq_keeps (bool): whether a product-quantized collection can hold its float options
            (``"fp32"``, ``"afm"``); not in a sharded model, whose quantizer does not gather a
            table to keep it (a small one has an ``"identity"`` option instead).
    """

    name: str
    collection: str
    options: list[Option]
    costs: list[float]
    pq_keeps: bool = True

    def allowed(self, family: str) -> list[int]:
        """Indices of the options a collection of ``family`` can hold.

        Example::

            >>> from torchrec_compress.budget.options import Option
            >>> options = [Option("fp32", 9), Option("afm", 5, rank=4), Option("pq", 2, subspaces=2)]
            >>> [TableChoices("t", "c", options, [0.0] * 3, keeps).allowed("pq") for keeps in (True, False)]
            [[0, 1, 2], [2]]
        """
        return [i for i, o in enumerate(self.options) if self._holds(family, o)]

    def _holds(self, family: str, option: Option) -> bool:
        if option.family == "any" and family == "pq":
            return self.pq_keeps
        return option.family in ("any", family)


def lower_hull(table: TableChoices, allowed: Sequence[int]) -> list[int]:
    """Indices of ``allowed`` options on the lower convex hull of (bytes, error), from the
    smallest to the one of least error: error saved per extra byte falls along it.

    Example::

        >>> options = [Option("fp32", 100), Option("int8", 30), Option("int4", 20), Option("fp16", 50)]
        >>> lower_hull(TableChoices("t", "c", options, [0.0, 1.0, 9.0, 0.9]), range(4))
        [2, 1, 0]
    """
    points = sorted(allowed, key=lambda i: (table.options[i].bytes, table.costs[i]))
    pareto: list[int] = []
    for i in points:
        if not pareto or table.costs[i] < table.costs[pareto[-1]]:
            pareto.append(i)

    def gain(a: int, b: int) -> float:
        extra = table.options[b].bytes - table.options[a].bytes
        return (table.costs[a] - table.costs[b]) / max(extra, 1)

    hull: list[int] = []
    for i in pareto:
        while len(hull) >= 2 and gain(hull[-2], hull[-1]) <= gain(hull[-1], i):
            hull.pop()
        hull.append(i)
    return hull


def _smallest(table: TableChoices, family: str) -> int:
    return min(table.options[i].bytes for i in table.allowed(family))


def _fill(
    tables: Sequence[TableChoices], chosen: dict[str, int], families: Mapping[str, str], left: int
) -> None:
    """Spends the ``left`` bytes on the option changes that save the most error, one at a time."""
    while True:
        best: tuple[float, str, int, int] | None = None
        for t in tables:
            now = chosen[t.name]
            for i in t.allowed(families[t.collection]):
                extra = t.options[i].bytes - t.options[now].bytes
                saved = t.costs[now] - t.costs[i]
                if extra <= left and saved > 0 and (best is None or saved > best[0]):
                    best = (saved, t.name, i, extra)
        if best is None:
            return
        chosen[best[1]], left = best[2], left - best[3]


def spend(
    tables: Sequence[TableChoices], families: Mapping[str, str], budget: int
) -> tuple[float, dict[str, int]] | None:
    """The greedy choice of one option per table (indices) and its total error, for one family
    per collection; ``None`` when even the smallest options exceed ``budget``."""
    hulls = {t.name: lower_hull(t, t.allowed(families[t.collection])) for t in tables}
    chosen = {t.name: hulls[t.name][0] for t in tables}
    spent = sum(t.options[chosen[t.name]].bytes for t in tables)
    if spent > budget:
        return None
    by_name = {t.name: t for t in tables}
    step = {t.name: 0 for t in tables}
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        t, hull, at = by_name[name], hulls[name], step[name]
        if at + 1 < len(hull):
            a, b = hull[at], hull[at + 1]
            extra = max(t.options[b].bytes - t.options[a].bytes, 1)
            heapq.heappush(heap, (-(t.costs[a] - t.costs[b]) / extra, name))

    for t in tables:
        push(t.name)
    while heap:
        _, name = heapq.heappop(heap)
        t, nxt = by_name[name], hulls[name][step[name] + 1]
        extra = t.options[nxt].bytes - t.options[chosen[name]].bytes
        if spent + extra > budget:
            continue  # this table's next step does not fit; cheaper steps elsewhere may
        spent, chosen[name] = spent + extra, nxt
        step[name] += 1
        push(name)
    _fill(tables, chosen, families, budget - spent)
    return sum(t.costs[chosen[t.name]] for t in tables), chosen


#: the most partial plans :func:`exact_spend` keeps; beyond, the front is thinned evenly
EXACT_FRONTIER_LIMIT = 5_000


def exact_spend(
    tables: Sequence[TableChoices], families: Mapping[str, str], budget: int
) -> tuple[float, dict[str, int]] | None:
    """The least total error within ``budget`` (one family per collection): the tables'
    (bytes, error) Pareto fronts merged one table at a time, partial plans over the budget or
    dominated (more bytes, no less error) dropped; exact while the front stays within
    :data:`EXACT_FRONTIER_LIMIT` plans (10 tables of 34 options: well within), else thinned to
    every k-th plan (then an approximation).  ``None`` when nothing fits.

    Example::

        >>> from torchrec_compress.budget.options import Option
        >>> a = TableChoices("a", "c", [Option("fp32", 10), Option("int8", 4)], [0.0, 3.0])
        >>> b = TableChoices("b", "c", [Option("fp32", 10), Option("int8", 4)], [0.0, 2.0])
        >>> exact_spend([a, b], {"c": "rowwise"}, 14)
        (2.0, {'a': 0, 'b': 1})
    """
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for t in tables:
        allowed = t.allowed(families[t.collection])
        merged = [
            (spent + t.options[i].bytes, cost + t.costs[i], picks + (i,))
            for spent, cost, picks in front
            for i in allowed
            if spent + t.options[i].bytes <= budget
        ]
        merged.sort(key=lambda entry: (entry[0], entry[1]))
        front = []
        for entry in merged:
            if not front or entry[1] < front[-1][1]:
                front.append(entry)
        if not front:
            return None
        if len(front) > EXACT_FRONTIER_LIMIT:
            step = -(-len(front) // EXACT_FRONTIER_LIMIT)
            front = front[::step] + ([front[-1]] if (len(front) - 1) % step else [])
    cost, picks = front[-1][1], front[-1][2]
    return cost, {t.name: i for t, i in zip(tables, picks, strict=True)}


def best_spend(
    tables: Sequence[TableChoices], families: Mapping[str, str], budget: int
) -> tuple[float, dict[str, int]] | None:
    """The better of :func:`exact_spend` and :func:`spend`'s greedy (they differ only where the
    merged front had to be thinned)."""
    if any(not t.allowed(families[t.collection]) for t in tables):
        return None  # a table this family of its collection cannot hold at all
    results = [
        r for r in (exact_spend(tables, families, budget), spend(tables, families, budget)) if r
    ]
    return min(results, key=lambda r: r[0]) if results else None


def _unreachable(tables: Sequence[TableChoices], budget: int) -> ValueError:
    collections = sorted({t.collection for t in tables})
    floor = 0
    smallest: dict[str, int] = {}
    for c in collections:
        members = [t for t in tables if t.collection == c]
        possible = [f for f in FAMILY_CHOICES if all(t.allowed(f) for t in members)]
        family = min(possible, key=lambda f: sum(_smallest(t, f) for t in members))
        smallest.update({t.name: _smallest(t, family) for t in members})
        floor += sum(smallest[t.name] for t in members)
    largest = sorted(smallest.items(), key=lambda item: (-item[1], item[0]))[:5]
    return ValueError(
        f"memory_budget_bytes={budget} cannot be met: the smallest the tables can be stored in "
        f"is {floor} bytes (largest at their smallest: "
        f"{', '.join(f'{n!r} {b} bytes' for n, b in largest)}), {floor - budget} bytes over; "
        f"give a budget of at least {floor}"
    )


def allocate(tables: Sequence[TableChoices], budget: int) -> dict[str, Option]:
    """One option per table, the bytes of all at most ``budget``, the total error least (see
    the module notes).

    Raises:
        ValueError: naming the smallest size the tables can take, when ``budget`` is below it.
    """
    collections = sorted({t.collection for t in tables})
    best: tuple[float, dict[str, int]] | None = None
    for start in FAMILY_CHOICES:
        families = {c: start for c in collections}
        result = best_spend(tables, families, budget)
        improved = True
        while improved:
            improved = False
            for c, family in ((c, f) for c in collections for f in FAMILY_CHOICES):
                if family == families[c]:
                    continue
                changed = {**families, c: family}
                trial = best_spend(tables, changed, budget)
                if trial is not None and (result is None or trial[0] < result[0]):
                    families, result, improved = changed, trial, True
        if result is not None and (best is None or result[0] < best[0]):
            best = result
    if best is None:
        raise _unreachable(tables, budget)
    return {t.name: t.options[best[1][t.name]] for t in tables}
