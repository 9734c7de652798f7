"""The compression layout of a model: what ``compress_`` swapped where, as plain JSON-able data.

A compressed checkpoint holds the state of compressed modules (factor tables, codes, int8 rows),
which an uncompressed model cannot load.  :func:`compression_layout` describes a compressed model
(per compressed module: its path, kind, per-table ranks / ``(M, K)`` / stored types, and the
config of the method that made it); :func:`restore_layout_` applies such a description to a
freshly built, *uncompressed* model (typically on ``meta``), swapping in empty compressed modules
of the right shapes, so that the checkpoint loads into it, sharded or not, at any world size
(``torchrec_compress.distributed.load_compressed`` does all of it in one call).

Kinds (``entry["kind"]``):

* ``"lowrank"`` / ``"composite"``: a :class:`LowRankEmbeddingBagCollection` (``ranks``: table ->
  k; ``kept``: tables left at full width) whose factor tables are a plain collection
  (``factors`` ``None``), fp16 rows or, for ``"composite"``, product-quantized or int8 rows
  (``factors``: the nested entry of the factor collection, e.g. AFM then MEC);
* ``"pq"``: a :class:`PQEmbeddingBagCollection` (``tables``: name -> ``num_subspaces`` M and
  ``num_centroids`` K; a table kept by MEC is stored exactly as ``M = 1``, ``K = rows``);
* ``"rowwise_quant"``: rows stored as ``data_types`` (``"INT8"``, ``"INT4"``, ``"FP16"``, ...;
  ``kept``: tables left in float32), TorchRec's quantized collection or an fp16 one;
* ``"lowrank_linear"``: a :class:`LowRankLinear` of ``rank``.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    >>> from torchrec_compress.config import SVDConfig
    >>> def model(device):
    ...     cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50, feature_names=["f"])
    ...     return nn.Sequential(EmbeddingBagCollection([cfg], device=device))
    >>> from torchrec_compress.api import compress_
    >>> compressed = model(torch.device("cpu"))
    >>> _ = compress_(compressed, SVDConfig(rank=4))
    >>> layout = compression_layout(compressed, [SVDConfig(rank=4)])
    >>> layout.to_dict()["modules"]["0"]["ranks"]
    {'t': 4}
    >>> skeleton = restore_layout_(model(torch.device("meta")), CompressionLayout.from_dict(layout.to_dict()))
    >>> type(skeleton[0]).__name__
    'LowRankEmbeddingBagCollection'
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from torchrec_compress.config import CompressionConfig
from torchrec_compress.methods.lowrank.config import AFMConfig, LowRankConfig, SVDConfig
from torchrec_compress.methods.lowrank.linear import LowRankLinear
from torchrec_compress.methods.lowrank.module import (
    CompositeLowRankEmbeddingBagCollection,
    LowRankEmbeddingBagCollection,
)
from torchrec_compress.methods.pq.config import MECConfig, PQConfig
from torchrec_compress.methods.pq.module import PQEmbeddingBagCollection
from torchrec_compress.methods.pq.quantizer import code_dtype
from torchrec_compress.methods.rowwise_quant.method import (
    RowWiseQuantConfig,
    empty_rowwise_collection,
)
from torchrec_compress.registry import METHODS

LAYOUT_VERSION = 1
KINDS = ("lowrank", "composite", "pq", "rowwise_quant", "lowrank_linear")
# config classes a layout can name, by class name (and any registered later: _config_classes)
CONFIG_CLASSES: dict[str, type[CompressionConfig]] = {
    c.__name__: c for c in (AFMConfig, SVDConfig, MECConfig, PQConfig, RowWiseQuantConfig)
}
META = torch.device("meta")


def _config_dict(config: CompressionConfig) -> dict[str, Any]:
    return {"class": type(config).__name__, "options": config.to_dict()}


def _config_from_dict(data: Mapping[str, Any]) -> CompressionConfig:
    known = {**CONFIG_CLASSES, **{c.__name__: c for c in METHODS}}
    name = data.get("class")
    if name not in known:
        raise ValueError(
            f"compression layout names unknown config class {name!r}; known: {sorted(known)}"
        )
    return known[name].from_dict(dict(data.get("options", {})))


@dataclass
class CompressionLayout:
    """Which modules of a model are compressed, how, and by which configs (JSON-able).

    Args:
        modules (Dict[str, Dict[str, Any]]): fully qualified module name -> entry (``kind``
            and its shapes, see the module docstring; ``config``: the method's config as
            ``{"class": ..., "options": config.to_dict()}`` or ``None`` when unknown).
        configs (List[CompressionConfig]): the configs applied, in order (e.g. AFM then MEC).

    Example::

        >>> layout = CompressionLayout({"ebc": {"kind": "lowrank", "ranks": {"t": 4}}})
        >>> CompressionLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
        True
        >>> bool(CompressionLayout({}))
        False
    """

    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    configs: list[CompressionConfig] = field(default_factory=list)

    def __bool__(self) -> bool:
        """Whether anything is compressed."""
        return bool(self.modules)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data (``from_dict`` rebuilds the layout)."""
        return {
            "version": LAYOUT_VERSION,
            "configs": [_config_dict(c) for c in self.configs],
            "modules": json.loads(json.dumps(self.modules)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionLayout:
        """Rebuilds a layout from :meth:`to_dict` output (a checkpoint's metadata).

        Raises:
            ValueError: naming an unknown version, kind or config class.
        """
        version = data.get("version", LAYOUT_VERSION)
        if version != LAYOUT_VERSION:
            raise ValueError(
                f"compression layout version {version!r} is not supported (this torchrec_compress "
                f"reads version {LAYOUT_VERSION})"
            )
        modules = {str(path): dict(entry) for path, entry in data.get("modules", {}).items()}
        for path, entry in modules.items():
            _check_kind(entry, path)
        return cls(modules, [_config_from_dict(c) for c in data.get("configs", [])])


def _check_kind(entry: Mapping[str, Any], path: str) -> None:
    if entry.get("kind") not in KINDS:
        raise ValueError(
            f"compression layout: module {path!r} has kind {entry.get('kind')!r}; valid: {KINDS}"
        )
    factors = entry.get("factors")
    if factors is not None:
        _check_kind(factors, f"{path}.factor_ebc")


# --------------------------------------------------------------------------------------------
# describing a compressed model
# --------------------------------------------------------------------------------------------


def _family(kind: str) -> tuple[type[CompressionConfig], ...]:
    """Config classes whose method makes modules of ``kind``."""
    if kind in ("lowrank", "composite", "lowrank_linear"):
        return (LowRankConfig,)
    if kind == "pq":
        return (MECConfig, PQConfig)
    return (RowWiseQuantConfig,)


def _maker(kind: str, configs: Sequence[CompressionConfig]) -> dict[str, Any] | None:
    """The config of the last method in ``configs`` that makes modules of ``kind``."""
    made = [c for c in configs if isinstance(c, _family(kind))]
    return _config_dict(made[-1]) if made else None


def _describe(module: nn.Module, configs: Sequence[CompressionConfig]) -> dict[str, Any] | None:
    """The layout entry of one module, or ``None`` when it is not compressed."""
    entry: dict[str, Any]
    if isinstance(module, LowRankEmbeddingBagCollection):
        kind = (
            "composite" if isinstance(module, CompositeLowRankEmbeddingBagCollection) else "lowrank"
        )
        ranks = module.ranks()
        entry = {
            "kind": kind,
            "ranks": ranks,
            "kept": [t.name for t in module.embedding_bag_configs() if t.name not in ranks],
            "factors": _describe(module.factor_ebc, configs),
        }
    elif isinstance(module, PQEmbeddingBagCollection):
        entry = {
            "kind": "pq",
            "tables": {
                name: {"num_subspaces": int(b.shape[0]), "num_centroids": int(b.shape[1])}
                for name in module.codebooks
                for b in [module.codebook(name)]
            },
        }
    elif isinstance(module, (QuantEmbeddingBagCollection, EmbeddingBagCollection)):
        types = {t.name: t.data_type.value for t in module.embedding_bag_configs()}
        if isinstance(module, EmbeddingBagCollection) and set(types.values()) <= {"FP32"}:
            return None
        entry = {
            "kind": "rowwise_quant",
            "data_types": types,
            "kept": [name for name, value in types.items() if value == "FP32"],
        }
    elif isinstance(module, LowRankLinear):
        entry = {"kind": "lowrank_linear", "rank": module.rank}
    else:
        return None
    entry["config"] = _maker(entry["kind"], configs)
    return entry


def compression_layout(
    model: nn.Module, configs: Iterable[CompressionConfig] = ()
) -> CompressionLayout:
    """The :class:`CompressionLayout` of ``model``: every compressed module by path.

    Args:
        model (nn.Module): an unsharded model, or a ``DistributedModelParallel`` one (its
            unsharded architecture is derived with
            :func:`~torchrec_compress.distributed.compression.unsharded_skeleton`).  Paths are
            relative to the unwrapped model (``dmp.module``).
        configs (Iterable[CompressionConfig]): the configs applied to it, in order; each entry
            names the last one whose method makes its kind of module.

    Returns:
        CompressionLayout: empty (falsy) for an uncompressed model.

    Example::

        >>> from torchrec_compress.methods.lowrank.linear import LowRankLinear
        >>> layout = compression_layout(nn.Sequential(nn.ReLU(), LowRankLinear(8, 2, 4)))
        >>> layout.modules["1"]["kind"], layout.modules["1"]["rank"]
        ('lowrank_linear', 2)
    """
    from torchrec.distributed.model_parallel import DistributedModelParallel

    configs = list(configs)
    if isinstance(model, DistributedModelParallel):
        # the distributed package sits above this module (it saves layouts); import on use
        from torchrec_compress.distributed.compression import unsharded_skeleton

        model = unsharded_skeleton(model)
    modules: dict[str, dict[str, Any]] = {}

    def visit(module: nn.Module, fqn: str) -> None:
        entry = _describe(module, configs)
        if entry is not None:
            modules[fqn] = entry
            return
        for name, child in module.named_children():
            visit(child, f"{fqn}.{name}" if fqn else name)

    visit(model, "")
    return CompressionLayout(modules, configs)


# --------------------------------------------------------------------------------------------
# applying a layout to an uncompressed model
# --------------------------------------------------------------------------------------------


def _table_names(tables: Sequence[EmbeddingBagConfig], names: Iterable[str], what: str) -> None:
    known = [t.name for t in tables]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"{what} names table(s) {unknown} that it does not hold; tables: {known}")


def _build_collection(
    ebc: EmbeddingBagCollection,
    entry: Mapping[str, Any],
    path: str,
    device: torch.device,
    quantized_device: torch.device,
) -> nn.Module:
    """The empty compressed collection that ``entry`` describes, in place of ``ebc``."""
    tables = ebc.embedding_bag_configs()
    kind = entry["kind"]
    if kind in ("lowrank", "composite"):
        ranks = {str(n): int(k) for n, k in entry["ranks"].items()}
        _table_names(tables, ranks, f"layout of {path!r} (ranks)")
        module = LowRankEmbeddingBagCollection(tables, ranks, ebc.is_weighted(), device)
        factors = entry.get("factors")
        if factors is None:
            return module
        inner = _build_collection(
            module.factor_ebc, factors, f"{path}.factor_ebc", device, quantized_device
        )
        return module.with_factor_collection(inner)
    if kind == "pq":
        specs = entry["tables"]
        _table_names(tables, specs, f"layout of {path!r} (pq tables)")
        missing = sorted({t.name for t in tables} - set(specs))
        if missing:
            raise ValueError(f"layout of {path!r} (pq tables) lacks table(s) {missing}")
        codes, books = {}, {}
        for t in tables:
            m, k = int(specs[t.name]["num_subspaces"]), int(specs[t.name]["num_centroids"])
            if t.embedding_dim % m != 0:
                raise ValueError(
                    f"layout of {path!r}: table {t.name!r} of dim {t.embedding_dim} cannot have "
                    f"num_subspaces={m}"
                )
            codes[t.name] = torch.zeros(t.num_embeddings, m, dtype=code_dtype(k), device=device)
            books[t.name] = torch.empty(m, k, t.embedding_dim // m, device=device)
        return PQEmbeddingBagCollection(tables, codes, books, ebc.is_weighted())
    if kind == "rowwise_quant":
        return _rowwise_collection(ebc, entry, path, device, quantized_device)
    raise ValueError(f"layout of {path!r}: kind {kind!r} is not a collection")


def _rowwise_collection(
    ebc: EmbeddingBagCollection,
    entry: Mapping[str, Any],
    path: str,
    device: torch.device,
    quantized_device: torch.device,
) -> nn.Module:
    """fp16 rows (trainable, on ``device``) or TorchRec's quantized collection, built on
    ``quantized_device`` (see :func:`empty_rowwise_collection`)."""
    tables = ebc.embedding_bag_configs()
    names = entry["data_types"]
    _table_names(tables, names, f"layout of {path!r} (data_types)")
    try:
        types = {t.name: DataType(names.get(t.name, t.data_type.value)) for t in tables}
    except ValueError as e:
        raise ValueError(f"layout of {path!r}: {e}") from e
    return empty_rowwise_collection(tables, ebc.is_weighted(), types, device, quantized_device)


def _replacement(
    current: nn.Module,
    entry: Mapping[str, Any],
    path: str,
    device: torch.device,
    quantized_device: torch.device,
) -> nn.Module:
    if entry["kind"] == "lowrank_linear":
        if type(current) is not nn.Linear:
            raise ValueError(
                f"layout of {path!r}: a lowrank_linear replaces an nn.Linear, found "
                f"{type(current).__name__}"
            )
        return LowRankLinear(
            current.in_features,
            int(entry["rank"]),
            current.out_features,
            current.bias is not None,
            device,
        )
    if type(current) is not EmbeddingBagCollection:
        raise ValueError(
            f"layout of {path!r}: a {entry['kind']} collection replaces an "
            f"EmbeddingBagCollection, found {type(current).__name__} (restore layouts on an "
            "uncompressed model)"
        )
    return _build_collection(current, entry, path, device, quantized_device)


def restore_layout_(
    model: nn.Module,
    layout: CompressionLayout,
    device: torch.device | None = None,
    quantized_device: torch.device | None = None,
) -> nn.Module:
    """Swaps the modules of an uncompressed ``model`` for empty compressed ones, as ``layout`` says.

    The model is built as before compression (e.g. ``DLRM`` with its ``EmbeddingBagCollection``);
    afterwards its state-dict keys and shapes are those of the compressed model, so a compressed
    checkpoint loads into it (plain ``load_state_dict``, or DCP after DMP-sharding it with
    ``torchrec_compress.sharders(model)``).  Nothing is computed: weights come from the checkpoint.

    Args:
        model (nn.Module): the uncompressed model (not itself a replaced module), e.g. on ``meta``.
        layout (CompressionLayout): from :func:`compression_layout` or
            :meth:`CompressionLayout.from_dict`.
        device (Optional[torch.device]): where the new modules live (default ``meta``).
        quantized_device (Optional[torch.device]): where TorchRec's quantized (int8/4/2)
            collections are built (default ``device``): pass the device the model will run on,
            since they cannot be moved off ``meta``.

    Returns:
        nn.Module: ``model``.

    Raises:
        ValueError: naming the path and what was expected: a path the model lacks, a module of
            the wrong type (e.g. an already compressed model), tables the layout does not match.

    Example::

        >>> from torchrec import EmbeddingBagConfig
        >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=10**9,
        ...                          feature_names=["f"])
        >>> model = nn.Sequential(EmbeddingBagCollection([cfg], device=META))
        >>> layout = CompressionLayout({"0": {"kind": "pq", "tables": {
        ...     "t": {"num_subspaces": 4, "num_centroids": 256}}}})
        >>> restore_layout_(model, layout)[0].codes.t.shape, model[0].codes.t.dtype
        (torch.Size([1000000000, 4]), torch.uint8)
    """
    device = device if device is not None else META
    quantized_device = quantized_device if quantized_device is not None else device
    replacements: dict[str, nn.Module] = {}
    for path, entry in layout.modules.items():
        if path == "":
            raise ValueError("cannot replace the model itself in place; wrap it in a parent module")
        try:
            current = model.get_submodule(path)
        except AttributeError as e:
            raise ValueError(
                f"compression layout names module {path!r}, which the model "
                f"({type(model).__name__}) does not have"
            ) from e
        replacements[path] = _replacement(current, entry, path, device, quantized_device)
    for path, module in replacements.items():
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    return model
