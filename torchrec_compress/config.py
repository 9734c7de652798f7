"""The base of every method's config: plain, printable, serialisable data.

Every config (one per method, in its folder under :mod:`torchrec_compress.methods`) derives
from :class:`CompressionConfig`, which gives ``to_dict`` / ``from_dict`` round trips (plain
JSON-able data), so a config can be logged next to the checkpoint it produced.

Example::

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class MyConfig(CompressionConfig):
    ...     rank: int = 4
    >>> MyConfig.from_dict(MyConfig(rank=8).to_dict())
    MyConfig(rank=8)
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

_C = TypeVar("_C", bound="CompressionConfig")


@dataclass
class CompressionConfig:
    """Base of all method configs: plain data with a dict round trip.

    Subclasses whose fields hold nested dataclasses list them so that ``from_dict`` can rebuild
    them: ``_nested_fields`` (field name -> dataclass type of the dict values) and
    ``_sub_configs`` (field name -> dataclass type of the field).
    """

    @property
    def compresses_tables(self) -> bool:
        """Whether this config compresses embedding tables (a low-rank one may do MLPs only)."""
        return True

    def targets(self) -> str:
        """What this config compresses, in words (for messages)."""
        return "EmbeddingBagCollection tables"

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as plain (JSON-serialisable) Python data."""
        return dataclasses.asdict(self)

    @classmethod
    def _nested_fields(cls) -> dict[str, type]:
        return {}

    @classmethod
    def _sub_configs(cls) -> dict[str, type]:
        return {}

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
        """Rebuilds a config from ``to_dict`` output (validation runs again).

        A sub-config's fields may also be given flat (as configs wrote them before they had
        sub-configs): they are moved into it.
        """
        kwargs = dict(data)
        for name, sub_type in cls._sub_configs().items():
            sub = dict(kwargs.get(name) or {})
            for f in dataclasses.fields(sub_type):
                if f.name in kwargs:
                    sub[f.name] = kwargs.pop(f.name)
            kwargs[name] = sub_type(**sub)
        for name, value_type in cls._nested_fields().items():
            if name in kwargs:
                kwargs[name] = {
                    key: value if isinstance(value, value_type) else value_type(**value)
                    for key, value in kwargs[name].items()
                }
        return cls(**kwargs)


def check_fraction(value: float | None, what: str) -> None:
    """Raises naming ``what`` unless ``value`` is ``None`` or in (0, 1]."""
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {value}")


def check_positive_int(value: int | None, what: str) -> None:
    """Raises naming ``what`` unless ``value`` is ``None`` or a positive ``int``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{what} must be a positive int, got {value!r}")
