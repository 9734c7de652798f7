"""``compress_`` of a ``DistributedModelParallel`` model: the sharded driver and its result.

:func:`compress_sharded_model` runs the method's sharded route (statistics, factors and codes
computed by the processes that hold the rows; no table is gathered on one process) and returns a
:class:`ShardedCompressionReport`.  Its one call, :meth:`ShardedCompressionReport.reshard`,
re-plans the compressed model at its true sizes, shards it with
:func:`~torchrec_compress.distributed.planning.default_sharders` and loads the compressed state
through a DCP checkpoint (DCP reshards it into the new plan), whatever the method.

The unsharded skeleton of the model (on ``meta``) is derived from the DMP model itself
(:func:`unsharded_skeleton`): sharded collections become empty unsharded ones of the same tables,
the dense modules are copied to ``meta``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner.types import ParameterConstraints

from torchrec_compress import checkpoint
from torchrec_compress.calibration import ForwardFn, default_forward
from torchrec_compress.config import CompressionConfig
from torchrec_compress.discovery import FilterFn, find_embedding_bag_collections
from torchrec_compress.distributed.planning import shard_model
from torchrec_compress.distributed.tables import COMPRESSION_LAYOUT_KEY, save_compressed_state
from torchrec_compress.guards import first_nonfinite_row, nonfinite_row_error
from torchrec_compress.layout import CompressionLayout, compression_layout, restore_layout_
from torchrec_compress.registry import method_of
from torchrec_compress.report import CompressionReport
from torchrec_compress.skeleton import unsharded_skeleton


@dataclass
class ShardedCompressionReport(CompressionReport):
    """What ``compress_`` did to a DMP model, and the compressed model it has not built yet.

    The original DMP model is left unchanged.  The compressed model exists as an unsharded
    skeleton on ``meta`` (:attr:`compressed_model`) and its state (factor tables and codes
    sharded like the original rows, dense parameters shared with the original model):
    :meth:`reshard` turns them into a sharded model, the one step every method needs next.
    Call it before the original model is trained further (the dense state is shared).

    Args:
        rows (list[ReportRow]): one per table / layer, as for a plain model.
        compressed_model (Optional[nn.Module]): the compressed architecture on ``meta``.
        state (dict[str, Any]): its state dict, keys equal to ``compressed_model``'s.

    Example::

        >>> # every process, 1 or more (see tests/distributed/test_compress_dmp.py):
        >>> # report = compress_(dmp, AFMConfig(rank=16), calibration=my_batches)
        >>> # compressed_dmp = report.reshard(torch.device("cpu"))
    """

    compressed_model: nn.Module | None = field(default=None, repr=False, compare=False)
    state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    config: CompressionConfig | None = field(default=None, repr=False, compare=False)

    def layout(self) -> CompressionLayout:
        """The :class:`~torchrec_compress.layout.CompressionLayout` of the compressed model
        (naming :attr:`config`; the configs of earlier compressions of the same model are not
        known here)."""
        if self.compressed_model is None:
            raise ValueError("this report has no compressed model")
        return compression_layout(self.compressed_model, [self.config] if self.config else [])

    def save(self, checkpoint_dir: str) -> None:
        """Writes the compressed state as a DCP checkpoint ``{"model": state}`` (collective),
        with its :meth:`layout` (JSON, key ``"compression_layout"``).

        Any later plan and world size can load it into ``compressed_model`` sharded, or into the
        uncompressed model with :func:`load_compressed`.

        Args:
            checkpoint_dir (str): a directory every process can read and write.
        """
        save_compressed_state(self.state, checkpoint_dir, self.layout().to_dict())

    def reshard(
        self,
        device: torch.device,
        sharding_type: str | None = None,
        prepare: Callable[[nn.Module], None] | None = None,
        checkpoint_dir: str | None = None,
        constraints: dict[str, ParameterConstraints] | None = None,
    ) -> DistributedModelParallel:
        """The compressed model, re-planned at its true sizes, sharded and loaded (collective).

        A copy of :attr:`compressed_model` is given to ``prepare`` (e.g. to attach in-backward
        optimizers, which the planner then counts), planned by TorchRec's planner with this
        package's sharders (``torchrec_compress.sharders()``) on the current process group,
        wrapped in ``DistributedModelParallel``, and loaded from a DCP checkpoint of
        :attr:`state` (DCP reshards the factor tables and codes into the new plan).  Callable
        more than once.

        Args:
            device (torch.device): where the sharded model lives.
            sharding_type (Optional[str]): force one sharding type for every table (``None``:
                the planner's choice).
            prepare (Optional[Callable[[nn.Module], None]]): called on the unsharded
                compressed model (on ``meta``) before planning.
            checkpoint_dir (Optional[str]): where the checkpoint is written and kept; default a
                temporary directory made by rank 0 and removed afterwards, which needs every
                process on one host (pass a shared directory otherwise).
            constraints (Optional[dict[str, ParameterConstraints]]): TorchRec's planner
                constraints per table name (instead of ``sharding_type``).

        Returns:
            DistributedModelParallel: the compressed model, ready to fine-tune or evaluate.

        Raises:
            ValueError: without ``checkpoint_dir`` when the processes span several hosts.
        """
        if self.compressed_model is None:
            raise ValueError("this report has no compressed model to reshard")
        if checkpoint_dir is None and get_local_size() != dist.get_world_size():
            raise ValueError(
                f"reshard: {dist.get_world_size()} processes over several hosts (local world "
                f"size {get_local_size()}) need a checkpoint_dir every host can read"
            )
        module = copy.deepcopy(self.compressed_model)
        if prepare is not None:
            prepare(module)
        sharded = shard_model(module, device, sharding_type=sharding_type, constraints=constraints)
        path = checkpoint_dir if checkpoint_dir is not None else _shared_tempdir()
        try:
            self.save(path)
            state = {"model": sharded.state_dict()}
            dcp.load(state, checkpoint_id=path)
            sharded.load_state_dict(state["model"])
        finally:
            if checkpoint_dir is None:
                dist.barrier()
                if dist.get_rank() == 0:
                    shutil.rmtree(path, ignore_errors=True)
        return sharded


_NO_BAD_ROW = 2**62


def _first_nonfinite_global_row(value: Any) -> int:
    """First non-finite row of this process's part of one table (global index), or
    ``_NO_BAD_ROW``: every local shard of a ``ShardedTensor``, or a whole replicated tensor."""
    if isinstance(value, ShardedTensor):
        rows = [
            shard.metadata.shard_offsets[0] + row
            for shard in value.local_shards()
            for row in [first_nonfinite_row(shard.tensor)]
            if row is not None
        ]
        return min(rows, default=_NO_BAD_ROW)
    row = first_nonfinite_row(value) if isinstance(value, torch.Tensor) else None
    return _NO_BAD_ROW if row is None else row


def check_finite_shards(
    model: DistributedModelParallel, skeleton: nn.Module, filter_fn: FilterFn | None = None
) -> None:
    """Collective: raises on every process, naming the table and its first non-finite row, when
    any row of a table that compression may read holds a NaN or an infinity.

    Each process tests the rows it holds (all of them, whether or not calibration looks them
    up); one all-reduce (min) of each table's first bad row makes every process raise the same
    error, so none is left waiting in a collective of the compression that follows.

    Args:
        model (DistributedModelParallel): the sharded model about to be compressed.
        skeleton (nn.Module): its unsharded architecture (:func:`unsharded_skeleton`).
        filter_fn (Optional[Callable[[nn.Module, str], bool]]): as for ``compress_``.

    Raises:
        ValueError: naming the table and the first row holding a NaN or an infinity.

    Example::

        >>> # 2 processes: see tests/test_guards.py
        >>> # check_finite_shards(dmp, unsharded_skeleton(dmp))
    """
    state = model.state_dict()
    names: list[str] = []
    first_bad: list[int] = []
    collections = find_embedding_bag_collections(skeleton, filter_fn, lowrank_factors=True)
    for fqn, ebc in collections.items():
        for table in ebc.embedding_bag_configs():
            key = f"{fqn}.embedding_bags.{table.name}.weight".lstrip(".")
            names.append(table.name)
            first_bad.append(_first_nonfinite_global_row(state.get(key)))
    if not names:
        return
    rows = torch.tensor(first_bad, dtype=torch.int64)
    dist.all_reduce(rows, op=dist.ReduceOp.MIN)
    for name, row in zip(names, rows.tolist(), strict=True):
        if row < _NO_BAD_ROW:
            raise nonfinite_row_error(name, row)


def _shared_tempdir() -> str:
    """A temporary directory made by rank 0, its path broadcast to the group (one host)."""
    holder: list[Any] = [
        tempfile.mkdtemp(prefix="torchrec_compress_") if dist.get_rank() == 0 else None
    ]
    dist.broadcast_object_list(holder, src=0)
    return str(holder[0])


def compress_sharded_model(
    model: DistributedModelParallel,
    config: CompressionConfig,
    calibration: Iterable[Any] | None = None,
    filter_fn: FilterFn | None = None,
    forward_fn: ForwardFn = default_forward,
    meta_model: nn.Module | None = None,
) -> ShardedCompressionReport:
    """The sharded driver behind ``compress_(dmp_model, config, ...)`` (collective).

    Every process calls it with its own calibration batches; statistics are summed over the
    group, factors and codes computed by the processes holding the rows.  The report rows are
    identical on every process.

    Args:
        model (DistributedModelParallel): the trained, sharded model (left unchanged).
        config (CompressionConfig): ``AFMConfig``, ``SVDConfig``, ``MECConfig``, ``PQConfig`` or
            ``RowWiseQuantConfig``.
        calibration (Optional[Iterable]): this process's batches (AFM; MEC/PQ with popularity
            weighting).
        filter_fn (Optional[Callable[[nn.Module, str], bool]]): applied to the unsharded
            skeleton's modules and their fqns (the same fqns as in ``model.module``).
        forward_fn (Callable[[nn.Module, Any], Any]): how to run ``model`` on one batch.
        meta_model (Optional[nn.Module]): the unsharded architecture on ``meta``, only where
            :func:`unsharded_skeleton` cannot derive it; swapped in place.

    Returns:
        ShardedCompressionReport: the report; its :meth:`~ShardedCompressionReport.reshard`
        builds the compressed sharded model.

    Raises:
        TypeError: for a config type without a sharded route.

    Example::

        >>> # 2 processes: see tests/distributed/test_compress_dmp.py
        >>> # report = compress_sharded_model(dmp, MECConfig(num_subspaces=4), batches)
    """
    method = method_of(config)
    skeleton = meta_model if meta_model is not None else unsharded_skeleton(model)
    if config.compresses_tables:
        check_finite_shards(model, skeleton, filter_fn)
    result = method.compress_sharded(model, skeleton, config, calibration, forward_fn, filter_fn)
    return ShardedCompressionReport(result.report.rows, result.module, result.state, config)


def save_compressed(
    model: DistributedModelParallel,
    checkpoint_dir: str,
    configs: Iterable[CompressionConfig] = (),
) -> CompressionLayout:
    """DCP checkpoint of a (compressed) DMP model with its layout (collective).

    Writes ``{"model": model.state_dict(), "compression_layout": layout JSON}``: what
    :func:`load_compressed` reads to rebuild the compressed modules in an uncompressed model,
    under any plan and world size.

    Args:
        model (DistributedModelParallel): the model to save.
        checkpoint_dir (str): a directory every process can write.
        configs (Iterable[CompressionConfig]): the configs applied to the model, in order
            (recorded in the layout; optional).

    Returns:
        CompressionLayout: the layout written.

    Example::

        >>> # every process: save_compressed(dmp, "ckpt", [AFMConfig(rank=16)])
        >>> # later, any world size: load_compressed(build_model(meta), "ckpt", device)
    """
    layout = compression_layout(model, configs)
    save_compressed_state(model.state_dict(), checkpoint_dir, layout.to_dict())
    return layout


def read_compression_layout(checkpoint_dir: str) -> CompressionLayout | None:
    """The layout stored in a DCP checkpoint by :func:`save_compressed` or
    :meth:`ShardedCompressionReport.save`; ``None`` when it holds none (read locally, not a
    collective call).

    Args:
        checkpoint_dir (str): the checkpoint directory.

    Raises:
        FileNotFoundError: naming ``checkpoint_dir`` when it does not exist.
        CheckpointError: a file of the checkpoint does not match its manifest, or it has
            none (checked before anything of it is read).

    Example::

        >>> read_compression_layout("no/such/checkpoint")
        Traceback (most recent call last):
        ...
        FileNotFoundError: checkpoint directory 'no/such/checkpoint' does not exist
    """
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist")
    # nothing of the checkpoint (DCP's .metadata is a pickle) is read before its manifest verifies
    checkpoint.verify_local(checkpoint_dir)
    return _stored_layout(checkpoint_dir)


def _stored_layout(checkpoint_dir: str) -> CompressionLayout | None:
    metadata = dcp.FileSystemReader(checkpoint_dir).read_metadata()
    if COMPRESSION_LAYOUT_KEY not in metadata.state_dict_metadata:
        return None
    holder: dict[str, Any] = {COMPRESSION_LAYOUT_KEY: ""}
    dcp.load(holder, checkpoint_id=checkpoint_dir, no_dist=True)
    return CompressionLayout.from_dict(json.loads(holder[COMPRESSION_LAYOUT_KEY]))


def load_compressed(
    model: nn.Module,
    checkpoint_dir: str,
    device: torch.device,
    layout: CompressionLayout | None = None,
    sharding_type: str | None = None,
    prepare: Callable[[nn.Module], None] | None = None,
    constraints: dict[str, ParameterConstraints] | None = None,
) -> DistributedModelParallel:
    """A compressed checkpoint, loaded into the uncompressed ``model`` and sharded (collective).

    ``model`` is built as before compression (on ``meta``: nothing is allocated).  The layout
    (``layout``, or the one stored in the checkpoint) swaps in empty compressed modules
    (:func:`~torchrec_compress.layout.restore_layout_`), ``prepare`` runs (e.g. to attach
    in-backward optimizers, which the planner then counts), TorchRec's planner plans it on the
    current process group with ``torchrec_compress.sharders(model)``, and DCP loads the
    checkpoint into the shards, whatever plan and world size wrote it.  An empty layout loads
    an uncompressed checkpoint.

    Args:
        model (nn.Module): the uncompressed model (swapped in place), e.g. on ``meta``.
        checkpoint_dir (str): written by :func:`save_compressed`, ``report.save`` /
            ``report.reshard(checkpoint_dir=...)``, or any DCP save of ``{"model": state}``
            (then ``layout`` must be given).
        device (torch.device): where the sharded model lives.
        layout (Optional[CompressionLayout]): default: the checkpoint's.
        sharding_type (Optional[str]): force one sharding type for every table.
        prepare (Optional[Callable[[nn.Module], None]]): called on the compressed, unsharded
            model before planning.
        constraints (Optional[dict[str, ParameterConstraints]]): TorchRec's planner
            constraints per table name (instead of ``sharding_type``).

    Returns:
        DistributedModelParallel: the compressed model, ready to evaluate, fine-tune or
        compress further.

    Raises:
        ValueError: the checkpoint holds no layout and none was given.

    Example::

        >>> # any number of processes, any plan (see tests/distributed/test_load_compressed.py):
        >>> # dmp = load_compressed(build_model(torch.device("meta")), "ckpt", torch.device("cpu"))
    """
    if layout is None or os.path.isfile(os.path.join(checkpoint_dir, checkpoint.MANIFEST)):
        # collective: rank 0 checks every file against the manifest before anything is read
        checkpoint.verify(checkpoint_dir)
    if layout is None:
        layout = _stored_layout(checkpoint_dir)
        if layout is None:
            raise ValueError(
                f"checkpoint {checkpoint_dir!r} holds no compression layout (it was not written "
                "by save_compressed or ShardedCompressionReport.save); pass layout="
            )
    restore_layout_(model, layout, quantized_device=device)
    if prepare is not None:
        prepare(model)
    sharded = shard_model(model, device, sharding_type=sharding_type, constraints=constraints)
    state = {"model": sharded.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint_dir)
    sharded.load_state_dict(state["model"])
    return sharded
