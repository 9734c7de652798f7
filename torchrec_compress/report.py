"""What compression did: one :class:`ReportRow` per table or layer, gathered in a
:class:`CompressionReport` (shared by the local and the sharded drivers)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# bytes of a float32 element (rows, factors, projections, codebooks)
BYTES_PER_ELEMENT = 4


@dataclass
class ReportRow:
    """One compressed (or inspected and kept) table or layer."""

    name: str
    kind: str  # "table" or "linear"
    shape: tuple[int, ...]
    method: str  # e.g. "AFM", "SVD", or "kept" when left uncompressed
    rank: int | None
    bytes_before: int
    bytes_after: int
    explained_variance: float | None
    # PQ tables: mean over subspaces of the codebook usage perplexity (every row counted once).
    perplexity: float | None = None
    # why a table or layer was kept (or how it is stored), e.g. "rank 8 would not be smaller"
    note: str | None = None


@dataclass
class CompressionReport:
    """What ``compress_`` did, one row per table / layer; ``str()`` prints a table."""

    rows: list[ReportRow] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    @property
    def compression_ratio(self) -> float:
        """``bytes_before / bytes_after`` over all rows."""
        return self.bytes_before / max(self.bytes_after, 1)

    def followed_by(self, later: CompressionReport) -> CompressionReport:
        """One report for this compression and ``later``, applied to its result.

        Rows are matched by (kind, name): bytes run from this report's ``bytes_before`` to what
        ``later`` left (``after - later.before + later.after``); methods join as ``"AFM+MEC"``
        (a row ``later`` kept keeps this method, with ``later``'s note); the rank and explained
        variance come from here, the perplexity from ``later``.

        Example::

            >>> afm = CompressionReport([ReportRow("t", "table", (100, 64), "AFM", 16, 25600, 6656, 0.9)])
            >>> mec = CompressionReport([ReportRow("t", "table", (100, 16), "MEC", 8, 6400, 1312, None, 200.0)])
            >>> row = afm.followed_by(mec).rows[0]
            >>> row.method, row.bytes_before, row.bytes_after
            ('AFM+MEC', 25600, 1568)
        """
        by_key = {(r.kind, r.name): r for r in later.rows}
        unknown = sorted(set(by_key) - {(r.kind, r.name) for r in self.rows})
        if unknown:
            raise ValueError(f"later report has rows {unknown} that this report does not")
        rows = []
        for r in self.rows:
            nxt = by_key.get((r.kind, r.name))
            if nxt is None:
                rows.append(r)
                continue
            after = r.bytes_after - nxt.bytes_before + nxt.bytes_after
            if nxt.method == "kept":  # its note says why (and any identity-code bytes)
                rows.append(dataclasses.replace(r, bytes_after=after, note=nxt.note or r.note))
                continue
            rows.append(
                ReportRow(
                    name=r.name,
                    kind=r.kind,
                    shape=r.shape,
                    method=nxt.method if r.method == "kept" else f"{r.method}+{nxt.method}",
                    rank=r.rank,
                    bytes_before=r.bytes_before,
                    bytes_after=after,
                    explained_variance=r.explained_variance,
                    perplexity=nxt.perplexity,
                    note=nxt.note,
                )
            )
        return CompressionReport(rows)

    def __str__(self) -> str:
        header: tuple[str, ...] = (
            "name",
            "kind",
            "shape",
            "method",
            "rank",
            "bytes before",
            "bytes after",
            "expl.var",
        )
        lines: list[tuple[str, ...]] = [
            (
                r.name,
                r.kind,
                "x".join(map(str, r.shape)),
                r.method,
                "-" if r.rank is None else str(r.rank),
                f"{r.bytes_before:,}",
                f"{r.bytes_after:,}",
                "-" if r.explained_variance is None else f"{r.explained_variance:.4f}",
            )
            for r in self.rows
        ]
        if any(r.perplexity is not None for r in self.rows):
            header = (*header, "perplexity")
            lines = [
                (*line, "-" if r.perplexity is None else f"{r.perplexity:.1f}")
                for line, r in zip(lines, self.rows, strict=True)
            ]
        if any(r.note is not None for r in self.rows):
            header = (*header, "note")
            lines = [(*line, r.note or "") for line, r in zip(lines, self.rows, strict=True)]
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        total = (
            f"total: {self.bytes_before:,} -> {self.bytes_after:,} bytes "
            f"({self.compression_ratio:.2f}x smaller)"
        )
        return "\n".join([fmt.format(*header), *(fmt.format(*row) for row in lines), total])
