"""The config of byte-budget compression: :class:`BudgetConfig`.

Example::

    >>> cfg = BudgetConfig(memory_budget_bytes=2**20, methods=("int8", "afm", "afm+pq"))
    >>> BudgetConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchrec_compress.config import CompressionConfig, check_positive_int

#: every option kind a table may take ("fp32", keeping the table, is always allowed)
OPTION_KINDS: tuple[str, ...] = (
    "fp16",
    "int8",
    "int4",
    "afm",
    "pq",
    "afm+pq",
    "afm+int8",
    "afm+int4",
)
#: how the error of an option is scaled before tables are compared
ERROR_SCALES: tuple[str, ...] = ("absolute", "relative")
#: what the allocator minimises: the (scaled) squared output error, or the loss increase
OBJECTIVES: tuple[str, ...] = ("squared_error", "loss_delta", "fisher")


@dataclass
class BudgetConfig(CompressionConfig):
    """One byte budget for every selected table, spent where it loses the least output error.

    For every table ``compress_`` considers keeping it and each option of ``methods`` at each
    size (``ranks`` for AFM, ``subspaces`` for PQ), sizes each exactly as the compression
    report counts bytes, estimates its error on the calibration data, and picks one option per
    table so that the tables' bytes total at most ``memory_budget_bytes`` and the estimated
    error is smallest (greedy on error saved per byte over each table's convex hull, then the
    leftover bytes filled).  One collection holds either product-quantized or row-wise
    quantized tables, not both (AFM and fp32 tables go with either): both are tried per
    collection.

    The error of an option is its squared output error summed over the table's lookups in the
    calibration data (``error="absolute"``: AFM's own objective, which the rank budget of
    :class:`AFMConfig` spends too), or that divided by the table's lookup-weighted output
    variance (``"relative"``: every table's output counts alike), times ``sensitivity[table]``
    (default 1) where you know that the loss depends on some features more than on others, and,
    with ``loss_sensitivity=True``, times the table's mean squared loss gradient per output
    dimension on the calibration data (``forward_fn`` must then return the loss, as
    ``DLRMTrain`` does; :mod:`~torchrec_compress.budget.sensitivity`): the error then estimates
    the loss each option adds, in the same units for every table.

    Args:
        memory_budget_bytes (int): bytes the selected tables may take after compression.
        methods (tuple[str, ...]): option kinds to consider, from :data:`OPTION_KINDS`
            (``"pq"``: product quantization, trained as ``pq_mode`` says; ``"afm+pq"``,
            ``"afm+int8"``, ``"afm+int4"``: AFM, then its factor tables quantized).
        ranks (tuple[int, ...]): AFM ranks to consider (below a table's dimension; ranks that
            are not multiples of 4 are stored packed and cannot be quantized further).
        subspaces (tuple[int, ...]): PQ ``M`` values (each must divide the quantized width).
        num_centroids (int): PQ ``K``, codewords per subspace.
        pq_mode (str): ``"pq"`` (weighted k-means) or ``"mec"`` (MEC training) for the chosen
            PQ tables.
        weighting (str): PQ row weights from lookup counts, ``"log2"`` (the methods' default)
            or ``"lookups"``.  Measured on the synthetic default at 16x with 50 calibration
            batches, ``"lookups"`` made PQ look best by the estimates (about 1 % of the output
            variance) and lost 0.023 test AUC before fine-tuning, where ``"log2"`` (AFM then
            int8 chosen) lost none: the squared-error estimate does not see what lookup-weighted
            codes cost the rarely read rows.
        error (str): ``"absolute"`` or ``"relative"``, see above.
        sensitivity (dict[str, float]): per table name, a factor on its error (> 0).
        loss_sensitivity (bool): weigh each table's error by the loss's gradient (see above).
        objective (str): ``"squared_error"`` (the estimates above) or ``"loss_delta"``: each
            option's cost is the increase of the model's mean loss on ``loss_batches``
            held-out calibration batches when only that table's rows are replaced by the
            option's reconstruction (the same fits as the estimates; options off every
            family's Pareto front of (bytes, estimated error) are not priced and not chosen;
            ``forward_fn`` must return the loss; :mod:`~torchrec_compress.budget.loss_delta`);
            or ``"fisher"``: the same options priced by a second-order estimate of that
            increase, ``mean_x (g_x^T e_x)^2 / 2`` with per-example loss gradients ``g_x`` on
            the pooled output and pooled errors ``e_x`` (:mod:`~torchrec_compress.budget.fisher`;
            the loss must be a mean over the batch's examples, as ``DLRMTrain``'s is).
        loss_batches (int): held-out batches the ``"loss_delta"`` and ``"fisher"`` objectives
            measure on.
        sample_size (int): held-out lookups per table on which errors are measured.
        fit_sample_size (int): rows per table the PQ estimates fit k-means on; the PQ method's
            own sample size by default (``KMeansTraining.kmeans_sample_size``): fitted on fewer
            rows, k-means reproduces the popular rows (in both samples) better than the method
            will, and the estimate is too low (on the synthetic default at 4,096 rows: 0.19 of
            a large table's output variance estimated, 0.28 … 0.51 measured on test lookups).
        estimate_iterations (int): k-means iterations of the PQ error estimates.
        seed (int): seed of the samples and estimates.

    Example::

        >>> BudgetConfig(memory_budget_bytes=1000).methods[:3]
        ('fp16', 'int8', 'int4')
        >>> BudgetConfig(memory_budget_bytes=1000, methods=("int3",))
        Traceback (most recent call last):
        ...
        ValueError: BudgetConfig.methods has unknown option(s) ['int3']; valid: ['afm', 'afm+int4', 'afm+int8', 'afm+pq', 'fp16', 'int4', 'int8', 'pq']
    """

    memory_budget_bytes: int = 0
    methods: tuple[str, ...] = OPTION_KINDS
    ranks: tuple[int, ...] = (2, 4, 8, 16, 32)
    subspaces: tuple[int, ...] = (1, 2, 4, 8, 16)
    num_centroids: int = 256
    pq_mode: str = "pq"
    weighting: str = "log2"
    error: str = "absolute"
    sensitivity: dict[str, float] = field(default_factory=dict)
    loss_sensitivity: bool = False
    objective: str = "squared_error"
    loss_batches: int = 8
    sample_size: int = 8192
    fit_sample_size: int = 65536
    estimate_iterations: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.ranks = tuple(self.ranks)
        self.subspaces = tuple(self.subspaces)
        check_positive_int(self.memory_budget_bytes, "BudgetConfig.memory_budget_bytes")
        unknown = sorted(set(self.methods) - set(OPTION_KINDS))
        if unknown:
            raise ValueError(
                f"BudgetConfig.methods has unknown option(s) {unknown}; "
                f"valid: {sorted(OPTION_KINDS)}"
            )
        for name in ("ranks", "subspaces"):
            for value in getattr(self, name):
                check_positive_int(value, f"BudgetConfig.{name} entry")
        for name in (
            "num_centroids",
            "sample_size",
            "fit_sample_size",
            "estimate_iterations",
            "loss_batches",
        ):
            check_positive_int(getattr(self, name), f"BudgetConfig.{name}")
        choices = {"pq_mode": ("pq", "mec"), "weighting": ("log2", "lookups")}
        for name, valid in {**choices, "error": ERROR_SCALES, "objective": OBJECTIVES}.items():
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"BudgetConfig.{name} must be one of {valid}, got {getattr(self, name)!r}"
                )
        for table, factor in self.sensitivity.items():
            if not factor > 0:
                raise ValueError(f"BudgetConfig.sensitivity[{table!r}] must be > 0, got {factor}")

    def targets(self) -> str:
        return "EmbeddingBagCollection tables (within one byte budget)"
