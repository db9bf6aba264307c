"""Units of depth pruning: a whole decoder layer, or its attention or MLP sub-block.

A `Unit` names a part of the model by the layer's index in the model's CURRENT numbering:
``Unit(12)`` is layer 12 ("12"), ``Unit(12, "attention")`` its attention sub-block ("12.attn"),
``Unit(12, "mlp")`` its MLP sub-block ("12.mlp"). Units sort by layer, the whole layer first.
`normalize_units` turns what a caller passes (units, ints, strings) into the smallest equivalent
set: a sub-block of a layer that goes as a whole is dropped, and both sub-blocks of one layer become
the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import total_ordering
from collections.abc import Iterable
from typing import Literal

from depthbench.errors import ConfigError

Part = Literal["layer", "attention", "mlp"]
PARTS: tuple[str, ...] = ("layer", "attention", "mlp")
_SUFFIX = {"layer": "", "attention": ".attn", "mlp": ".mlp"}
_PART_OF_SUFFIX = {"attn": "attention", "mlp": "mlp"}


@total_ordering
@dataclass(frozen=True)
class Unit:
    """One prunable unit: decoder layer ``layer`` (0-based, current numbering) or one of its sub-blocks."""

    layer: int
    part: Part = "layer"

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ConfigError(f"unit layer {self.layer!r}; allowed: an integer >= 0")
        if self.part not in PARTS:
            raise ConfigError(f"unit part {self.part!r}; allowed: {', '.join(PARTS)}")

    def __str__(self) -> str:
        return f"{self.layer}{_SUFFIX[self.part]}"

    def _key(self) -> tuple[int, int]:
        return self.layer, PARTS.index(self.part)

    def __lt__(self, other: "Unit") -> bool:
        if not isinstance(other, Unit):
            return NotImplemented
        return self._key() < other._key()

    @property
    def is_layer(self) -> bool:
        return self.part == "layer"

    @classmethod
    def parse(cls, text: str) -> "Unit":
        """``"12"`` -> layer 12, ``"12.attn"`` -> its attention, ``"12.mlp"`` -> its MLP."""
        head, dot, tail = str(text).strip().partition(".")
        if not head.isdigit() or (dot and tail not in _PART_OF_SUFFIX):
            raise ConfigError(f"unit {text!r}; allowed: 'K', 'K.attn' or 'K.mlp' with K a layer index")
        return cls(int(head), _PART_OF_SUFFIX[tail] if dot else "layer")


UnitLike = Unit | int | str


def as_unit(value: UnitLike) -> Unit:
    """A `Unit` from a unit, a layer index or the unit's string form."""
    if isinstance(value, Unit):
        return value
    if isinstance(value, bool):
        raise ConfigError(f"unit {value!r}; allowed: a Unit, a layer index or 'K', 'K.attn', 'K.mlp'")
    if isinstance(value, int) or (hasattr(value, "__index__") and not isinstance(value, str)):
        return Unit(int(value))
    if isinstance(value, str):
        return Unit.parse(value)
    raise ConfigError(f"unit {value!r}; allowed: a Unit, a layer index or 'K', 'K.attn', 'K.mlp'")


def normalize_units(units: Iterable[UnitLike]) -> list[Unit]:
    """The smallest sorted set of units equivalent to ``units``: duplicates and sub-blocks of whole
    layers dropped, a layer's attention plus its MLP merged into the layer."""
    given = {as_unit(u) for u in units}
    layers = {u.layer for u in given if u.is_layer}
    parts: dict[int, set[str]] = {}
    for u in given:
        if not u.is_layer and u.layer not in layers:
            parts.setdefault(u.layer, set()).add(u.part)
    layers |= {k for k, p in parts.items() if p == {"attention", "mlp"}}
    out = [Unit(k) for k in layers]
    out += [Unit(k, p) for k, ps in parts.items() if k not in layers for p in ps]
    return sorted(out)


def format_units(units: Iterable[Unit]) -> list[str]:
    return [str(u) for u in units]
