"""Lookup kernels and their memory: large tables in 2 MiB pages, a parallel int8 row lookup.

A pooled lookup reads a random row per id.  With 4 KiB pages a multi-GiB table also misses the
TLB on nearly every id; on this project's machines that was a quarter to a third of the lookup
time of the float, low-rank and int8 tables (issue 17).  :func:`use_huge_pages_` moves a module's
large tensors (tables, factor tables, PQ codes, fbgemm's quantized rows) into transparent huge
pages *in place*: addresses, views and values stay as they were, nothing is copied into a new
tensor, so it can run on a built, loaded or sharded module at any time before serving.

It needs Linux with transparent huge pages set to ``always`` or ``madvise``
(``/sys/kernel/mm/transparent_hugepage/enabled``) and the C++ extension; anywhere else it changes
nothing and says why in the log (logger ``torchrec_compress.kernels``).

fbgemm's CPU lookup of int8 rows (TorchRec's quantized ``EmbeddingBagCollection``) runs on one
thread whatever ``torch.get_num_threads()`` says.  :func:`int8_pooled_lookup` pools the same rows
(fbgemm's own buffer, read in place) over threads, with the same values; :func:`use_int8_kernel_`
makes a quantized collection's TBEs use it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
)
from torch import Tensor, nn

from torchrec_compress.extension import HAS_KERNELS

logger = logging.getLogger(__name__)


THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Below this a tensor fits the reach of the TLB's 4 KiB entries (and may share its 2 MiB pages).
DEFAULT_MIN_BYTES = 8 << 20


def huge_pages_unavailable() -> str | None:
    """Why tensors cannot be put in transparent huge pages here, or ``None`` when they can.

    Example::

        >>> reason = huge_pages_unavailable()
        >>> reason is None or isinstance(reason, str)
        True
    """
    if not sys.platform.startswith("linux"):
        return f"transparent huge pages are a Linux feature (platform {sys.platform})"
    if not HAS_KERNELS:
        return "torchrec_compress._C was not built"
    try:
        setting = THP_SETTING.read_text()
    except OSError as error:
        return f"cannot read {THP_SETTING}: {error}"
    if "[never]" in setting:
        return f"{THP_SETTING} says never: {setting.strip()}"
    return None


def advise_huge_pages(tensor: torch.Tensor) -> int:
    """Puts ``tensor``'s storage in 2 MiB pages, in place; returns the bytes now in them.

    Only the 2 MiB-aligned part of the storage can move (all but at most 4 MiB of it); its
    values and address do not change.  Where the OS refuses (no huge pages set up, or no free
    2 MiB page for part of it) that part keeps 4 KiB pages, and the log says why.

    Args:
        tensor (torch.Tensor): a dense CPU tensor (any view of the storage will do).

    Returns:
        int: bytes of the storage backed by huge pages after the call.

    Example::

        >>> table = torch.arange(2 << 20, dtype=torch.float32)
        >>> advised = advise_huge_pages(table)
        >>> bool(table[-1] == (2 << 20) - 1), 0 <= advised <= table.numel() * 4
        (True, True)
    """
    reason = huge_pages_unavailable()
    if reason is not None:
        logger.info("huge pages not used: %s", reason)
        return 0
    if tensor.device.type != "cpu" or tensor.layout != torch.strided:
        return 0
    advised, reason = torch.ops.torchrec_compress.advise_huge_pages(tensor)
    if reason:
        logger.warning(
            "%d of the %d bytes of a %s tensor are in 2 MiB pages, the rest keeps 4 KiB pages: %s",
            advised,
            tensor.untyped_storage().nbytes(),
            tuple(tensor.shape),
            reason,
        )
    return int(advised)


def _all_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``module.named_modules()`` plus the TBEs TorchRec's quantized collections keep in a plain
    ``_emb_modules`` list (registered as submodules only with ``register_tbes``)."""
    found: dict[int, tuple[str, nn.Module]] = {}
    for prefix, sub in module.named_modules():
        found.setdefault(id(sub), (prefix, sub))
        for i, tbe in enumerate(getattr(sub, "_emb_modules", [])):
            if isinstance(tbe, nn.Module):
                found.setdefault(id(tbe), (f"{prefix}._emb_modules.{i}".lstrip("."), tbe))
    return list(found.values())


