"""Configuration dataclasses for ``compress_``: one plain, printable, serialisable config per method.

Every config derives from :class:`CompressionConfig`, which gives ``to_dict`` / ``from_dict``
round trips (plain JSON-able data), so a config can be logged next to the checkpoint it produced.

Example::

    >>> from torchrec_compress.config import AFMConfig, LowRankOverride
    >>> cfg = AFMConfig(rank=8, table_overrides={"t_user": LowRankOverride(explained_variance=0.9)})
    >>> AFMConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

_C = TypeVar("_C", bound="CompressionConfig")


@dataclass
class CompressionConfig:
    """Base of all method configs: plain data with a dict round trip.

    Subclasses whose fields hold nested dataclasses list them so that ``from_dict`` can rebuild
    them: ``_nested_fields`` (field name -> dataclass type of the dict values) and
    ``_sub_configs`` (field name -> dataclass type of the field).
    """

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as plain (JSON-serialisable) Python data."""
        return dataclasses.asdict(self)

    @classmethod
    def _nested_fields(cls) -> dict[str, type]:
        return {}

    @classmethod
    def _sub_configs(cls) -> dict[str, type]:
        return {}

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
        """Rebuilds a config from ``to_dict`` output (validation runs again).

        A sub-config's fields may also be given flat (as configs wrote them before they had
        sub-configs): they are moved into it.
        """
        kwargs = dict(data)
        for name, sub_type in cls._sub_configs().items():
            sub = dict(kwargs.get(name) or {})
            for f in dataclasses.fields(sub_type):
                if f.name in kwargs:
                    sub[f.name] = kwargs.pop(f.name)
            kwargs[name] = sub_type(**sub)
        for name, value_type in cls._nested_fields().items():
            if name in kwargs:
                kwargs[name] = {
                    key: value if isinstance(value, value_type) else value_type(**value)
                    for key, value in kwargs[name].items()
                }
        return cls(**kwargs)


def _check_fraction(value: float | None, what: str) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {value}")


def _check_rank(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{what} must be a positive int, got {value!r}")


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
        _check_rank(self.rank, "LowRankOverride.rank")
        _check_fraction(self.explained_variance, "LowRankOverride.explained_variance")


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
            buy the most explained variance (see ``torchrec_compress.rank``).  It is met, with
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
            (``torchrec_compress.rank``); with the default 4 chosen ranks are packed only when a
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
        _check_rank(self.rank, f"{name}.rank")
        _check_fraction(self.explained_variance, f"{name}.explained_variance")
        _check_rank(self.memory_budget_bytes, f"{name}.memory_budget_bytes")
        _check_rank(self.rank_multiple, f"{name}.rank_multiple")
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
        _check_rank(self.linear_rank, f"{name}.linear_rank")
        _check_fraction(self.linear_variance, f"{name}.linear_variance")


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


@dataclass
class MECOverride:
    """Per-table setting that replaces fields of an :class:`MECConfig` (``None`` keeps the global).

    Args:
        num_subspaces (Optional[int]): ``M`` for this table (must divide its dimension).
        num_centroids (Optional[int]): ``K`` for this table.
        steps (Optional[int]): MEC training steps for this table.
        skip (bool): leave this table uncompressed: its rows are kept exactly, at their own
            size (inside a ``PQEmbeddingBagCollection`` as one subspace of ``N`` codewords whose
            codes, its row ids, are not held).
    """

    num_subspaces: int | None = None
    num_centroids: int | None = None
    steps: int | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        _check_rank(self.num_subspaces, "MECOverride.num_subspaces")
        _check_rank(self.num_centroids, "MECOverride.num_centroids")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"MECOverride.steps must be >= 0, got {self.steps}")


