"""Planning and sharding a model with TorchRec's planner and ``DistributedModelParallel``."""

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_compress.distributed.embeddingbag import CPURowWiseEmbeddingBagCollectionSharder

SHARDING_TYPES = tuple(t.value for t in ShardingType)


def default_sharders() -> list[ModuleSharder[nn.Module]]:
    """TorchRec's default sharders, with the EBC sharder replaced by one that offers row-wise on CPU."""
    sharders: list[ModuleSharder[nn.Module]] = [CPURowWiseEmbeddingBagCollectionSharder()]
    sharders += [s for s in get_default_sharders() if s.module_type is not EmbeddingBagCollection]
    return sharders


def table_constraints(
    model: nn.Module, sharding_type: str | None, world_size: int
) -> dict[str, ParameterConstraints]:
    """Constraints forcing every table of every EBC in ``model`` to ``sharding_type``.

    Column-wise splitting needs ``min_partition`` no larger than ``dim / world_size`` (TorchRec's
    default keeps small tables whole); it is set so that each column shard is at least 4 wide.
    """
    if sharding_type is None:
        return {}
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(
            f"unknown sharding type {sharding_type!r}; valid: {', '.join(SHARDING_TYPES)}"
        )
    constraints: dict[str, ParameterConstraints] = {}
    for module in model.modules():
        if not isinstance(module, EmbeddingBagCollection):
            continue
        for config in module.embedding_bag_configs():
            min_partition = None
            if sharding_type in (
                ShardingType.COLUMN_WISE.value,
                ShardingType.TABLE_COLUMN_WISE.value,
            ):
                min_partition = max(4, config.embedding_dim // world_size)
            constraints[config.name] = ParameterConstraints(
                sharding_types=[sharding_type], min_partition=min_partition
            )
    return constraints


def plan_model(
    model: nn.Module,
    topology: Topology,
    sharding_type: str | None = None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    pg: dist.ProcessGroup | None = None,
) -> ShardingPlan:
    """Plan ``model`` (any device, ``meta`` included) on ``topology`` with TorchRec's planner.

    Args:
        model: the module tree holding the EBCs (unsharded).
        topology: the hypothetical or real cluster.
        sharding_type: force one sharding type for every table (``None``: planner's choice).
        sharders: defaults to :func:`default_sharders`.
        pg: when given, rank 0 plans and the plan is broadcast (``collective_plan``).

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
    sharders = sharders if sharders is not None else default_sharders()
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=table_constraints(model, sharding_type, topology.world_size),
    )
    if pg is not None:
        return planner.collective_plan(model, sharders, pg)
    return planner.plan(model, sharders)


def shard_model(
    model: nn.Module,
    device: torch.device,
    sharding_type: str | None = None,
    pg: dist.ProcessGroup | None = None,
) -> DistributedModelParallel:
    """Wrap ``model`` in ``DistributedModelParallel`` with a plan from TorchRec's planner.

    Attach fused (in-backward) optimizers before calling this, so that the planner counts their
    state.  On CPU, DMP does not copy the source weights into the shards: use
    :func:`torchrec_compress.distributed.load_full_state_dict_` or a DCP checkpoint afterwards.
    """
    pg = pg if pg is not None else dist.group.WORLD
    assert pg is not None, "torch.distributed must be initialised before sharding"
    topology = Topology(
        world_size=dist.get_world_size(pg),
        compute_device=device.type,
        local_world_size=dist.get_world_size(pg) if device.type == "cpu" else None,
    )
    sharders = default_sharders()
    plan = plan_model(model, topology, sharding_type, sharders, pg)
    return DistributedModelParallel(
        module=model, device=device, plan=plan, sharders=sharders, init_data_parallel=True
    )
