"""The config of row-wise quantization: :class:`RowWiseQuantConfig` and its per-table overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from torchrec_compress.config import CompressionConfig

#: the bits a row's values may be stored in (16: fp16, trainable; 8/4/2: fbgemm's n-bit rows)
BITS: tuple[int, ...] = (16, 8, 4, 2)


def _check_bits(bits: int | None, what: str) -> None:
    if bits is not None and (isinstance(bits, bool) or bits not in BITS):
        raise ValueError(f"{what} must be one of {sorted(BITS)}, got {bits!r}")


@dataclass
class RowWiseQuantOverride:
    """Per-table setting of a :class:`RowWiseQuantConfig`.

    Args:
        bits (Optional[int]): 16, 8, 4 or 2 for this table (``None`` keeps the global ``bits``).
        skip (bool): leave this table as it is.  In a collection that has int8/4/2 tables its
            rows are stored unchanged inside the quantized collection (frozen; pooled by
            fbgemm, so sums may differ from ``nn.EmbeddingBag``'s in the last bit).
    """

    bits: int | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.bits, "RowWiseQuantOverride.bits")
        if self.skip and self.bits is not None:
            raise ValueError(f"RowWiseQuantOverride: give bits or skip=True, not both: {self}")


@dataclass
class RowWiseQuantConfig(CompressionConfig):
    """Row-wise quantization of embedding tables: fbgemm's fused n-bit rows, or fp16.

    With ``bits`` 8, 4 or 2, each row of a table of dimension ``d`` is stored as ``d``
    ``bits``-bit integers with an fp16 scale and bias (min/max of the row), frozen, in TorchRec's
    quantized ``EmbeddingBagCollection`` (the serving module).  fbgemm packs whole bytes in
    pairs: ``d * bits / 8`` must be even (``d`` a multiple of 2, 4, 8 for 8, 4, 2 bits).
    With ``bits=16`` rows are stored as fp16 and stay trainable: a collection none of whose
    tables is quantized to integers stays a TorchRec ``EmbeddingBagCollection``.  A table whose
    new rows would not be smaller than its rows now (e.g. ``d = 1`` in int8, an fp16 table in
    fp16) is kept and reported as kept.  No calibration data is needed.

    Args:
        bits (int): 16, 8, 4 or 2.
        table_overrides (Dict[str, RowWiseQuantOverride]): per table name; names must exist.
        factor_tables (bool): in a low-rank model, quantize the k-dim factor tables of every
            ``LowRankEmbeddingBagCollection`` (AFM x int8); off: such collections are left as
            they are.

    Example::

        >>> cfg = RowWiseQuantConfig(bits=4, table_overrides={"t_user": RowWiseQuantOverride(bits=8)})
        >>> RowWiseQuantConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> cfg.bits_for("t_user"), cfg.bits_for("t_item")
        (8, 4)
    """

    bits: int = 8
    table_overrides: dict[str, RowWiseQuantOverride] = field(default_factory=dict)
    factor_tables: bool = True

    @classmethod
    def _nested_fields(cls) -> dict[str, type]:
        return {"table_overrides": RowWiseQuantOverride}

    def __post_init__(self) -> None:
        _check_bits(self.bits, "RowWiseQuantConfig.bits")
        for table, override in self.table_overrides.items():
            if not isinstance(override, RowWiseQuantOverride):
                raise ValueError(
                    f"RowWiseQuantConfig.table_overrides[{table!r}] must be a "
                    f"RowWiseQuantOverride, got {override!r}"
                )

    def bits_for(self, table_name: str) -> int | None:
        """Bits of ``table_name`` after its override; ``None`` when it is skipped."""
        override = self.table_overrides.get(table_name)
        if override is None:
            return self.bits
        if override.skip:
            return None
        return override.bits if override.bits is not None else self.bits