def _held_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every tensor ``module`` holds: parameters, buffers, and plain tensor attributes (fbgemm's
    inference TBE keeps its quantized rows in ``weights_host``, not in a buffer)."""
    held: list[tuple[str, torch.Tensor]] = []
    for prefix, sub in _all_modules(module):
        own = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        own += [(k, v) for k, v in vars(sub).items() if isinstance(v, torch.Tensor)]
        held += [(f"{prefix}.{name}" if prefix else name, t) for name, t in own]
    return held


def use_huge_pages_(module: nn.Module, min_bytes: int = DEFAULT_MIN_BYTES) -> dict[str, int]:
    """Backs every CPU tensor of ``module`` of at least ``min_bytes`` with 2 MiB pages, in place.

    Meant for large lookup tables before serving: float tables, low-rank factor tables, PQ codes
    and fbgemm's int8 / int4 rows.  Values, addresses and views are unchanged; a storage shared
    by several tensors is advised once.  Where the OS does not allow it nothing changes and the
    reason is logged.

    Args:
        module (nn.Module): any module (e.g. a collection or a whole model).
        min_bytes (int): smallest storage to move.

    Returns:
        dict[str, int]: name of each tensor moved -> bytes now in huge pages.

    Example::

        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=64, num_embeddings=200_000, feature_names=["f"])
        >>> ebc = EmbeddingBagCollection([cfg])
        >>> moved = use_huge_pages_(ebc)
        >>> set(moved) <= {"embedding_bags.t.weight"}
        True
    """
    reason = huge_pages_unavailable()
    if reason is not None:
        logger.info("huge pages not used: %s", reason)
        return {}
    moved: dict[str, int] = {}
    seen: set[int] = set()
    for name, tensor in _held_tensors(module):
        if tensor.device.type != "cpu" or tensor.layout != torch.strided:
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() < min_bytes or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        advised = advise_huge_pages(tensor)
        if advised:
            moved[name] = advised
    logger.info("huge pages: %d tensors, %d MiB", len(moved), sum(moved.values()) >> 20)
    return moved


def int8_pooled_lookup(
    rows: Tensor,
    dim: int,
    ids: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None = None,
    mean: bool = False,
) -> Tensor:
    """Pooled lookup of fbgemm's fused int8 rows, bags split over ``torch.get_num_threads()``.

    Row ``i`` of ``rows`` is an fp16 scale, an fp16 bias and ``dim`` uint8 values (then padding):
    the layout of ``IntNBitTableBatchedEmbeddingBagsCodegen``'s INT8 tables, as
    ``split_embedding_weights(split_scale_shifts=False)`` returns them.  Bag ``b`` pools
    ``scale * q + bias`` of its ids, times their weights, divided by its length for ``mean``
    (empty bags give zeros); an id outside ``[0, N)`` raises, naming it.

    Args:
        rows (Tensor): ``[N, >= dim + 4]`` uint8, unit inner stride.
        dim (int): values per row.
        ids (Tensor): ``[n]`` int32 / int64 row ids of all bags, concatenated.
        offsets (Tensor): ``[B + 1]`` bag boundaries in ``ids``.
        per_sample_weights (Optional[Tensor]): ``[n]`` float32 weight of each id.
        mean (bool): divide each bag by its length.

    Returns:
        Tensor: ``[B, dim]`` float32.

    Example::

        >>> scale_bias = torch.tensor([0.5, 1.0], dtype=torch.float16).view(torch.uint8)
        >>> rows = torch.cat([scale_bias.repeat(3, 1), torch.arange(6, dtype=torch.uint8).view(3, 2)], 1)
        >>> int8_pooled_lookup(rows, 2, torch.tensor([0, 2, 1]), torch.tensor([0, 2, 3]))
        tensor([[4.0000, 5.0000],
                [2.0000, 2.5000]])
    """
    return torch.ops.torchrec_compress.int8_pooled_lookup(
        rows, dim, ids, offsets, per_sample_weights, mean
    )


def _int8_kernel_applies(tbe: Any) -> str | None:
    """Why the int8 kernel cannot stand in for this fbgemm inference TBE, or ``None``."""
    if not HAS_KERNELS:
        return "torchrec_compress._C was not built"
    if not getattr(tbe, "use_cpu", False) or getattr(tbe, "host_size", 0) <= 0:
        return "its rows are not in CPU memory"
    if any(spec[3] != SparseType.INT8 for spec in tbe.embedding_specs):
        return f"not every table is INT8 ({[spec[3].name for spec in tbe.embedding_specs]})"
    if tbe.pooling_mode not in (PoolingMode.SUM, PoolingMode.MEAN):
        return f"pooling {tbe.pooling_mode} (SUM or MEAN only)"
    if tbe.output_dtype != SparseType.FP32.as_int():
        return "its output is not float32"
    if tbe.index_remappings_array.numel() > 0 or tbe.index_remapping_hash_table.numel() > 0:
        return "its rows are pruned (index remapping)"
    return None


def _int8_tbe_forward(
    tbe: Any,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None = None,
) -> Tensor:
    """``tbe.forward`` through :func:`int8_pooled_lookup`, one call per feature."""
    tables = [weights for weights, _ in tbe.split_embedding_weights(split_scale_shifts=False)]
    features = tbe.feature_table_map
    batch = (offsets.numel() - 1) // len(features)
    mean = tbe.pooling_mode == PoolingMode.MEAN
    pooled = [
        int8_pooled_lookup(
            tables[t],
            tbe.embedding_specs[t][2],
            indices,
            offsets[f * batch : (f + 1) * batch + 1],
            per_sample_weights,
            mean,
        )
        for f, t in enumerate(features)
    ]
    return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)


def use_int8_kernel_(module: nn.Module) -> int:
    """Makes every CPU int8 TBE in ``module`` pool with :func:`int8_pooled_lookup`, in place.

    The TBEs are fbgemm's ``IntNBitTableBatchedEmbeddingBagsCodegen`` inside TorchRec's quantized
    ``EmbeddingBagCollection`` (what ``compress_`` with ``RowWiseQuantConfig(bits=8)`` makes).
    Their rows, state and outputs stay the same; lookups use every torch thread instead of one.
    A TBE the kernel cannot serve (other row types, pruning, not on CPU) keeps fbgemm's lookup,
    and the log says why.  TorchScript compiles the class's own ``forward`` (fbgemm's lookup).

    Args:
        module (nn.Module): e.g. a quantized collection or a whole model.

    Returns:
        int: how many TBEs now use the kernel.

    Example::

        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> from torchrec.inference.modules import quantize_embeddings
        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
        >>> model = nn.Sequential(EmbeddingBagCollection([cfg]))
        >>> model = quantize_embeddings(model, dtype=torch.qint8, inplace=True)
        >>> use_int8_kernel_(model) == (1 if HAS_KERNELS else 0)
        True
    """
    switched = 0
    for name, tbe in _all_modules(module):
        if not isinstance(tbe, IntNBitTableBatchedEmbeddingBagsCodegen):
            continue
        reason = _int8_kernel_applies(tbe)
        if reason is not None:
            logger.info("%s keeps fbgemm's lookup: %s", name or type(tbe).__name__, reason)
            continue
        forward: Any = _int8_tbe_forward.__get__(tbe)  # bound to this TBE only
        tbe.forward = forward
        switched += 1
    return switched


if HAS_KERNELS:

    @torch.library.register_fake("torchrec_compress::int8_pooled_lookup")
    def _int8_pooled_lookup_fake(
        rows: Tensor,
        dim: int,
        ids: Tensor,
        offsets: Tensor,
        per_sample_weights: Tensor | None = None,
        mean: bool = False,
    ) -> Tensor:
        return rows.new_empty(offsets.shape[0] - 1, dim, dtype=torch.float32)
