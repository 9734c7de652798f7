"""Planning and sharding a model with TorchRec's planner and ``DistributedModelParallel``."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints, ShardingOption
from torchrec.distributed.quant_embeddingbag import QuantEmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from torchrec_compress.distributed.embeddingbag import (
    CPURowWiseEmbeddingBagCollectionSharder,
    has_in_backward_optimizers,
)
from torchrec_compress.distributed.fp_embeddingbag import FeatureProcessedCollectionSharder
from torchrec_compress.registry import SharderContext, method_sharders, placed_collection_types

SHARDING_TYPES = tuple(t.value for t in ShardingType)


def default_sharders(model: nn.Module | None = None) -> list[ModuleSharder[nn.Module]]:
    """TorchRec's default sharders, with the EBC sharder replaced by one that offers row-wise on
    CPU, plus every registered method's sharders (in registration order).

    Each method shards its compressed collections as one module each
    (:meth:`~torchrec_compress.registry.CompressionMethod.sharders`).  DMP and the planner take
    one sharder per module type, and a ``FeatureProcessedEmbeddingBagCollection`` needs a
    different one depending on the collection it holds: given ``model``, the FPEBC sharder is
    chosen for the FPEBCs it holds (a method's own, from ``SharderContext.feature_processed``,
    e.g. product quantization's; otherwise
    :class:`~torchrec_compress.distributed.fp_embeddingbag.FeatureProcessedCollectionSharder`,
    which extends TorchRec's).

    Given ``model``, the EBC sharder does not offer ``data_parallel`` when a table carries
    in-backward optimizers (TorchRec's data-parallel kernel would drop them).

    Args:
        model (Optional[nn.Module]): the model to shard; ``None`` assumes FPEBCs over plain or
            low-rank collections and no in-backward optimizer.

    Raises:
        ValueError: ``model`` holds FPEBCs over collections no single sharder can plan.

    Example::

        >>> "LowRankEmbeddingBagCollection" in {s.module_type.__name__ for s in default_sharders()}
        True
    """
    in_backward = model is not None and any(
        has_in_backward_optimizers(m)
        for m in model.modules()
        if isinstance(m, EmbeddingBagCollection)
    )
    ebc_sharder = CPURowWiseEmbeddingBagCollectionSharder(data_parallel=not in_backward)
    context = SharderContext(model=model, ebc_sharder=ebc_sharder)
    sharders: list[ModuleSharder[nn.Module]] = [ebc_sharder, *method_sharders(context)]
    sharders.append(_feature_processed_sharder(model, context))
    replaced = (EmbeddingBagCollection, FeatureProcessedEmbeddingBagCollection)
    sharders += [s for s in get_default_sharders() if s.module_type not in replaced]
    return sharders


def sharders(model: nn.Module | None = None) -> list[ModuleSharder[nn.Module]]:
    """Every sharder a ``DistributedModelParallel`` user must pass for compressed models.

    :func:`default_sharders` (pass ``model`` so that the FPEBC sharder matches its FPEBCs)
    less TorchRec's inference-only sharder of quantized collections (:func:`training_sharders`):
    it asserts CUDA and does not exchange ids between training processes, so a row-wise int8
    collection stays whole on every process (frozen rows) while the rest trains.

    Returns:
        list[ModuleSharder[nn.Module]]: a fresh list, safe to extend.

    Example::

        >>> names = [type(s).__name__ for s in sharders()]
        >>> names[:2]
        ['CPURowWiseEmbeddingBagCollectionSharder', 'PQEmbeddingBagCollectionSharder']
        >>> # DistributedModelParallel(model, plan=plan, sharders=sharders(), ...)
    """
    return training_sharders(default_sharders(model))


def _feature_processed_sharder(
    model: nn.Module | None, context: SharderContext
) -> ModuleSharder[nn.Module]:
    """The sharder of the model's FPEBCs: the one of the collection type they hold where a
    method has its own (one kind per model: one sharder per module type), else the shared one."""
    generic = FeatureProcessedCollectionSharder(context=context)
    if model is None:
        return generic
    inner = {
        fqn or "<model>": type(m._embedding_bag_collection)
        for fqn, m in model.named_modules()
        if isinstance(m, FeatureProcessedEmbeddingBagCollection)
    }
    special = {fqn: kind for fqn, kind in inner.items() if kind in context.feature_processed}
    if len(set(special.values())) > 1:
        raise ValueError(
            "one sharder per module type: FeatureProcessedEmbeddingBagCollections over "
            + ", ".join(f"{v.__name__} ({k})" for k, v in sorted(special.items()))
            + " cannot be sharded in one model; compress all of them alike"
        )
    if not special:
        return generic
    kind = next(iter(special.values()))
    sharder = context.feature_processed[kind]
    others = sorted(fqn for fqn, k in inner.items() if k is not kind)
    if others and not isinstance(sharder, FeatureProcessedCollectionSharder):
        raise ValueError(
            "one sharder per module type: FeatureProcessedEmbeddingBagCollections over "
            f"{kind.__name__} {sorted(special)} and over other collections {others} cannot be "
            "sharded in one model; compress all of them alike"
        )
    return sharder


def training_sharders(
    sharders: Sequence[ModuleSharder[nn.Module]] | None = None,
) -> list[ModuleSharder[nn.Module]]:
    """``sharders`` (default :func:`default_sharders`) without the sharders of TorchRec's
    quantized (inference) embedding bag collections; :func:`shard_model` uses them.

    A row-wise quantized table (:mod:`torchrec_compress.methods.rowwise_quant.quantize`) is TorchRec's quantized
    ``EmbeddingBagCollection``.  TorchRec's ``QuantEmbeddingBagCollectionSharder`` plans it at its
    true size (``rows x (d * bits / 8 + 4)`` bytes), but shards it into TorchRec's inference
    module (one process driving several GPUs, CUDA kernels): on CPU that fails ("Torch not
    compiled with CUDA enabled", torchrec 1.8.0), and its local-only input dist would not
    exchange ids between training processes anyway.  Without it, DMP keeps each quantized
    collection whole on every rank (its frozen ``uint8`` rows are not broadcast) while AFM
    projections, means and dense layers train.

    Args:
        sharders (Optional[Sequence[ModuleSharder[nn.Module]]]): the sharders to filter.

    Returns:
        list[ModuleSharder[nn.Module]]: the same sharders, in order, minus those of TorchRec's
        quantized ``EmbeddingBagCollection``.

    Example::

        >>> any(isinstance(s, QuantEmbeddingBagCollectionSharder) for s in training_sharders())
        False
        >>> len(training_sharders()) == len(default_sharders()) - 1
        True
    """
    sharders = list(sharders) if sharders is not None else default_sharders()
    return [
        s
        for s in sharders
        if not isinstance(s, QuantEmbeddingBagCollectionSharder)
        and s.module_type is not QuantEmbeddingBagCollection
    ]


def table_constraints(
    model: nn.Module,
    sharding_type: str | None,
    world_size: int,
    constraints: dict[str, ParameterConstraints] | None = None,
) -> dict[str, ParameterConstraints]:
    """Constraints forcing every table of every EBC in ``model`` to ``sharding_type``, or the
    caller's ``constraints`` (per table name, as TorchRec's planner takes them).

    Column-wise splitting needs ``min_partition`` no larger than ``dim / world_size`` (TorchRec's
    default keeps small tables whole); it is set so that each column shard is at least 4 wide.
    """
    if constraints is not None:
        if sharding_type is not None:
            raise ValueError("pass either sharding_type or constraints, not both")
        return dict(constraints)
    if sharding_type is None:
        return {}
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(
            f"unknown sharding type {sharding_type!r}; valid: {', '.join(SHARDING_TYPES)}"
        )
    forced: dict[str, ParameterConstraints] = {}
    for module in model.modules():
        if not isinstance(module, (EmbeddingBagCollection, *placed_collection_types())):
            continue
        configs: list[EmbeddingBagConfig] = module.embedding_bag_configs()  # type: ignore[operator]
        for config in configs:
            min_partition = None
            if sharding_type in (
                ShardingType.COLUMN_WISE.value,
                ShardingType.TABLE_COLUMN_WISE.value,
            ):
                min_partition = max(4, config.embedding_dim // world_size)
            forced[config.name] = ParameterConstraints(
                sharding_types=[sharding_type], min_partition=min_partition
            )
    return forced


def plan_model(
    model: nn.Module,
    topology: Topology,
    sharding_type: str | None = None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    pg: dist.ProcessGroup | None = None,
    constraints: dict[str, ParameterConstraints] | None = None,
) -> ShardingPlan:
    """Plan ``model`` (any device, ``meta`` included) on ``topology`` with TorchRec's planner.

    Args:
        model: the module tree holding the EBCs (unsharded).
        topology: the hypothetical or real cluster.
        sharding_type: force one sharding type for every table (``None``: planner's choice).
        sharders: defaults to :func:`default_sharders`.
        pg: when given, rank 0 plans and the plan is broadcast (``collective_plan``).
        constraints: TorchRec ``ParameterConstraints`` per table name (instead of
            ``sharding_type``).

    Example::

        >>> import torch
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> ebc = EmbeddingBagCollection(
        ...     tables=[EmbeddingBagConfig(name="t", embedding_dim=128, num_embeddings=10**9,
        ...                                feature_names=["f"])],
        ...     device=torch.device("meta"))
        >>> topology = Topology(world_size=64, local_world_size=8, compute_device="cuda")
        >>> plan = plan_model(ebc, topology)
        >>> len(plan.plan[""]["t"].ranks) > 1
        True
    """
    sharders = sharders if sharders is not None else default_sharders(model)
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=table_constraints(model, sharding_type, topology.world_size, constraints),
    )
    if pg is not None:
        return collective_plan(planner, model, sharders, pg)
    return planner.plan(model, sharders)


def collective_plan(
    planner: EmbeddingShardingPlanner,
    model: nn.Module,
    sharders: list[ModuleSharder[nn.Module]],
    pg: dist.ProcessGroup,
) -> ShardingPlan:
    """``planner.collective_plan``, but a plan rank 0 cannot make fails on every rank.

    TorchRec's ``collective_plan`` plans on rank 0 and broadcasts the plan: when rank 0 raises
    (no sharding option left under the constraints, not enough memory), the other ranks wait
    for the broadcast until the process group's timeout.  Here rank 0 broadcasts its error
    instead, and every rank raises it (same type when it can be rebuilt from its message).
    """
    result: list[Any] = [None]
    if dist.get_rank(pg) == 0:
        try:
            result[0] = planner.plan(model, sharders)
        except Exception as error:  # noqa: BLE001 - re-raised on every rank below
            result[0] = (type(error), str(error))
    dist.broadcast_object_list(result, src=dist.get_global_rank(pg, 0), group=pg)
    if isinstance(result[0], tuple):
        error_type, message = result[0]
        try:
            refusal = error_type(message)
        except Exception:  # noqa: BLE001 - an error type that takes other arguments
            refusal = RuntimeError(f"{error_type.__name__}: {message}")
        raise refusal
    plan = result[0]
    assert isinstance(plan, ShardingPlan)
    return plan


def shard_model(
    model: nn.Module,
    device: torch.device,
    sharding_type: str | None = None,
    pg: dist.ProcessGroup | None = None,
    constraints: dict[str, ParameterConstraints] | None = None,
) -> DistributedModelParallel:
    """Wrap ``model`` in ``DistributedModelParallel`` with a plan from TorchRec's planner
    (every table forced to ``sharding_type``, or planned under ``constraints`` per table name).

    Attach fused (in-backward) optimizers before calling this, so that the planner counts their
    state.  On CPU, DMP does not copy the source weights into the shards: use
    :func:`torchrec_compress.distributed.state.load_full_state_dict_` or a DCP checkpoint afterwards.
    """
    pg = pg if pg is not None else dist.group.WORLD
    assert pg is not None, "torch.distributed must be initialised before sharding"
    topology = Topology(
        world_size=dist.get_world_size(pg),
        compute_device=device.type,
        local_world_size=dist.get_world_size(pg) if device.type == "cpu" else None,
    )
    sharders = training_sharders(default_sharders(model))
    plan = plan_model(model, topology, sharding_type, sharders, pg, constraints)
    return DistributedModelParallel(
        module=model, device=device, plan=plan, sharders=sharders, init_data_parallel=True
    )


@dataclass
class TableStorage:
    """The planner's storage estimate of one table's chosen sharding option (all its shards).

    Args:
        module (str): fully qualified name of the sharded module (e.g. an EBC).
        table (str): table name.
        shape (tuple[int, int]): rows x dim of the table as the planner saw it.
        sharding_type (str): chosen sharding type.
        compute_kernel (str): chosen compute kernel.
        ranks (list[int]): ranks holding its shards.
        hbm (int): bytes of device memory over all shards (weights, optimizer state, I/O).
        ddr (int): bytes of host memory over all shards.
    """

    module: str
    table: str
    shape: tuple[int, int]
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    hbm: int
    ddr: int


@dataclass
class PlanStorage:
    """A sharding plan together with the planner's own storage estimate of every table."""

    plan: ShardingPlan
    tables: list[TableStorage] = field(default_factory=list)

    @property
    def hbm(self) -> int:
        """Total estimated device bytes over all tables and ranks."""
        return sum(t.hbm for t in self.tables)

    @property
    def ddr(self) -> int:
        """Total estimated host bytes over all tables and ranks."""
        return sum(t.ddr for t in self.tables)

    def __str__(self) -> str:
        header = ("module", "table", "shape", "sharding", "kernel", "ranks", "hbm GiB", "ddr GiB")
        lines = [
            (
                t.module,
                t.table,
                "x".join(map(str, t.shape)),
                t.sharding_type,
                t.compute_kernel,
                _ranks_text(t.ranks),
                f"{t.hbm / 2**30:.3f}",
                f"{t.ddr / 2**30:.3f}",
            )
            for t in self.tables
        ]
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        total = f"total: hbm {self.hbm / 2**30:.3f} GiB, ddr {self.ddr / 2**30:.3f} GiB"
        return "\n".join([fmt.format(*header), *(fmt.format(*row) for row in lines), total])


def _ranks_text(ranks: list[int]) -> str:
    unique = sorted(set(ranks))
    if len(unique) > 4 and unique == list(range(unique[0], unique[-1] + 1)):
        return f"{unique[0]}..{unique[-1]}"
    return ",".join(map(str, unique))


def plan_storage(
    model: nn.Module,
    topology: Topology,
    sharding_type: str | None = None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
) -> PlanStorage:
    """Plans ``model`` like :func:`plan_model` and reports the planner's storage estimates.

    The numbers are the planner's own: the ``Storage`` of every shard of the sharding options it
    chose, read through the planner's public ``callbacks`` hook (called with the best plan).  So
    a compressed module is sized exactly as the planner sizes it when it places shards (e.g.
    the rows x k factor tables of a ``LowRankEmbeddingBagCollection``).  Works on ``meta``.

    Args:
        model: the module tree holding the EBCs (unsharded, any device).
        topology: the hypothetical or real cluster.
        sharding_type: force one sharding type for every table (``None``: planner's choice).
        sharders: defaults to :func:`default_sharders`.

    Example::

        >>> import torch
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> ebc = EmbeddingBagCollection(
        ...     tables=[EmbeddingBagConfig(name="t", embedding_dim=128, num_embeddings=10**9,
        ...                                feature_names=["f"])],
        ...     device=torch.device("meta"))
        >>> topology = Topology(world_size=64, local_world_size=8, compute_device="cuda")
        >>> report = plan_storage(ebc, topology)
        >>> report.hbm > 10**9 * 128 * 4
        True
    """
    chosen: list[ShardingOption] = []

    def record(best: list[ShardingOption]) -> list[ShardingOption]:
        chosen.extend(best)
        return best

    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=table_constraints(model, sharding_type, topology.world_size),
        callbacks=[record],
    )
    plan = planner.plan(model, sharders if sharders is not None else default_sharders(model))
    tables = []
    for option in chosen:
        storage = option.total_storage
        tables.append(
            TableStorage(
                module=option.path,
                table=option.name,
                shape=(int(option.tensor.shape[0]), int(option.tensor.shape[1])),
                sharding_type=option.sharding_type,
                compute_kernel=option.compute_kernel,
                ranks=[shard.rank for shard in option.shards if shard.rank is not None],
                hbm=int(storage.hbm),
                ddr=int(storage.ddr),
            )
        )
    return PlanStorage(plan, tables)
