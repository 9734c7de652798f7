"""Rank selection for low-rank tables: fixed rank, explained-variance target or a byte budget.

Rank rounding.  ``round_rank`` rounds every table rank up to a multiple of ``rank_multiple``
(default 4), capped at the table's dimension.  Measured with fbgemm-gpu-cpu 1.8.0:

* ``SplitTableBatchedEmbeddingBagsCodegen`` (the training TBE behind a sharded EBC with a fused
  optimizer, on CPU too) rejects dims 1, 2, 3, 5, 6, 10: "embedding_dim must be a multiple of 4";
* ``IntNBitTableBatchedEmbeddingBagsCodegen`` (inference) accepts any dim for FP32/FP16/INT8, but
  INT4 needs an even dim (byte-packing);
* the unsharded ``EmbeddingBagCollection`` (``nn.EmbeddingBag``) accepts any dim;
* DMP sharding a k=3 factor table ``table_wise`` (kernel ``fused``) fails with torchrec's
  "local_cols=3 not divisible by 4"; k=4 shards, runs forward and backward.

So an unrounded rank would build and run unsharded but fail once DMP shards the factor tables.
A rank equal to the dimension is always allowed: the original table already had that width.
Linear layers are plain ``nn.Linear`` and need no rounding.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from torchrec_compress.config import LowRankConfig

# float32 factors, projections and means
BYTES_PER_ELEMENT = 4


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


def compressed_table_bytes(num_embeddings: int, embedding_dim: int, rank: int) -> int:
    """Bytes of a low-rank table: factor table N x k, projection k x d, mean d (float32)."""
    return BYTES_PER_ELEMENT * (num_embeddings * rank + rank * embedding_dim + embedding_dim)


def select_ranks(
    spectra: Mapping[str, TableSpectrum], config: LowRankConfig
) -> dict[str, int | None]:
    """Chooses each table's rank from ``config``; ``None`` marks a table left uncompressed.

    Modes (exactly one is set in the config), after per-table overrides:

    * ``rank``: that rank for every table (an error names a table whose dim is smaller);
    * ``explained_variance``: per table the smallest rank reaching the target;
    * ``memory_budget_bytes``: every table starts at the smallest allowed rank, then ranks are
      raised one rounding step at a time, always where the next step buys the most explained
      variance per byte.  The objective is AFM's own: the squared output error removed, summed
      over every lookup of every table (gain of a step = its eigenvalues × the table's
      ``total_weight``).  A table that is looked up often, or whose outputs vary widely, earns
      rank; a small table with little traffic does not, however large the *fraction* of its
      variance one more direction would explain (that fraction-based objective gave Frappe's
      80-row country table rank 52 and its 4,082-row item table rank 4).  Cost of a step = the
      factor-table column plus the projection row it adds, ``(N + d) * 4`` bytes per rank.  Eigenvalues are descending, so gains per
      byte fall within a table and the greedy choice is optimal up to the last, partly
      affordable step.  Overridden tables are charged first at their own rank.

    All ranks are rounded with :func:`round_rank`.

    Raises:
        ValueError: naming the table for an override of an unknown table, a rank outside
            1..d, or a budget smaller than the smallest allowed ranks need.

    Example::

        >>> from torchrec_compress.config import SVDConfig
        >>> spec = TableSpectrum(100, 8, torch.tensor([8.0, 4, 2, 1, 0.5, 0.2, 0.1, 0.1]))
        >>> select_ranks({"t": spec}, SVDConfig(explained_variance=0.9))
        {'t': 4}
    """
    unknown = sorted(set(config.table_overrides) - set(spectra))
    if unknown:
        raise ValueError(
            f"table_overrides name unknown table(s) {unknown}; tables are {sorted(spectra)}"
        )
    ranks: dict[str, int | None] = {}
    free: list[str] = []
    for name, spec in spectra.items():
        override = config.table_overrides.get(name)
        if override is not None and override.skip:
            ranks[name] = None
        elif override is not None and override.rank is not None:
            ranks[name] = _rounded(override.rank, spec, config, name)
        elif override is not None and override.explained_variance is not None:
            k = rank_for_variance(spec.eigenvalues, override.explained_variance)
            ranks[name] = _rounded(k, spec, config, name)
        elif config.rank is not None:
            ranks[name] = _rounded(config.rank, spec, config, name)
        elif config.explained_variance is not None:
            k = rank_for_variance(spec.eigenvalues, config.explained_variance)
            ranks[name] = _rounded(k, spec, config, name)
        else:
            free.append(name)
    if free:
        assert config.memory_budget_bytes is not None
        fixed_bytes = sum(
            compressed_table_bytes(spectra[n].num_embeddings, spectra[n].embedding_dim, k)
            for n, k in ranks.items()
            if k is not None
        )
        ranks.update(
            _spend_budget(
                {n: spectra[n] for n in free},
                config.memory_budget_bytes - fixed_bytes,
                config.rank_multiple,
            )
        )
    return {name: ranks[name] for name in spectra}


def _rounded(rank: int, spec: TableSpectrum, config: LowRankConfig, name: str) -> int:
    check_rank(rank, spec.embedding_dim, f"table {name!r}")
    return round_rank(rank, config.rank_multiple, spec.embedding_dim)


def _spend_budget(
    spectra: Mapping[str, TableSpectrum], budget: int, multiple: int
) -> dict[str, int | None]:
    ranks = {n: round_rank(1, multiple, s.embedding_dim) for n, s in spectra.items()}
    spent = sum(
        compressed_table_bytes(s.num_embeddings, s.embedding_dim, ranks[n])
        for n, s in spectra.items()
    )
    if spent > budget:
        raise ValueError(
            f"memory_budget_bytes leaves {budget} bytes for tables {sorted(spectra)}, but their "
            f"smallest allowed ranks {ranks} already need {spent} bytes"
        )

    def step(name: str) -> tuple[float, int, int] | None:
        spec, k = spectra[name], ranks[name]
        if k >= spec.embedding_dim:
            return None
        nxt = round_rank(k + 1, multiple, spec.embedding_dim)
        gain = float(spec.eigenvalues[k:nxt].sum()) * spec.total_weight
        cost = (nxt - k) * (spec.num_embeddings + spec.embedding_dim) * BYTES_PER_ELEMENT
        return (gain / cost, nxt, cost) if gain > 0 else None

    # max-heap on gain per byte; the name breaks ties deterministically
    heap: list[tuple[float, str, int, int]] = []
    for name in sorted(spectra):
        candidate = step(name)
        if candidate is not None:
            heapq.heappush(heap, (-candidate[0], name, candidate[1], candidate[2]))
    while heap:
        _, name, nxt, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this table's next step does not fit; cheaper steps elsewhere may
        spent += cost
        ranks[name] = nxt
        candidate = step(name)
        if candidate is not None:
            heapq.heappush(heap, (-candidate[0], name, candidate[1], candidate[2]))
    return dict(ranks)
