"""The compression layout of a model: what ``compress_`` swapped where, as plain JSON-able data.

A compressed checkpoint holds the state of compressed modules (factor tables, codes, int8 rows),
which an uncompressed model cannot load.  :func:`compression_layout` describes a compressed model
(per compressed module: its path, kind, per-table ranks / ``(M, K)`` / stored types, and the
config of the method that made it); :func:`restore_layout_` applies such a description to a
freshly built, *uncompressed* model (typically on ``meta``), swapping in empty compressed modules
of the right shapes, so that the checkpoint loads into it, sharded or not, at any world size
(``torchrec_compress.load_compressed`` does all of it in one call).

Each entry has a ``kind`` that names the method that made the module (its
``CompressionMethod.layout_kinds``) and the shapes that method needs to rebuild it
(:meth:`~torchrec_compress.registry.CompressionMethod.describe` and ``restore``; the kinds of the
built-in methods are listed in their ``method.py``), plus ``config``: the config of the method
that made it, ``{"class": ..., "options": config.to_dict()}``, or ``None`` when unknown.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    >>> def model(device):
    ...     cfg = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50, feature_names=["f"])
    ...     return nn.Sequential(EmbeddingBagCollection([cfg], device=device))
    >>> layout = CompressionLayout({"0": {"kind": "lowrank", "ranks": {"t": 4}, "kept": []}})
    >>> skeleton = restore_layout_(model(torch.device("meta")), layout)
    >>> type(skeleton[0]).__name__, tuple(skeleton[0].projection.t.shape)
    ('LowRankEmbeddingBagCollection', (4, 8))
    >>> compression_layout(skeleton).modules["0"]["ranks"]  # described back from the model
    {'t': 4}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_compress.config import CompressionConfig
from torchrec_compress.registry import (
    LayoutBuilder,
    config_classes,
    method_of_kind,
    registered_methods,
)
from torchrec_compress.skeleton import unsharded_skeleton

LAYOUT_VERSION = 1
META = torch.device("meta")


def _config_dict(config: CompressionConfig) -> dict[str, Any]:
    return {"class": type(config).__name__, "options": config.to_dict()}


def _config_from_dict(data: Mapping[str, Any]) -> CompressionConfig:
    known = config_classes()
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
    kinds = sorted(k for m in registered_methods() for k in m.layout_kinds)
    if entry.get("kind") not in kinds:
        raise ValueError(
            f"compression layout: module {path!r} has kind {entry.get('kind')!r}; valid: {kinds}"
        )
    factors = entry.get("factors")
    if factors is not None:
        _check_kind(factors, f"{path}.factor_ebc")


# --------------------------------------------------------------------------------------------
# describing a compressed model
# --------------------------------------------------------------------------------------------


def _maker(kind: str, configs: Sequence[CompressionConfig]) -> dict[str, Any] | None:
    """The config of the last method in ``configs`` that makes modules of ``kind``."""
    made = [c for c in configs if isinstance(c, method_of_kind(kind).config_types)]
    return _config_dict(made[-1]) if made else None


def _describe(module: nn.Module, configs: Sequence[CompressionConfig]) -> dict[str, Any] | None:
    """The layout entry of one module (its method's description and config), or ``None`` when
    no method made it."""
    for method in registered_methods():
        entry = method.describe(module, lambda nested: _describe(nested, configs))
        if entry is not None:
            entry["config"] = _maker(entry["kind"], configs)
            return entry
    return None


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

        >>> model = restore_layout_(  # an MLP whose second layer became rank 2
        ...     nn.Sequential(nn.ReLU(), nn.Linear(8, 4)),
        ...     CompressionLayout({"1": {"kind": "lowrank_linear", "rank": 2}}),
        ... )
        >>> layout = compression_layout(model)
        >>> layout.modules["1"]["kind"], layout.modules["1"]["rank"]
        ('lowrank_linear', 2)
    """
    configs = list(configs)
    if isinstance(model, DistributedModelParallel):
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


def check_table_names(
    tables: Sequence[EmbeddingBagConfig], names: Iterable[str], what: str
) -> None:
    """Raises naming ``what`` when ``names`` holds a table name ``tables`` lacks."""
    known = [t.name for t in tables]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"{what} names table(s) {unknown} that it does not hold; tables: {known}")


def check_collection(
    current: nn.Module, entry: Mapping[str, Any], path: str
) -> EmbeddingBagCollection:
    """``current``, which a compressed collection of ``entry`` replaces: a plain EBC.

    Raises:
        ValueError: naming the path and the module found (e.g. an already compressed model).
    """
    if type(current) is not EmbeddingBagCollection:
        raise ValueError(
            f"layout of {path!r}: a {entry['kind']} collection replaces an "
            f"EmbeddingBagCollection, found {type(current).__name__} (restore layouts on an "
            "uncompressed model)"
        )
    return current


def _build(
    current: nn.Module, entry: Mapping[str, Any], path: str, builder: LayoutBuilder
) -> nn.Module:
    """The empty module ``entry`` describes in place of ``current``: its method builds it."""
    return method_of_kind(str(entry["kind"])).restore(current, entry, path, builder)


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
    builder = LayoutBuilder(
        device=device,
        quantized_device=quantized_device if quantized_device is not None else device,
        collection=lambda current, entry, path: _build(current, entry, path, builder),
    )
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
        replacements[path] = _build(current, entry, path, builder)
    for path, module in replacements.items():
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    return model