@dataclass
class KMeansTraining:
    """How plain PQ trains its codebooks: popularity-weighted k-means per subspace.

    What a :class:`PQConfig` stores (``M``, ``K``, the weighting) is separate from this: the same
    storage can be trained differently without changing the module that serves it.

    Args:
        kmeans_iterations (int): Lloyd iterations.
        kmeans_sample_size (int): at most this many rows (the most looked-up ones whole, a
            uniform draw of the others, weighted by the rows each stands for) train the k-means.
        chunk_size (int): rows encoded at once; bounds encoding memory independently of N.
        seed (int): seed of every random draw (sampling, k-means, negatives).

    Example::

        >>> KMeansTraining(kmeans_iterations=5).kmeans_sample_size
        65536
    """

    kmeans_iterations: int = 20
    kmeans_sample_size: int = 65536
    chunk_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field_name in ("kmeans_sample_size", "chunk_size"):
            _check_rank(getattr(self, field_name), f"{name}.{field_name}")
        if self.kmeans_iterations < 0:
            raise ValueError(f"{name}.kmeans_iterations must be >= 0, got {self.kmeans_iterations}")


@dataclass
class MECTraining(KMeansTraining):
    """How MEC trains its codes: k-means start, then the paper's quantizer training.

    Popularity-weighted sampling, a straight-through encoder, commitment, contrastive and
    balance terms (see ``DESIGN.md``).  The k-means fields of :class:`KMeansTraining` set its
    initialisation.

    Args:
        steps (int): MEC training steps (each draws ``sample_size`` rows); 0: k-means only.
        sample_size (int): rows per training step.
        learning_rate (float): Adam learning rate of encoder, decoder and codebooks.
        commitment_weight (float): ``beta`` of the commitment loss ``||z - sg(q)||^2``.
        contrastive_weight (float): weight of the InfoNCE term (0 disables it).
        contrastive_temperature (float): InfoNCE temperature on cosine similarities.
        num_negatives (int): negatives per sample (one subspace's code replaced each).
        balance_weight (float): weight of ``log K - H(mean soft assignment)`` (0 disables it).
        balance_temperature (float): temperature of the soft assignment at the first step,
            relative to the batch's mean squared distance (scale free).  It must be small: with
            a soft assignment (e.g. 0.1) the entropy is maximised by rows that sit equally far
            from many codewords while their hard codes collapse onto a few.
        balance_temperature_final (float): temperature at the last step (annealed
            geometrically): soft usage early gives every codeword gradient, sharp usage late
            balances the hard codes.
        balance_sample_size (int): rows drawn uniformly (every row alike, whatever its
            popularity) each step on which the balance term is computed as well (0: only on
            the popularity-sampled batch).  Most rows of a large table are rarely looked up and
            seldom sampled; without this their codes bunch onto a few codewords.
        reseed_interval (int): every this many steps, codewords that no sample picked are moved
            onto the worst-quantized samples and the quantizer is scored on the validation
            sample (0: never re-seed; score only at the end).
        validation_size (int): rows drawn (with the training distribution) to score the
            quantizer by its reconstruction MSE (a popularity-weighted MSE estimate).
        keep_best (bool): end with the best-scoring state, the k-means start included, so MEC
            never reconstructs worse than its initialisation; ``False`` keeps the last state.
        perplexity_floor (float): with ``keep_best``, only states whose codebook perplexity
            (min over subspaces, every row counted once, estimated on ``validation_size``
            uniformly drawn rows) is at least ``perplexity_floor * K'`` compete on MSE; when no
            state reaches it, the most balanced one is kept (0 disables the floor).
        reference_shared_negative (bool): reproduce the reference code's single random
            negative shared by the whole batch instead of per-sample negatives.

    Example::

        >>> MECTraining(steps=50).learning_rate
        0.001
    """

    steps: int = 300
    sample_size: int = 1024
    learning_rate: float = 1e-3
    commitment_weight: float = 0.25
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.1
    num_negatives: int = 8
    balance_weight: float = 0.1
    balance_temperature: float = 0.01
    balance_temperature_final: float = 0.001
    balance_sample_size: int = 1024
    reseed_interval: int = 25
    validation_size: int = 8192
    keep_best: bool = True
    perplexity_floor: float = 0.5
    reference_shared_negative: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sample_size", "num_negatives", "validation_size"):
            _check_rank(getattr(self, name), f"MECTraining.{name}")
        for name in ("steps", "reseed_interval", "balance_sample_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"MECTraining.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.perplexity_floor <= 1.0:
            raise ValueError(
                f"MECTraining.perplexity_floor must be in [0, 1], got {self.perplexity_floor}"
            )
        for name in (
            "contrastive_temperature",
            "balance_temperature",
            "balance_temperature_final",
            "learning_rate",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"MECTraining.{name} must be > 0, got {getattr(self, name)}")


def _check_storage(config: "MECConfig | PQConfig") -> None:
    name = type(config).__name__
    if config.weighting not in ("log2", "lookups"):
        raise ValueError(f"{name}.weighting must be 'log2' or 'lookups', got {config.weighting!r}")
    _check_rank(config.num_subspaces, f"{name}.num_subspaces")
    _check_rank(config.num_centroids, f"{name}.num_centroids")
    if config.num_centroids > 2**31:
        raise ValueError(f"{name}.num_centroids must be <= 2**31, got {config.num_centroids}")
    for table, override in config.table_overrides.items():
        if not isinstance(override, MECOverride):
            raise ValueError(
                f"{name}.table_overrides[{table!r}] must be a MECOverride, got {override!r}"
            )


@dataclass
class MECConfig(CompressionConfig):
    """MEC product quantization ("A Universal Framework for Compressing Embeddings in CTR Prediction").

    What is stored comes first: each table of dimension ``d`` is split into ``num_subspaces``
    (``M``) blocks of ``d / M`` dims with ``num_centroids`` (``K``) codewords each; rows become
    ``M`` codes (``uint8`` for ``K <= 256``, see ``torchrec_compress.pq.code_dtype``), and rows
    are weighted by popularity as ``weighting`` says.  How the codes are trained is
    ``training`` (:class:`MECTraining`).  ``mode="mec"`` trains the paper's quantizer;
    ``mode="pq"`` is the baseline, popularity-weighted k-means only (prefer :class:`PQConfig`).

    Args:
        num_subspaces (int): ``M``, must divide every compressed table's dimension.
        num_centroids (int): ``K``, codewords per subspace (at most ``2**31``).
        popularity_weighting (bool): weight row ``i`` by its lookup count ``n_i`` as
            ``weighting`` says; off: every row weighs 1.
        weighting (str): ``"log2"`` (the paper's ``max(1, floor(log2 n_i))``: balanced code
            usage) or ``"lookups"`` (``max(1, n_i)``: error weighted as lookups see it; better AUC
            on skewed tables, fewer codewords used; see BENCHMARKS.md).
        table_overrides (Dict[str, MECOverride]): per table name.
        mode (str): ``"mec"`` or ``"pq"``.
        training (MECTraining): how the codes are trained.

    Example::

        >>> cfg = MECConfig(
        ...     num_subspaces=8,
        ...     table_overrides={"t_user": MECOverride(skip=True)},
        ...     training=MECTraining(steps=100),
        ... )
        >>> MECConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> MECConfig.from_dict({"num_subspaces": 4, "steps": 7}).training.steps  # flat, older
        7
    """

    num_subspaces: int = 8
    num_centroids: int = 256
    popularity_weighting: bool = True
    weighting: str = "log2"
    table_overrides: dict[str, MECOverride] = field(default_factory=dict)
    mode: str = "mec"
    training: MECTraining = field(default_factory=MECTraining)

    @classmethod
    def _nested_fields(cls) -> dict[str, type]:
        return {"table_overrides": MECOverride}

    @classmethod
    def _sub_configs(cls) -> dict[str, type]:
        return {"training": MECTraining}

    def __post_init__(self) -> None:
        if self.mode not in ("mec", "pq"):
            raise ValueError(f"MECConfig.mode must be 'mec' or 'pq', got {self.mode!r}")
        if not isinstance(self.training, MECTraining):
            raise ValueError(f"MECConfig.training must be a MECTraining, got {self.training!r}")
        _check_storage(self)

    def for_table(self, table_name: str) -> "MECConfig":
        """Returns this config with ``table_name``'s override applied (overrides dropped)."""
        override = self.table_overrides.get(table_name)
        changes: dict[str, Any] = {"table_overrides": {}}
        if override is not None:
            for name in ("num_subspaces", "num_centroids"):
                if getattr(override, name) is not None:
                    changes[name] = getattr(override, name)
            if override.steps is not None:
                changes["training"] = dataclasses.replace(self.training, steps=override.steps)
        try:
            return dataclasses.replace(self, **changes)
        except ValueError as e:
            raise ValueError(f"table {table_name!r}: override gives {e}") from e

    def check_table(self, table_name: str, embedding_dim: int) -> None:
        """Raises ``ValueError`` naming ``table_name`` when ``embedding_dim % num_subspaces``."""
        if embedding_dim % self.num_subspaces != 0:
            raise ValueError(
                f"table {table_name!r}: embedding_dim {embedding_dim} is not divisible by "
                f"num_subspaces={self.num_subspaces}; pick a divisor of {embedding_dim}"
            )


@dataclass
class PQConfig(CompressionConfig):
    """Plain product quantization (FAISS's ``ProductQuantizer``): weighted k-means per subspace.

    The baseline of MEC without its trained encoder: each table of dimension ``d`` is split
    into ``num_subspaces`` (``M``) blocks of ``d / M`` dims, each with ``num_centroids`` (``K``)
    codewords found by k-means on the rows (weighted by popularity); rows become ``M`` codes.
    What is stored (``M``, ``K``, the weighting) is separate from how the k-means is trained
    (``training``, :class:`KMeansTraining`).  Same result as ``MECConfig(mode="pq")``
    (:meth:`to_mec_config` gives it).

    Args:
        num_subspaces (int): ``M``, must divide a table's dimension (else the table is kept).
        num_centroids (int): ``K``, codewords per subspace (at most ``2**31``).
        popularity_weighting (bool): weight row ``i`` by its lookup count ``n_i`` as
            ``weighting`` says (needs calibration data); off: every row weighs 1.
        weighting (str): ``"log2"`` (``max(1, floor(log2 n_i))``) or ``"lookups"``
            (``max(1, n_i)``).
        table_overrides (Dict[str, MECOverride]): per table name: ``num_subspaces``,
            ``num_centroids`` or ``skip`` (``steps`` belongs to MEC and is refused).
        training (KMeansTraining): how the k-means is trained.

    Example::

        >>> cfg = PQConfig(num_subspaces=4, num_centroids=16)
        >>> PQConfig.from_dict(cfg.to_dict()) == cfg, cfg.to_mec_config().mode
        (True, 'pq')
    """

    num_subspaces: int = 8
    num_centroids: int = 256
    popularity_weighting: bool = True
    weighting: str = "log2"
    table_overrides: dict[str, MECOverride] = field(default_factory=dict)
    training: KMeansTraining = field(default_factory=KMeansTraining)

    @classmethod
    def _nested_fields(cls) -> dict[str, type]:
        return {"table_overrides": MECOverride}

    @classmethod
    def _sub_configs(cls) -> dict[str, type]:
        return {"training": KMeansTraining}

    def __post_init__(self) -> None:
        stepped = sorted(n for n, o in self.table_overrides.items() if getattr(o, "steps", None))
        if stepped:
            raise ValueError(
                f"PQConfig.table_overrides {stepped} set steps, which only MECConfig trains"
            )
        if type(self.training) is not KMeansTraining:
            raise ValueError(f"PQConfig.training must be a KMeansTraining, got {self.training!r}")
        _check_storage(self)

    def to_mec_config(self) -> MECConfig:
        """The equivalent ``MECConfig(mode="pq")`` (what the PQ trainer and the sharded route read).

        Example::

            >>> PQConfig(num_centroids=16).to_mec_config().num_centroids
            16
        """
        storage = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        training = MECTraining(**dataclasses.asdict(storage.pop("training")))
        return MECConfig(mode="pq", training=training, **storage)
