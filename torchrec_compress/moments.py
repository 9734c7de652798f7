"""Weighted first and second moments in float64, mergeable across batches, row shards and
processes: what AFM's PCA of a table's or a layer's outputs is made of (pure torch, any device).

:class:`Moments` adds up with ``+``; :func:`moments_from_counts` forms a table's moments from its
rows and their lookup counts chunk by chunk; :func:`sync_` all-reduces moments and counts.  The
lookup counts themselves come from :mod:`torchrec_compress.statistics`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Rows per chunk when turning rows into moments: bounds the float64 working copy to
# chunk_rows x d (64k x 128 x 8 B = 64 MiB) whatever the table size.
DEFAULT_CHUNK_ROWS = 65536


@dataclass
class Moments:
    """Weighted zeroth, first and second moments of d-dimensional vectors, in float64.

    ``count = sum w``, ``sum = sum w x``, ``sum_outer = sum w x x^T``.  Parts over disjoint data
    add up to the whole with ``+`` (or in place with ``add_``).

    Args:
        count (torch.Tensor): 0-dim float64 total weight.
        sum (torch.Tensor): ``(d,)`` float64.
        sum_outer (torch.Tensor): ``(d, d)`` float64.

    Example::

        >>> m = Moments.zeros(2)
        >>> m.update(torch.tensor([[1.0, 0.0], [3.0, 2.0]]))
        >>> m.mean().tolist()
        [2.0, 1.0]
    """

    count: torch.Tensor
    sum: torch.Tensor
    sum_outer: torch.Tensor

    @classmethod
    def zeros(cls, dim: int, device: torch.device | None = None) -> Moments:
        """Empty moments of ``dim``-dimensional vectors."""
        f64 = torch.float64
        return cls(
            torch.zeros((), dtype=f64, device=device),
            torch.zeros(dim, dtype=f64, device=device),
            torch.zeros(dim, dim, dtype=f64, device=device),
        )

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def update(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Adds the rows of ``x`` (``(n, d)``), each with its weight (default 1)."""
        x = x.detach().reshape(-1, self.dim).to(torch.float64)
        if weights is None:
            self.count += x.shape[0]
            self.sum += x.sum(dim=0)
            self.sum_outer += x.T @ x
        else:
            w = weights.detach().reshape(-1).to(torch.float64)
            self.count += w.sum()
            self.sum += w @ x
            self.sum_outer += (x * w[:, None]).T @ x

    def add_(self, other: Moments) -> Moments:
        """In-place merge of ``other`` (moments of disjoint data); returns ``self``."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dim {other.dim} into dim {self.dim}")
        self.count += other.count
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count.clone(), self.sum.clone(), self.sum_outer.clone()).add_(other)

    merge = __add__

    def mean(self) -> torch.Tensor:
        """``sum / count`` (``(d,)`` float64)."""
        return self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """Weighted covariance ``sum_outer / count - mean mean^T``, symmetrised."""
        mu = self.mean()
        cov = self.sum_outer / self.count - torch.outer(mu, mu)
        return (cov + cov.T) / 2

    def second_moment(self) -> torch.Tensor:
        """Uncentred ``sum_outer / count`` (what a truncated SVD of the rows diagonalises)."""
        return self.sum_outer / self.count

    def check_finite(self, name: str) -> None:
        """Raises ``ValueError`` naming ``name`` if any statistic is NaN or infinite."""
        for field_name in ("count", "sum", "sum_outer"):
            if not torch.isfinite(getattr(self, field_name)).all():
                raise ValueError(f"{name}: statistic {field_name!r} contains NaN or Inf")


def moments_from_counts(
    weight: torch.Tensor,
    counts: torch.Tensor,
    row_offset: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    name: str = "table",
) -> Moments:
    """Frequency-weighted moments of the rows of one table (or of one row shard of it).

    Only rows with a non-zero count are read, chunk by chunk, so a 10M-row table never needs
    an N x d float64 copy.  Row shards add up: the moments of ``weight[a:b]`` computed with
    ``row_offset=a`` plus those of the other shards equal the moments of the whole table.

    Args:
        weight (torch.Tensor): ``(R, d)`` rows ``row_offset .. row_offset + R`` of the table.
        counts (torch.Tensor): ``(N,)`` lookup counts of the whole table (see
            :func:`count_lookups`).
        row_offset (int): global index of ``weight``'s first row.
        chunk_rows (int): rows converted to float64 at a time.
        name (str): table name used in error messages.

    Returns:
        Moments: ``count = sum n_i``, ``sum = sum n_i e_i``, ``sum_outer = sum n_i e_i e_i^T``
        over this shard's rows.

    Example::

        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
        >>> moments_from_counts(w, torch.tensor([3.0, 1.0, 0.0])).mean().tolist()
        [0.75, 0.25]
    """
    num_rows = weight.shape[0]
    if row_offset < 0 or row_offset + num_rows > counts.shape[0]:
        raise ValueError(
            f"{name}: rows [{row_offset}, {row_offset + num_rows}) are outside the "
            f"{counts.shape[0]} rows that counts describe"
        )
    local_counts = counts[row_offset : row_offset + num_rows].to(torch.float64)
    if not torch.isfinite(local_counts).all():
        raise ValueError(f"{name}: lookup counts contain NaN or Inf")
    moments = Moments.zeros(weight.shape[1], device=weight.device)
    for start in range(0, num_rows, chunk_rows):
        chunk_counts = local_counts[start : start + chunk_rows]
        used = chunk_counts.nonzero().squeeze(1)
        rows = weight[start : start + chunk_rows].detach()[used].to(torch.float64)
        if not torch.isfinite(rows).all():
            bad = used[~torch.isfinite(rows).all(dim=1)][0].item() + start + row_offset
            raise ValueError(f"{name}: weight row {bad} contains NaN or Inf")
        moments.update(rows, chunk_counts[used])
    return moments


def sync_(
    statistics: Mapping[str, Moments | torch.Tensor],
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Sums statistics over all workers in place (one all-reduce).

    Every worker must pass the same keys with the same shapes.  Keys are visited in sorted
    order, so dict insertion order may differ between workers.

    Args:
        statistics (Mapping[str, Union[Moments, torch.Tensor]]): moments and/or count tensors.
        process_group (Optional[dist.ProcessGroup]): default group when ``None``.
    """
    tensors: list[torch.Tensor] = []
    for key in sorted(statistics):
        value = statistics[key]
        if isinstance(value, Moments):
            tensors.extend([value.count, value.sum, value.sum_outer])
        else:
            tensors.append(value)
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    for tensor, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors]), strict=True):
        tensor.copy_(part.view_as(tensor))
