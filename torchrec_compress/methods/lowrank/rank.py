"""Rank selection for low-rank tables: fixed rank, explained-variance target or a byte budget.

Rank rounding.  ``round_rank`` rounds the ranks the library chooses itself (from an
explained-variance target or a byte budget) up to a multiple of ``rank_multiple`` (default 4),
capped at the table's dimension; a rank the user gives (``rank``, an override's ``rank``) is
used exactly.  Measured with fbgemm-gpu-cpu 1.8.0:

* ``SplitTableBatchedEmbeddingBagsCodegen`` (the training TBE behind a sharded EBC with a fused
  optimizer, on CPU too) rejects dims 1, 2, 3, 5, 6, 10: "embedding_dim must be a multiple of 4";
* ``IntNBitTableBatchedEmbeddingBagsCodegen`` (inference) accepts any dim for FP32/FP16/INT8, but
  INT4 needs an even dim (byte-packing);
* the unsharded ``EmbeddingBagCollection`` (``nn.EmbeddingBag``) accepts any dim;
* DMP sharding a k=3 factor table ``table_wise`` (kernel ``fused``) fails with torchrec's
  "local_cols=3 not divisible by 4"; k=4 shards, runs forward and backward.

So a factor table whose rank is not a multiple of 4 is stored packed: ``p = 4 / gcd(k, 4)`` factor
rows to a stored row of width ``p k`` (:func:`rows_per_packed_row`; the collection splits each
feature into ``p`` weighted slot features, see ``LowRankEmbeddingBagCollection``).  That costs
``p`` lookups per id, so chosen ranks are rounded up to ``rank_multiple`` (default 4: no packing)
unless a byte budget cannot be met otherwise; ``rank_multiple=1`` keeps every chosen rank exact
too.  An explicit rank is the user's choice (e.g. the AFM paper's d=16 -> k=2) and is stored
packed when it must be.  Linear layers are plain ``nn.Linear`` and need no rounding.

Never bigger.  A table is compressed only when its low-rank form (factor table, projection and
mean) takes fewer bytes than the table itself: ``4 (N k + k d + d) < 4 N d``, so ``k < d`` and
``k < N``.  A rank that would not shrink the table (a rank of ``d`` or more, a 6-row table at
rank 8, a variance target that needs every direction) leaves the table uncompressed, with a
warning and a note in the report, instead of raising.
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from torchrec_compress.methods.lowrank.config import LowRankConfig
from torchrec_compress.report import BYTES_PER_ELEMENT

# the note of a table that a ``LowRankOverride(skip=True)`` leaves uncompressed (no warning)
SKIPPED = "skipped by table_overrides"
# the note of a table a memory budget affords whole (no warning: the budget's best use)
AFFORDED_WHOLE = "budget keeps the whole table"


@dataclass
class TableSpectrum:
    """What rank selection needs to know about one table.

    Args:
        num_embeddings (int): rows N.
        embedding_dim (int): dimension d.
        eigenvalues (torch.Tensor): ``(d,)`` variance per principal direction, descending.
        total_weight (float): what the eigenvalues are averaged over: the table's lookups in
            the calibration data (AFM) or its rows (SVD).  ``eigenvalue × total_weight`` is the
            squared output error that direction removes, summed over all lookups (rows).
    """

    num_embeddings: int
    embedding_dim: int
    eigenvalues: torch.Tensor
    total_weight: float = 1.0


def round_rank(rank: int, multiple: int, dim: int) -> int:
    """Rounds ``rank`` up to a multiple of ``multiple``, capped at ``dim``.

    Example::

        >>> round_rank(3, 4, 16), round_rank(15, 4, 16), round_rank(9, 4, 10)
        (4, 16, 10)
    """
    return min(math.ceil(rank / multiple) * multiple, dim)


def check_rank(rank: int, dim: int, name: str) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``1 <= rank <= dim``."""
    if not 1 <= rank <= dim:
        raise ValueError(f"{name}: rank {rank} is invalid; valid ranks are 1..{dim}")


