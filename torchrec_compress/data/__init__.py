"""CTR datasets behind one interface: synthetic (the default), Frappe, Criteo and your own parquet.

Every dataset has a :class:`CTRSchema` and yields ``torchrec.datasets.utils.Batch`` objects
from ``batches(split, batch_size, rank, world_size, epoch)``, with the split semantics of
:mod:`torchrec_compress.data.schema`; :func:`check_batch` validates a batch against a schema.

Example::

    >>> ds = get_dataset("synthetic", train_rows=1000, val_rows=200, test_rows=200)
    >>> batches = list(ds.batches("val", batch_size=64, rank=1, world_size=2))
    >>> len(batches), check_batch(batches[0], ds.schema)
    (2, None)
"""

from __future__ import annotations

import inspect
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from torchrec_compress.data.checks import check_batch
from torchrec_compress.data.criteo import CriteoParquetDataset, convert_criteo_tsv
from torchrec_compress.data.frappe import FRAPPE_SCHEMA, FrappeDataset, read_frappe_libsvm
from torchrec_compress.data.parquet import ParquetColumns, ParquetDataset, SparseColumn
from torchrec_compress.data.schema import CTRDataset, CTRSchema, RowBlock
from torchrec_compress.data.synthetic import SyntheticCTRConfig, SyntheticCTRDataset

DATASETS: tuple[str, ...] = ("synthetic", "frappe", "criteo", "parquet")


def dataset_options(name: str) -> list[str]:
    """The option names :func:`get_dataset` takes for dataset ``name`` (``path`` and ``seed``
    are arguments of their own).

    Example::

        >>> dataset_options("frappe")
        ['val_fraction', 'split_seed']
    """
    if name == "synthetic":
        return ["config", *(f.name for f in fields(SyntheticCTRConfig) if f.name != "seed")]
    cls: type = {
        "frappe": FrappeDataset,
        "criteo": CriteoParquetDataset,
        "parquet": ParquetDataset,
    }[name]
    return [p for p in inspect.signature(cls).parameters if p not in ("path", "seed")]


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the unknown keys of ``options`` and listing the valid ones."""
    valid = dataset_options(name)
    unknown = [key for key in options if key not in valid]
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for dataset {name!r}; valid "
            f"options: {', '.join(valid)} (on the command line: --data-opt KEY=VALUE)"
        )


def get_dataset(
    name: str, *, path: str | Path | None = None, seed: int = 0, **options: Any
) -> CTRDataset:
    """Build a dataset by name.

    Args:
        name: ``"synthetic"``, ``"frappe"``, ``"criteo"`` or ``"parquet"``.
        path: data directory; required for Frappe (holding ``valid.libsvm`` and ``test.libsvm``),
            Criteo (parquet files from :func:`convert_criteo_tsv`) and parquet (your files, see
            :mod:`torchrec_compress.data.parquet`), unused for synthetic.
        seed: seed of the data (synthetic) and of the per-epoch train shuffle.
        **options: synthetic: :class:`SyntheticCTRConfig` fields (or ``config=`` a whole config,
            whose seed is kept; other
            options then override its fields); frappe: ``val_fraction``, ``split_seed``; criteo:
            ``num_embeddings`` (one int or 26), ``split_fractions``; parquet: ``columns`` (a
            :class:`ParquetColumns` or the path of its JSON file; required), ``split_fractions``.

    Raises:
        ValueError: unknown name, an option the dataset does not take (the message lists the
            valid ones), a missing path, or parquet without ``columns``.
        FileNotFoundError: ``path`` does not exist.

    Example::

        >>> get_dataset("synthetic", seed=3, train_rows=10).num_rows("train")
        10
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names are {DATASETS}")
    check_options(name, options)
    if name == "synthetic":
        if path is not None:
            raise ValueError(f"synthetic data is generated, not read: got path={str(path)!r}")
        config = options.pop("config", None)
        config = replace(config, **options) if config else SyntheticCTRConfig(seed=seed, **options)
        return SyntheticCTRDataset(config)
    if path is None:
        raise ValueError(f"dataset {name!r} needs path= (its data directory)")
    if not Path(path).exists():
        raise FileNotFoundError(f"data path {str(path)!r} for dataset {name!r} does not exist")
    if name == "frappe":
        return FrappeDataset(path, seed=seed, **options)
    if name == "parquet":
        if "columns" not in options:
            raise ValueError(
                "dataset 'parquet' needs columns= (a ParquetColumns or the path of its JSON "
                "file; on the command line: --data-opt columns=PATH.json)"
            )
        return ParquetDataset(path, seed=seed, **options)
    return CriteoParquetDataset(path, seed=seed, **options)


__all__ = [
    "DATASETS",
    "FRAPPE_SCHEMA",
    "CTRDataset",
    "CTRSchema",
    "CriteoParquetDataset",
    "FrappeDataset",
    "ParquetColumns",
    "ParquetDataset",
    "RowBlock",
    "SparseColumn",
    "SyntheticCTRConfig",
    "SyntheticCTRDataset",
    "check_batch",
    "convert_criteo_tsv",
    "get_dataset",
    "read_frappe_libsvm",
]
