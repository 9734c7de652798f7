"""MEC / PQ configs: what a product-quantized table stores (``M``, ``K``, the popularity
weighting, per-table overrides) apart from how its codes are trained (``MECTraining``,
``KMeansTraining``).

Example::

    >>> from torchrec_compress.methods.pq.config import MECConfig, MECTraining
    >>> cfg = MECConfig(num_subspaces=4, training=MECTraining(steps=10))
    >>> MECConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torchrec_compress.config import CompressionConfig, check_positive_int


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
        check_positive_int(self.num_subspaces, "MECOverride.num_subspaces")
        check_positive_int(self.num_centroids, "MECOverride.num_centroids")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"MECOverride.steps must be >= 0, got {self.steps}")


@dataclass
class KMeansTraining:
    """How plain PQ trains its codebooks: popularity-weighted k-means per subspace.

    What a :class:`PQConfig` stores (``M``, ``K``, the weighting) is separate from this: the same
    storage can be trained differently without changing the module that serves it.

    Args:
        kmeans_iterations (int): at most this many Lloyd iterations (the k-means starts from
            weighted k-means++ seeds).
        kmeans_tolerance (float): the k-means stops once an iteration lowers its weighted
            squared error by less than this fraction (0: only when no code changes, or after
            ``kmeans_iterations``).  On the benchmark tables ``1e-3`` stopped after 20-22
            iterations; ``1e-4`` took 2.1-2.6x as many for 0.7-1 % less error (BENCHMARKS.md,
            "k-means: tolerance and speed").
        kmeans_sample_size (int): at most this many rows (the most looked-up ones whole, a
            uniform draw of the others, weighted by the rows each stands for) train the k-means.
        chunk_size (int): rows encoded at once; bounds encoding memory independently of N.
        seed (int): seed of every random draw (sampling, k-means, negatives).

    Example::

        >>> KMeansTraining(kmeans_iterations=5).kmeans_sample_size
        65536
        >>> KMeansTraining().kmeans_tolerance
        0.001
    """

    kmeans_iterations: int = 50
    kmeans_tolerance: float = 1e-3
    kmeans_sample_size: int = 65536
    chunk_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field_name in ("kmeans_sample_size", "chunk_size"):
            check_positive_int(getattr(self, field_name), f"{name}.{field_name}")
        if self.kmeans_iterations < 0:
            raise ValueError(f"{name}.kmeans_iterations must be >= 0, got {self.kmeans_iterations}")
        if not self.kmeans_tolerance >= 0:
            raise ValueError(f"{name}.kmeans_tolerance must be >= 0, got {self.kmeans_tolerance}")


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
            check_positive_int(getattr(self, name), f"MECTraining.{name}")
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
    check_positive_int(config.num_subspaces, f"{name}.num_subspaces")
    check_positive_int(config.num_centroids, f"{name}.num_centroids")
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
    ``M`` codes (``uint8`` for ``K <= 256``, see ``torchrec_compress.methods.pq.code_dtype``), and rows
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