def explained_variance_ratio(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Cumulative explained-variance fraction for k = 1..d (all ones when the variance is 0).

    Example::

        >>> explained_variance_ratio(torch.tensor([3.0, 1.0, 0.0])).tolist()
        [0.75, 1.0, 1.0]
    """
    eigenvalues = eigenvalues.to(torch.float64).clamp(min=0)
    total = eigenvalues.sum()
    if total <= 0:
        return torch.ones_like(eigenvalues)
    return (eigenvalues.cumsum(0) / total).clamp(max=1.0)


def rank_for_variance(eigenvalues: torch.Tensor, target: float) -> int:
    """Smallest k whose explained-variance fraction reaches ``target``.

    Example::

        >>> rank_for_variance(torch.tensor([6.0, 3.0, 1.0]), 0.9)
        2
    """
    ratio = explained_variance_ratio(eigenvalues)
    # tolerance: a target of exactly 1.0 must be reachable despite rounding in the cumsum
    return int((ratio < target - 1e-12).sum().item()) + 1


def rows_per_packed_row(rank: int) -> int:
    """How many k-dim factor rows one stored row holds: fbgemm's training kernels need widths
    that are multiples of 4, so a factor table of rank ``k`` not a multiple of 4 is stored
    ``p = 4 / gcd(k, 4)`` rows to a row (width ``p k``); 1 otherwise.

    Example::

        >>> [rows_per_packed_row(k) for k in (1, 2, 3, 4, 6, 8)]
        [4, 2, 4, 1, 2, 1]
    """
    return 4 // math.gcd(rank, 4)


def compressed_table_bytes(num_embeddings: int, embedding_dim: int, rank: int) -> int:
    """Bytes of a low-rank table: factor table N x k (as stored: a packed table's last row is
    padded), projection k x d, mean d (float32).

    Example::

        >>> compressed_table_bytes(1001, 16, 4), compressed_table_bytes(1001, 16, 2)
        (16336, 8208)
    """
    packed = rows_per_packed_row(rank)
    stored_rows = -(-num_embeddings // packed) * packed
    return BYTES_PER_ELEMENT * (stored_rows * rank + rank * embedding_dim + embedding_dim)


def table_bytes(num_embeddings: int, embedding_dim: int) -> int:
    """Bytes of an uncompressed float32 table.

    Args:
        num_embeddings (int): rows N.
        embedding_dim (int): dimension d.

    Example::

        >>> table_bytes(6, 16), compressed_table_bytes(6, 16, 8)  # rank 8 would double it
        (384, 768)
    """
    return BYTES_PER_ELEMENT * num_embeddings * embedding_dim


@dataclass
class RankChoice:
    """One table's outcome of rank selection.

    Args:
        rank (Optional[int]): the rank, or ``None`` when the table is kept uncompressed.
        note (Optional[str]): why a table is kept (``None`` when compressed).

    Example::

        >>> RankChoice(None, "rank 8 would not be smaller (768 >= 384 bytes)").rank is None
        True
    """

    rank: int | None
    note: str | None = None


def _fixed(rank: int, spec: TableSpectrum, multiple: int, why: str = "") -> RankChoice:
    """``rank`` rounded up to ``multiple`` (1: exactly), or the table kept (with a note) when
    that would not make it smaller."""
    n, d = spec.num_embeddings, spec.embedding_dim
    if rank > d:
        return RankChoice(None, f"{why}rank {rank} exceeds embedding_dim {d}")
    k = round_rank(rank, multiple, d)
    after, before = compressed_table_bytes(n, d, k), table_bytes(n, d)
    if after >= before:
        return RankChoice(None, f"{why}rank {k} would not be smaller ({after} >= {before} bytes)")
    return RankChoice(k)


def _rule_choice(name: str, spec: TableSpectrum, config: LowRankConfig) -> RankChoice | None:
    """The override's or the global fixed/variance rule for one table; ``None``: budget mode."""
    override = config.table_overrides.get(name)
    multiple = config.rank_multiple
    if override is not None and override.skip:
        return RankChoice(None, SKIPPED)
    # an explicit rank is used as given: packed factor rows serve ranks that are not multiples of 4
    if override is not None and override.rank is not None:
        check_rank(override.rank, spec.embedding_dim, f"table {name!r}")
        return _fixed(override.rank, spec, 1, "override: ")
    target = override.explained_variance if override is not None else None
    target = target if target is not None else config.explained_variance
    if override is None and config.rank is not None:
        return _fixed(config.rank, spec, 1)
    if target is not None:
        k = rank_for_variance(spec.eigenvalues, target)
        return _fixed(k, spec, multiple, f"explained_variance {target}: ")
    return None


def choose_ranks(
    spectra: Mapping[str, TableSpectrum], config: LowRankConfig
) -> dict[str, RankChoice]:
    """Chooses each table's rank from ``config``, or keeps the table (``rank=None``, with a note).

    Modes (exactly one is set in the config), after per-table overrides:

    * ``rank``: that rank for every table, exactly (not rounded);
    * ``explained_variance``: per table the smallest rank reaching the target, rounded up to
      ``rank_multiple``;
    * ``memory_budget_bytes``: every table starts at the smallest rank ``rank_multiple`` allows,
      then ranks are raised one rounding step at a time, always where the next step buys the most
      explained variance per byte.  The objective is AFM's own: the squared output error removed, summed
      over every lookup of every table (gain of a step = its eigenvalues x the table's
      ``total_weight``).  A table that is looked up often, or whose outputs vary widely, earns
      rank; a small table with little traffic does not, however large the *fraction* of its
      variance one more direction would explain (that fraction-based objective gave Frappe's
      80-row country table rank 52 and its 4,082-row item table rank 4).  Cost of a step = the
      factor-table column plus the projection row it adds, ``(N + d) * 4`` bytes per rank.
      Eigenvalues are descending, so gains per byte fall within a table and the greedy choice is
      optimal up to the last, partly affordable step.  The last step of a table is keeping it
      whole (its largest rank that is still smaller -> the original table).  The budget covers
      every table not skipped by an override: overridden tables are charged first at their own
      size, then tables that no rank shrinks (charged whole, kept).  The budget is a contract:
      when the smallest rounded ranks do not fit, ranks go below ``rank_multiple`` (stored
      packed; down to 1, a table kept whole included when a rank that small shrinks it), one
      rank at a time where that loses the least explained variance per byte saved, until they
      fit (a warning names those tables); a budget that even rank 1 everywhere cannot meet
      raises.

    A rank that would not make its table smaller (see the module notes) keeps the table; one
    warning lists every such table and why.

    Args:
        spectra (Mapping[str, TableSpectrum]): table name -> its rows, dimension and spectrum.
        config (LowRankConfig): the rank rule, overrides and ``rank_multiple``.

    Returns:
        Dict[str, RankChoice]: per table (in ``spectra``'s order), its rank or why it is kept.

    Raises:
        ValueError: naming the table for an override of an unknown table or an override rank
            outside 1..d; for a ``memory_budget_bytes`` below the smallest size the tables can
            take, naming that size, the budget and the largest tables.

    Example::

        >>> from torchrec_compress.methods.lowrank.config import SVDConfig
        >>> spec = TableSpectrum(100, 8, torch.tensor([8.0, 4, 2, 1, 0.5, 0.2, 0.1, 0.1]))
        >>> choose_ranks({"t": spec, "tiny": TableSpectrum(2, 8, spec.eigenvalues)},
        ...              SVDConfig(explained_variance=0.9))
        {'t': RankChoice(rank=4, note=None), 'tiny': RankChoice(rank=None, note='explained_variance 0.9: rank 4 would not be smaller (192 >= 64 bytes)')}
    """
    unknown = sorted(set(config.table_overrides) - set(spectra))
    if unknown:
        raise ValueError(
            f"table_overrides name unknown table(s) {unknown}; tables are {sorted(spectra)}"
        )
    choices: dict[str, RankChoice] = {}
    free: list[str] = []
    for name, spec in spectra.items():
        choice = _rule_choice(name, spec, config)
        if choice is None:
            free.append(name)
        else:
            choices[name] = choice
    if free:
        assert config.memory_budget_bytes is not None
        fixed_bytes = sum(
            table_bytes(spectra[n].num_embeddings, spectra[n].embedding_dim)
            if c.rank is None
            else compressed_table_bytes(spectra[n].num_embeddings, spectra[n].embedding_dim, c.rank)
            for n, c in choices.items()
            if c.note != SKIPPED
        )
        choices.update(
            _spend_budget(
                {n: spectra[n] for n in free},
                config.memory_budget_bytes,
                fixed_bytes,
                config.rank_multiple,
            )
        )
    _warn_kept(choices, type(config).__name__)
    return {name: choices[name] for name in spectra}


def select_ranks(
    spectra: Mapping[str, TableSpectrum], config: LowRankConfig
) -> dict[str, int | None]:
    """The ranks of :func:`choose_ranks` (``None``: table kept uncompressed).

    Args:
        spectra (Mapping[str, TableSpectrum]): table name -> its rows, dimension and spectrum.
        config (LowRankConfig): the rank rule, overrides and ``rank_multiple``.

    Example::

        >>> from torchrec_compress.methods.lowrank.config import SVDConfig
        >>> spec = TableSpectrum(100, 8, torch.tensor([8.0, 4, 2, 1, 0.5, 0.2, 0.1, 0.1]))
        >>> select_ranks({"t": spec}, SVDConfig(explained_variance=0.9))
        {'t': 4}
    """
    return {name: choice.rank for name, choice in choose_ranks(spectra, config).items()}


def _warn_kept(choices: Mapping[str, RankChoice], config_name: str) -> None:
    kept = {
        n: c.note
        for n, c in choices.items()
        if c.rank is None and c.note is not None and c.note != SKIPPED and c.note != AFFORDED_WHOLE
    }
    if kept:
        reasons = "; ".join(f"table {n!r}: {note}" for n, note in kept.items())
        warnings.warn(
            f"{config_name} keeps {len(kept)} table(s) uncompressed: {reasons}", stacklevel=3
        )


@dataclass
class _Spender:
    """Greedy spending of a byte budget over the tables' ranks (see :func:`choose_ranks`);
    rank ``d`` stands for the whole table."""

    spectra: Mapping[str, TableSpectrum]
    multiple: int
    ranks: dict[str, int] = field(default_factory=dict)

    def cost(self, spec: TableSpectrum, k: int) -> int:
        n, d = spec.num_embeddings, spec.embedding_dim
        return table_bytes(n, d) if k >= d else compressed_table_bytes(n, d, k)

    def gain(self, spec: TableSpectrum, low: int, high: int) -> float:
        """Squared output error that ranks ``low + 1 .. high`` remove (rank ``d``: whole)."""
        return float(spec.eigenvalues[low:high].sum()) * spec.total_weight

    def step_up(self, name: str) -> tuple[float, int, int] | None:
        """The next larger rank (or the whole table): (gain per extra byte, rank, bytes)."""
        spec, k = self.spectra[name], self.ranks[name]
        d = spec.embedding_dim
        if k >= d:
            return None
        nxt = round_rank(k + 1, self.multiple, d)
        if self.cost(spec, nxt) >= table_bytes(spec.num_embeddings, d):
            nxt = d  # no larger rank is smaller than the table: the next step keeps it whole
        extra = self.cost(spec, nxt) - self.cost(spec, k)
        gain = self.gain(spec, k, nxt)
        return (gain / extra, nxt, extra) if gain > 0 else None

    def step_down(self, name: str) -> tuple[float, int, int] | None:
        """The next rank below the current one that is cheaper (loss per byte saved)."""
        spec, k = self.spectra[name], self.ranks[name]
        cost = self.cost
        lower = next((j for j in range(k - 1, 0, -1) if cost(spec, j) < cost(spec, k)), None)
        if lower is None:
            return None
        saved = cost(spec, k) - cost(spec, lower)
        return self.gain(spec, lower, k) / saved, lower, saved

    def smallest(self) -> dict[str, str]:
        """Every table at its smallest allowed rank, or whole where that is not smaller; the
        notes of the tables kept whole."""
        notes: dict[str, str] = {}
        for name, spec in self.spectra.items():
            self.ranks[name] = round_rank(1, self.multiple, spec.embedding_dim)
            after = self.cost(spec, self.ranks[name])
            before = table_bytes(spec.num_embeddings, spec.embedding_dim)
            if after >= before:
                notes[name] = (
                    f"smallest allowed rank {self.ranks[name]} would not be smaller "
                    f"({after} >= {before} bytes)"
                )
                self.ranks[name] = spec.embedding_dim
        return notes

    def descend(self, spent: int, budget: int) -> int:
        """Lowers ranks below the rounded ones, least loss per byte saved first, until the
        budget is met; returns the bytes spent."""
        heap: list[tuple[float, str, int, int]] = []
        for name in sorted(self.spectra):
            if (down := self.step_down(name)) is not None:
                heapq.heappush(heap, (down[0], name, down[1], down[2]))
        while spent > budget:
            _, name, lower, saved = heapq.heappop(heap)
            self.ranks[name] = lower
            spent -= saved
            if (down := self.step_down(name)) is not None:
                heapq.heappush(heap, (down[0], name, down[1], down[2]))
        return spent

    def ascend(self, spent: int, budget: int) -> None:
        """Raises ranks, most gain per byte first (a max-heap; the name breaks ties), while
        they fit the budget."""
        heap: list[tuple[float, str, int, int]] = []
        for name in sorted(self.spectra):
            if (up := self.step_up(name)) is not None:
                heapq.heappush(heap, (-up[0], name, up[1], up[2]))
        while heap:
            _, name, nxt, extra = heapq.heappop(heap)
            if spent + extra > budget:
                continue  # this table's next step does not fit; cheaper steps elsewhere may
            spent += extra
            self.ranks[name] = nxt
            if (up := self.step_up(name)) is not None:
                heapq.heappush(heap, (-up[0], name, up[1], up[2]))


def _spend_budget(
    spectra: Mapping[str, TableSpectrum], budget: int, fixed_bytes: int, multiple: int
) -> dict[str, RankChoice]:
    """Greedy budget spending (see :func:`choose_ranks`); rank ``d`` stands for the whole table.

    ``budget`` is the whole budget, of which ``fixed_bytes`` (overridden tables) are spent."""
    spender = _Spender(spectra, multiple)
    notes = spender.smallest()
    ranks = spender.ranks
    spent = fixed_bytes + sum(spender.cost(s, ranks[n]) for n, s in spectra.items())
    rounded, rounded_bytes = dict(ranks), spent
    if spent > budget:
        _check_reachable(spectra, budget, fixed_bytes, spender.cost)
        spent = spender.descend(spent, budget)
    spender.ascend(spent, budget)
    lowered = {n: k for n, k in ranks.items() if k < rounded[n]}
    if lowered:
        warnings.warn(
            f"memory_budget_bytes={budget}: ranks rounded to rank_multiple={multiple} need "
            f"{rounded_bytes} bytes; to meet the budget, tables {lowered} take those ranks "
            "(ranks that are not multiples of 4 are stored packed: more lookups per id)",
            stacklevel=4,
        )
    return {
        n: RankChoice(k)
        if k < spectra[n].embedding_dim
        else RankChoice(None, notes.get(n, AFFORDED_WHOLE))
        for n, k in ranks.items()
    }


def _check_reachable(
    spectra: Mapping[str, TableSpectrum],
    budget: int,
    fixed_bytes: int,
    cost: Callable[[TableSpectrum, int], int],
) -> None:
    """Raises ``ValueError`` when even rank 1 everywhere (tables it does not shrink kept whole)
    does not fit ``budget``, naming the smallest reachable size and the largest tables."""
    smallest = {n: min(cost(s, 1), cost(s, s.embedding_dim)) for n, s in spectra.items()}
    floor = fixed_bytes + sum(smallest.values())
    if floor <= budget:
        return
    largest = sorted(smallest.items(), key=lambda item: (-item[1], item[0]))[:5]
    overrides = f", {fixed_bytes} of them fixed by table_overrides" if fixed_bytes else ""
    raise ValueError(
        f"memory_budget_bytes={budget} cannot be met: the smallest the tables can be stored in "
        f"is {floor} bytes (every table at rank 1 or kept whole{overrides}; largest: "
        f"{', '.join(f'{n!r} {b} bytes' for n, b in largest)}), {floor - budget} bytes over; "
        f"give a budget of at least {floor}"
    )
