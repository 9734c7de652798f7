"""Row-wise int8 / int4 / int2 (and trainable fp16) embedding tables, and AFM factor tables.

``compress_(model, RowWiseQuantConfig(bits=8))`` stores every selected table as TorchRec's
quantized ``EmbeddingBagCollection`` (``torchrec.quant.embedding_modules``): each row becomes
``d`` integers of ``bits`` bits plus an fp16 scale and bias, looked up and pooled by fbgemm's
``IntNBitTableBatchedEmbeddingBagsCodegen``.  That module is TorchRec's own serving module, so
the compressed model *is* the served model: its outputs equal those of
``torchrec.inference.modules.quantize_embeddings`` on the float model.

After ``compress_`` with :class:`~torchrec_compress.config.AFMConfig`, the k-dim factor tables of
a ``LowRankEmbeddingBagCollection`` are quantized instead (AFM x int8: ``4 d / k`` times fewer
bytes than float factors); the projections and means stay float and trainable.

Training.  The quantized rows are frozen: measured with fbgemm-gpu-cpu 1.8.0 and torchrec 1.8.0,

* fbgemm's CPU training TBE (``SplitTableBatchedEmbeddingBagsCodegen``) has no ``uint8``
  backward (``"split_embedding_backward_exact_cpu_kernel_3" not implemented for 'Byte'``,
  exact SGD and row-wise Adagrad alike); FP16 rows do train on CPU;
* a DMP-sharded ``EmbeddingBagCollection`` whose tables say ``data_type=DataType.INT8`` fails
  before any kernel runs, on any device: torchrec's fused optimizer builds a ``ShardedTensor``
  from the ``d + 8`` wide int8 rows against ``d`` wide metadata ("Shard tensor size does not
  match with metadata.shard_lengths").

So, like product-quantized codes, the quantized rows are fixed and everything around them (the
AFM projections and means, the dense layers) fine-tunes.  Where rows must keep training,
``bits=16`` stores them as fp16 in an ordinary TorchRec ``EmbeddingBagCollection`` whose table
configs say ``DataType.FP16``: unsharded it trains through ``nn.EmbeddingBag``, and DMP's fused
TBE stores and updates fp16 rows on CPU (``rows x 2 d`` bytes; AFM k=16 x fp16: 32 per row).
A later ``compress_`` with ``bits=8`` turns those rows into int8 for serving.

Planning.  The quantized collection is stored with its scale and bias split from the rows
(``quant_state_dict_split_scale_bias``), so TorchRec's planner, through TorchRec's
``QuantEmbeddingBagCollectionSharder`` (in :func:`~torchrec_compress.distributed.planning.default_sharders`),
sizes a table at exactly ``rows x (d * bits / 8 + 4)`` bytes: an int8 factor table of
``k = 16`` is planned at 20 bytes per row (float factors: 64, a float 128-dim row: 512).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import rounded_row_size_in_bytes
from torch import nn
from torchrec.modules.embedding_configs import (
    DATA_TYPE_NUM_BITS,
    DataType,
    EmbeddingBagConfig,
    data_type_to_dtype,
    data_type_to_sparse_type,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import DEFAULT_ROW_ALIGNMENT, quantize_state_dict
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from torchrec_compress.guards import check_fixed_batch, is_tracing
from torchrec_compress.methods.rowwise_quant.config import RowWiseQuantConfig
from torchrec_compress.report import ReportRow

BITS_TO_DATA_TYPE: dict[int, DataType] = {
    16: DataType.FP16,
    8: DataType.INT8,
    4: DataType.INT4,
    2: DataType.INT2,
}
# trainable (fbgemm's CPU training TBE updates them); the integer types are served frozen
TRAINABLE_DATA_TYPES = (DataType.FP32, DataType.FP16)


def row_alignment(device: torch.device) -> int:
    """Row alignment in bytes of fbgemm's n-bit tables: 1 on CPU (fbgemm's CPU default), else
    TorchRec's 16 (GPU kernels read 16-byte aligned rows).

    Example::

        >>> row_alignment(torch.device("cpu")), row_alignment(torch.device("meta"))
        (1, 16)
    """
    return 1 if device.type == "cpu" else DEFAULT_ROW_ALIGNMENT


def quantized_row_bytes(embedding_dim: int, data_type: DataType, device: torch.device) -> int:
    """Bytes of one stored row of ``data_type`` in fbgemm's n-bit table on ``device``
    (``ceil(d * bits / 8)`` plus a 4-byte fp16 scale and bias for integer types, padded to
    :func:`row_alignment`).

    Args:
        embedding_dim (int): ``d``.
        data_type (DataType): ``DataType.INT8`` / ``INT4`` / ``INT2`` / ``FP16`` / ``FP32``.
        device (torch.device): where the table lives (decides the row alignment).

    Example::

        >>> quantized_row_bytes(16, DataType.INT8, torch.device("cpu"))
        20
        >>> quantized_row_bytes(128, DataType.INT4, torch.device("cpu"))
        68
    """
    sparse_type = data_type_to_sparse_type(data_type)
    return rounded_row_size_in_bytes(embedding_dim, sparse_type, row_alignment(device))


def check_quantizable(table_name: str, embedding_dim: int, bits: int) -> None:
    """Raises ``ValueError`` naming the table when fbgemm cannot pack its rows in ``bits``.

    fbgemm's n-bit row quantizer needs an even number of data bytes per row, i.e.
    ``d * bits / 8`` even.

    Example::

        >>> check_quantizable("t", 12, 4)
        >>> check_quantizable("t", 12, 2)
        Traceback (most recent call last):
        ...
        ValueError: table 't': embedding_dim 12 cannot be stored in 2 bits by fbgemm (d * 2 / 8 must be an even number of bytes: d a multiple of 8); use more bits or RowWiseQuantOverride(skip=True)
    """
    multiple = 16 // bits
    if bits < 16 and embedding_dim % multiple != 0:
        raise ValueError(
            f"table {table_name!r}: embedding_dim {embedding_dim} cannot be stored in {bits} "
            f"bits by fbgemm (d * {bits} / 8 must be an even number of bytes: d a multiple of "
            f"{multiple}); use more bits or RowWiseQuantOverride(skip=True)"
        )


@torch.no_grad()
def quantize_collection(
    ebc: EmbeddingBagCollection, data_types: Mapping[str, DataType]
) -> QuantEmbeddingBagCollection:
    """TorchRec's quantized ``EmbeddingBagCollection`` holding ``ebc``'s tables.

    Rows are quantized by TorchRec's own ``quantize_state_dict`` (fbgemm's
    ``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``), exactly as
    ``torchrec.inference.modules.quantize_embeddings`` does; scale and bias are exposed as
    separate state-dict entries (``weight_qscale``, ``weight_qbias``) so that the planner sees
    the rows' true size; they are copies, so ``torch.save(model.state_dict())`` works and
    ``load_state_dict`` restores them.  Unlike TorchRec's, it refuses variable-batch (VBE) inputs,
    which fbgemm's n-bit kernel pools to the wrong number of rows.  On ``meta`` the result is an
    empty skeleton, e.g. for planning.

    Args:
        ebc (EmbeddingBagCollection): the float collection (left unchanged).
        data_types (Mapping[str, DataType]): table name -> stored type, for every table.

    Returns:
        QuantEmbeddingBagCollection: same tables, features and pooling; float32 outputs.

    Example::

        >>> from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
        >>> ebc = EmbeddingBagCollection([cfg])
        >>> qebc = quantize_collection(ebc, {"t": DataType.INT8})
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1]))
        >>> bool((qebc(kjt).values() - ebc(kjt).values()).abs().max() < 0.05)
        True
    """
    configs = copy.deepcopy(ebc.embedding_bag_configs())
    missing = sorted({c.name for c in configs} - set(data_types))
    if missing:
        raise ValueError(f"data_types lacks table(s) {missing}")
    for config in configs:
        config.data_type = data_types[config.name]
    source = ebc
    rows = {c.name: ebc.embedding_bags[c.name].weight for c in configs}
    if any(w.dtype not in (torch.float32, torch.float16) for w in rows.values()):
        # fbgemm's row quantizer reads float32 / fp16 rows: a bf16 collection's go as float32
        source = EmbeddingBagCollection(
            ebc.embedding_bag_configs(), ebc.is_weighted(), torch.device("meta")
        )
        for name, weight in rows.items():
            source.embedding_bags[name].weight = nn.Parameter(weight.float(), requires_grad=False)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    device = quantize_state_dict(source, weights, {c.name: c.data_type for c in configs})
    quantized = QuantEmbeddingBagCollection(
        configs,
        ebc.is_weighted(),
        device,
        table_name_to_quantized_weights=weights,
        quant_state_dict_split_scale_bias=True,
        row_alignment=row_alignment(device),
    )
    # fbgemm's default bounds check (WARNING) replaces an id outside its table by 0 and goes
    # on; FATAL raises (naming fbgemm's table index, the bag and the id)
    for tbe in quantized._emb_modules:
        tbe.bounds_check_mode_int = BoundsCheckMode.FATAL.value
    quantized.register_forward_pre_hook(_refuse_variable_batch, with_kwargs=True)
    quantized.register_state_dict_post_hook(_scale_and_bias_apart)
    return quantized


def _refuse_variable_batch(
    module: QuantEmbeddingBagCollection, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """TorchRec's quantized collection pools a variable-batch (VBE) input to the wrong number of
    rows, silently (3 for a batch of 4): refuse it, as the low-rank and PQ collections do."""
    if not is_tracing():
        features = args[0] if args else kwargs["features"]
        tables = [t.name for t in module.embedding_bag_configs()]
        check_fixed_batch(features, f"row-wise quantized EmbeddingBagCollection {tables}")


def _scale_and_bias_apart(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: object
) -> None:
    """Each table's ``weight_qscale`` / ``weight_qbias`` entries become copies.

    In the module they are fp16 views of fbgemm's fused uint8 rows, and ``torch.save`` refuses
    one storage viewed as two types ("Cannot save multiple tensors ... as different types").
    The ``weight`` entries stay views; ``load_state_dict`` copies all three back in (after a
    ``torch.distributed.checkpoint`` load into a state dict, call it, as DCP's docs say).
    """
    for key, value in state_dict.items():
        if key.startswith(prefix) and key.endswith(("weight_qscale", "weight_qbias")):
            state_dict[key] = value.clone()


def table_rows(
    ebc: EmbeddingBagCollection, config: RowWiseQuantConfig, device: torch.device | None = None
) -> tuple[dict[str, DataType], list[ReportRow]]:
    """Stored type and report row of every table of ``ebc`` (quantized row sizes for ``device``,
    default where ``ebc``'s weights are).

    Raises:
        ValueError: naming a table whose dimension ``bits`` cannot pack (:func:`check_quantizable`).
    """
    data_types: dict[str, DataType] = {}
    rows: list[ReportRow] = []
    for t in ebc.embedding_bag_configs():
        weight = ebc.embedding_bags[t.name].weight
        before = weight.numel() * weight.element_size()
        shape = (t.num_embeddings, t.embedding_dim)
        bits = config.bits_for(t.name)
        after = before
        if bits is not None:
            data_type = BITS_TO_DATA_TYPE[bits]
            if data_type in TRAINABLE_DATA_TYPES:  # an nn.EmbeddingBag / training TBE row
                after = t.num_embeddings * t.embedding_dim * DATA_TYPE_NUM_BITS[data_type] // 8
            else:
                after = t.num_embeddings * quantized_row_bytes(
                    t.embedding_dim, data_type, device if device is not None else weight.device
                )
        if bits is None or after >= before:
            data_types[t.name] = t.data_type
            rows.append(ReportRow(t.name, "table", shape, "kept", None, before, before, None))
            continue
        check_quantizable(t.name, t.embedding_dim, bits)
        data_types[t.name] = data_type
        method = data_type.value  # "INT8", "FP16", ...
        rows.append(ReportRow(t.name, "table", shape, method, None, before, after, None))
    return data_types, rows


@torch.no_grad()
def fp16_collection(
    ebc: EmbeddingBagCollection, data_types: Mapping[str, DataType]
) -> EmbeddingBagCollection:
    """A trainable TorchRec ``EmbeddingBagCollection`` with ``ebc``'s tables and rows, stored as
    ``data_types`` says (``DataType.FP16`` or ``DataType.FP32`` per table).

    Its outputs are float32 (TorchRec's collection casts pooled fp16); DMP's fused TBE stores and
    trains the fp16 rows (``weights_precision`` from the table's ``data_type``).

    Args:
        ebc (EmbeddingBagCollection): the collection to copy (left unchanged).
        data_types (Mapping[str, DataType]): table name -> ``FP16`` or ``FP32``, every table.

    Returns:
        EmbeddingBagCollection: same tables, features and pooling.

    Example::

        >>> from torchrec import EmbeddingBagConfig
        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
        >>> half = fp16_collection(EmbeddingBagCollection([cfg]), {"t": DataType.FP16})
        >>> half.embedding_bags["t"].weight.dtype, half.embedding_bag_configs()[0].data_type
        (torch.float16, <DataType.FP16: 'FP16'>)
    """
    configs = copy.deepcopy(ebc.embedding_bag_configs())
    for config in configs:
        if data_types[config.name] not in TRAINABLE_DATA_TYPES:
            raise ValueError(
                f"table {config.name!r}: {data_types[config.name]} rows cannot be trained; "
                f"valid: {[t.value for t in TRAINABLE_DATA_TYPES]}"
            )
        config.data_type = data_types[config.name]
    new = EmbeddingBagCollection(configs, ebc.is_weighted(), ebc.device)
    for config in configs:
        new.embedding_bags[config.name].weight.copy_(ebc.embedding_bags[config.name].weight)
        if ebc.is_weighted() and config.data_type == DataType.FP16:
            new.embedding_bags[config.name].__class__ = HalfRowsEmbeddingBag
    return new


class HalfRowsEmbeddingBag(nn.EmbeddingBag):
    """An ``nn.EmbeddingBag`` of fp16 rows that takes float32 per-sample weights.

    ``nn.EmbeddingBag`` wants per-sample weights of its rows' dtype (torch 2.13: "Expected tensor
    for argument #1 'weight' to have the same type"), which a weighted TorchRec collection of
    fp16 rows never passes; here the looked-up rows are weighted and summed in float32 (nothing
    rounded to fp16 but the rows themselves).  Same parameter, same state dict; without weights
    (or with ``padding_idx`` / ``max_norm``, which TorchRec's collections never set) it is the
    plain bag.

    Example::

        >>> bag = HalfRowsEmbeddingBag(10, 4, mode="sum", include_last_offset=True, dtype=torch.float16)
        >>> out = bag(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3]), torch.tensor([0.5, 1.0, 2.0]))
        >>> out.dtype, tuple(out.shape)
        (torch.float32, (2, 4))
    """

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (
            per_sample_weights is None
            or offsets is None
            or self.mode != "sum"
            or self.padding_idx is not None  # TorchRec never sets these two
            or self.max_norm is not None
        ):
            return super().forward(input, offsets, per_sample_weights)
        bounds = (
            offsets
            if self.include_last_offset
            else torch.cat([offsets, offsets.new_tensor([input.numel()])])
        )
        bags = bounds.numel() - 1
        lengths = (bounds[1:] - bounds[:-1]).long()
        bag_of = torch.repeat_interleave(torch.arange(bags, device=input.device), lengths)
        rows = torch.nn.functional.embedding(input, self.weight).float()
        rows = rows * per_sample_weights.float().unsqueeze(1)
        out = torch.zeros(bags, self.embedding_dim, device=rows.device, dtype=torch.float32)
        return out.index_add_(0, bag_of, rows)


def empty_rowwise_collection(
    tables: list[EmbeddingBagConfig],
    is_weighted: bool,
    data_types: Mapping[str, DataType],
    device: torch.device,
    quantized_device: torch.device | None = None,
) -> nn.Module:
    """The empty collection that stores ``tables`` as ``data_types`` (weights come from a
    checkpoint): a trainable fp16 ``EmbeddingBagCollection`` on ``device`` when every type is
    FP16/FP32, else TorchRec's quantized collection built on ``quantized_device`` (default
    ``device``; fbgemm's n-bit kernel keeps the device it was built on, so it cannot be moved
    off ``meta`` later: pass the device it will run on).

    Args:
        tables (list[EmbeddingBagConfig]): the float table configs.
        is_weighted (bool): whether features carry per-id weights.
        data_types (Mapping[str, DataType]): table name -> stored type, every table.
        device (torch.device): where an fp16 collection lives (e.g. ``meta``).
        quantized_device (Optional[torch.device]): where a quantized collection is built.

    Example::

        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
        >>> empty = empty_rowwise_collection([cfg], False, {"t": DataType.INT8}, torch.device("cpu"))
        >>> empty.state_dict()["embedding_bags.t.weight"].dtype
        torch.uint8
    """
    source = EmbeddingBagCollection(tables, is_weighted, device)
    if all(t in TRAINABLE_DATA_TYPES for t in data_types.values()):
        return fp16_collection(source, data_types)
    if quantized_device is not None and quantized_device != device:
        source = EmbeddingBagCollection(tables, is_weighted, quantized_device)
    return quantize_collection(source, data_types)


@torch.no_grad()
def stored_rows(
    table: EmbeddingBagConfig, rows: torch.Tensor, data_type: DataType, quantized: bool
) -> dict[str, torch.Tensor]:
    """What a block of ``rows`` of ``table`` becomes when stored as ``data_type``: the table's
    state entries by suffix (``"weight"``; ``"weight_qscale"`` and ``"weight_qbias"`` for integer
    types), exactly as :func:`quantize_collection` (``quantized``) or :func:`fp16_collection`
    stores them.  Rows are quantized independently, so the blocks of a row-sharded table give the
    rows of the whole table's entries.

    Args:
        table (EmbeddingBagConfig): the table the rows belong to.
        rows (torch.Tensor): ``[n, embedding_dim]`` float rows (any ``n``).
        data_type (DataType): their stored type.
        quantized (bool): whether the collection is TorchRec's quantized one (its fp16/fp32
            tables are stored as bytes too) or a trainable fp16 collection.

    Example::

        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
        >>> {k: tuple(v.shape) for k, v in stored_rows(cfg, torch.randn(3, 8), DataType.INT8, True).items()}
        {'weight': (3, 8), 'weight_qscale': (3, 1), 'weight_qbias': (3, 1)}
    """
    if not quantized:
        return {"weight": rows.to(data_type_to_dtype(data_type))}
    block = copy.deepcopy(table)
    block.num_embeddings = rows.shape[0]
    source = EmbeddingBagCollection([block], device=torch.device("meta"))
    source.embedding_bags[block.name].weight = nn.Parameter(rows, requires_grad=False)
    prefix = f"embedding_bags.{block.name}."
    module = quantize_collection(source, {block.name: data_type})
    entries = module.state_dict().items()
    return {k[len(prefix) :]: v.contiguous() for k, v in entries if k.startswith(prefix)}


@dataclass(frozen=True)
class RowWiseQuantHandler:
    """Row-wise quantization of embedding tables: each table's stored type and report row, and
    the stored entries of any block of its rows (rows are quantized independently).

    Registered for :class:`RowWiseQuantConfig` (``registry.handler_for``); the local driver
    quantizes whole collections with it, the sharded one each process's blocks of rows.

    Args:
        config (RowWiseQuantConfig): the method's config.

    Example::

        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
        >>> handler = RowWiseQuantHandler(RowWiseQuantConfig(bits=8))
        >>> data_types, rows = handler.plan(EmbeddingBagCollection([cfg]))
        >>> data_types["t"], rows[0].bytes_after
        (<DataType.INT8: 'INT8'>, 120)
    """

    config: RowWiseQuantConfig

    def plan(
        self, ebc: EmbeddingBagCollection, device: torch.device | None = None
    ) -> tuple[dict[str, DataType], list[ReportRow]]:
        """Stored type and report row of every table of ``ebc`` (see :func:`table_rows`)."""
        return table_rows(ebc, self.config, device)

    @staticmethod
    def encode(
        table: EmbeddingBagConfig, rows: torch.Tensor, data_type: DataType, quantized: bool
    ) -> dict[str, torch.Tensor]:
        """The stored entries of a block of ``table``'s rows (see :func:`stored_rows`)."""
        return stored_rows(table, rows, data_type, quantized)
