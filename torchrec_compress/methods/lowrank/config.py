"""AFM / SVD configs: the rank rule (one rank, a variance target or a byte budget), per-table
overrides and the MLP options.

Example::

    >>> from torchrec_compress.methods.lowrank.config import AFMConfig, LowRankOverride
    >>> cfg = AFMConfig(rank=8, table_overrides={"t_user": LowRankOverride(explained_variance=0.9)})
    >>> AFMConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from dataclasses import dataclass, field

from torchrec_compress.config import CompressionConfig, check_fraction, check_positive_int


@dataclass
class LowRankOverride:
    """Per-table setting that replaces the global rank rule of an :class:`AFMConfig`/:class:`SVDConfig`.

    Exactly one of ``rank``, ``explained_variance`` or ``skip=True``.  In budget mode an
    overridden table is fixed: its bytes count against the budget and the remaining tables share
    what is left.

    Args:
        rank (Optional[int]): fixed rank for this table, used exactly (not rounded).
        explained_variance (Optional[float]): smallest rank reaching this fraction in (0, 1].
        skip (bool): leave this table uncompressed (it stays a full-dimension table).
    """

    rank: int | None = None
    explained_variance: float | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        chosen = sum([self.rank is not None, self.explained_variance is not None, self.skip])
        if chosen != 1:
            raise ValueError(
                "LowRankOverride needs exactly one of rank, explained_variance or skip=True, "
                f"got {self}"
            )
        check_positive_int(self.rank, "LowRankOverride.rank")
        check_fraction(self.explained_variance, "LowRankOverride.explained_variance")


@dataclass
class LowRankConfig(CompressionConfig):
    """Fields shared by AFM and SVD; use :class:`AFMConfig` or :class:`SVDConfig`.

    Args:
        rank (Optional[int]): one rank for every compressed table, used exactly (a rank that
            is not a multiple of 4 is stored packed).
        explained_variance (Optional[float]): per table, the smallest rank whose explained
            variance reaches this fraction in (0, 1].
        memory_budget_bytes (Optional[int]): one byte budget for all compressed tables together
            (factor tables + projections + means, float32); ranks are chosen greedily where they
            buy the most explained variance (see ``torchrec_compress.methods.lowrank.rank``).  It is met, with
            ranks below ``rank_multiple`` where needed, or ``compress_`` raises naming the
            smallest size the tables can take.
            Exactly one of ``rank``, ``explained_variance``, ``memory_budget_bytes`` must be set.
        table_overrides (Dict[str, LowRankOverride]): per table name; names must exist.
        embeddings (bool): compress ``EmbeddingBagCollection`` tables.
        linear (bool): compress the hidden ``nn.Linear`` layers of MLPs (see ``keep_mlp_ends``).
        linear_rank (Optional[int]): rank of compressed Linear layers.
        linear_variance (Optional[float]): or the explained-variance target of Linear layers.
            With ``linear=True`` exactly one of ``linear_rank``/``linear_variance`` must be set.
        keep_mlp_ends (bool): leave the first and the last Linear of every MLP uncompressed.  An
            MLP is an ``nn.Sequential`` (at any depth, e.g. inside ``torchrec.modules.mlp.MLP``)
            that holds two or more ``nn.Linear`` layers, counted in module order.
        rank_multiple (int): ranks the library chooses (from ``explained_variance`` or
            ``memory_budget_bytes``) are rounded up to a multiple of this (capped at the table's
            dimension); an explicit ``rank`` is not.  fbgemm's training kernels need widths that
            are multiples of 4, so a factor table of another rank is stored packed,
            ``4 / gcd(k, 4)`` factor rows to a row, at the cost of that many lookups per id
            (``torchrec_compress.methods.lowrank.rank``); with the default 4 chosen ranks are packed only when a
            budget cannot be met otherwise, 1 keeps every chosen rank exact.
    """

    rank: int | None = None
    explained_variance: float | None = None
    memory_budget_bytes: int | None = None
    table_overrides: dict[str, LowRankOverride] = field(default_factory=dict)
    embeddings: bool = True
    linear: bool = False
    linear_rank: int | None = None
    linear_variance: float | None = None
    keep_mlp_ends: bool = True
    rank_multiple: int = 4

    @classmethod
    def _nested_fields(cls) -> dict[str, type]:
        return {"table_overrides": LowRankOverride}

    def __post_init__(self) -> None:
        name = type(self).__name__
        chosen = [
            f
            for f in ("rank", "explained_variance", "memory_budget_bytes")
            if getattr(self, f) is not None
        ]
        if self.embeddings and len(chosen) != 1:
            raise ValueError(
                f"{name} needs exactly one of rank, explained_variance, memory_budget_bytes "
                f"(got {chosen or 'none'})"
            )
        check_positive_int(self.rank, f"{name}.rank")
        check_fraction(self.explained_variance, f"{name}.explained_variance")
        check_positive_int(self.memory_budget_bytes, f"{name}.memory_budget_bytes")
        check_positive_int(self.rank_multiple, f"{name}.rank_multiple")
        for table, override in self.table_overrides.items():
            if not isinstance(override, LowRankOverride):
                raise ValueError(
                    f"{name}.table_overrides[{table!r}] must be a LowRankOverride, got {override!r}"
                )
        if not (self.embeddings or self.linear):
            raise ValueError(f"{name} compresses nothing: set embeddings=True and/or linear=True")
        if self.linear and (self.linear_rank is None) == (self.linear_variance is None):
            raise ValueError(
                f"{name}(linear=True) needs exactly one of linear_rank, linear_variance"
            )
        check_positive_int(self.linear_rank, f"{name}.linear_rank")
        check_fraction(self.linear_variance, f"{name}.linear_variance")

    @property
    def compresses_tables(self) -> bool:
        """Whether the tables are compressed (``embeddings``); the MLPs may be the only target.

        Example::

            >>> mlps_only = AFMConfig(embeddings=False, linear=True, linear_rank=4)
            >>> AFMConfig(rank=4).compresses_tables, mlps_only.compresses_tables
            (True, False)
        """
        return self.embeddings

    def targets(self) -> str:
        on = (
            ("EmbeddingBagCollection tables", self.embeddings),
            ("MLP Linear layers", self.linear),
        )
        return " or ".join(what for what, wanted in on if wanted)


@dataclass
class AFMConfig(LowRankConfig):
    """Atomic Feature Mimicking: PCA of what a table/layer outputs on calibration data.

    Tables: the frequency-weighted covariance of looked-up rows (weighted features add their
    weight); factors ``A = (E - mu) U_k``, projection ``B = U_k^T``, mean ``mu``.  Linear
    layers: PCA of the layer's outputs.  Needs calibration data; a table that the calibration
    data never looks up falls back to uniform row weights (with a warning naming it).
    See :class:`LowRankConfig` for the fields.

    Example::

        >>> AFMConfig(explained_variance=0.95, linear=True, linear_rank=16).rank_multiple
        4
    """


@dataclass
class SVDConfig(LowRankConfig):
    """Truncated SVD of the weights (the AFM paper's baseline): ``E ~ (U_k S_k) V_k^T``, no mean.

    Weights only: calibration data is accepted and ignored.  Explained variance is the fraction
    of the squared singular values kept.  See :class:`LowRankConfig` for the fields.

    Example::

        >>> SVDConfig(rank=4).to_dict()["rank"]
        4
    """
