"""What input values a canopy model was trained on, and the documented rules that bring other inputs to them.

A model normalises raw band values with constants fitted to one kind of input: HRCH and DINOv2 expect uint8 RGB
divided by 255 (Tolan et al. 2024, facebookresearch/HighResCanopyHeight ``src/transforms.py``; DINOv2's ImageNet
mean/std). A uint16 COG or float reflectance fed through the same constants gives a near-constant map, so a fitted
model carries an :class:`InputRecord` (the dtype and value range it was trained on) and prediction compares every
input with it (:mod:`geodino.inputs`).

An input of another kind is either refused or converted by an :class:`InputRule` the user chooses:

* ``range``: raw ``[low, high]`` (one pair, or one per band) maps linearly onto the model's range ``to``, values
  outside are clipped (``--input-range 0,10000`` for reflectance x 10000 fed to a uint8 model; ``auto`` takes the
  2nd and 98th percentiles of the whole input, one scene-level pair per band, never per window);
* ``scale``: raw x ``scale`` (``--input-scale 255`` for 0-1 reflectance, ``1`` to feed values as they are).

A rule used at fit time is stored in the record and applied again, automatically and with a log line, to inputs of
the dtype the model was trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from core.errors import DinoscopeError

RULE_KINDS = ("range", "scale")


@dataclasses.dataclass(frozen=True)
class InputRule:
    """A per-band affine conversion of raw values into the model's value range.

    Attributes:
        kind: ``"range"`` or ``"scale"``.
        low, high: raw values mapped onto ``to`` (``range``): one value for every band, or one per band.
        to: the model's value range the raw range maps onto (``range``).
        scale: the factor (``scale``).
        origin: where the rule came from (``"--input-range 0,10000"``, ``"auto"``, ``"the model"``), for messages.
    """

    kind: str
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()
    to: tuple[float, float] = (0.0, 255.0)
    scale: float = 1.0
    origin: str = ""

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise DinoscopeError(
                f"unknown input rule {self.kind!r}", field="input_rule", fix=f"use one of {RULE_KINDS}"
            )
        if self.kind == "scale" and not (np.isfinite(self.scale) and self.scale > 0):
            raise DinoscopeError(f"the input scale must be positive, got {self.scale}", field="input_scale")
        if self.kind == "range":
            low, high = np.asarray(self.low, float), np.asarray(self.high, float)
            if low.size == 0 or low.shape != high.shape or not np.all(high > low):
                raise DinoscopeError(
                    f"the input range needs low < high, got low {list(self.low)} and high {list(self.high)}",
                    field="input_range",
                    fix="give LOW,HIGH with LOW below HIGH, e.g. --input-range 0,10000",
                )

    def apply(self, data: np.ndarray) -> np.ndarray:
        """``C x H x W`` raw values (float32) -> the model's value range (float32)."""
        if self.kind == "scale":
            return (data * np.float32(self.scale)).astype(np.float32, copy=False)
        low = np.asarray(self.low, np.float32).reshape(-1, 1, 1)
        high = np.asarray(self.high, np.float32).reshape(-1, 1, 1)
        bottom, top = np.float32(self.to[0]), np.float32(self.to[1])
        out = (data - low) / (high - low) * (top - bottom) + bottom
        return np.clip(out, bottom, top).astype(np.float32, copy=False)

    def describe(self) -> str:
        """One line for logs and ``canopy inspect``."""
        if self.kind == "scale":
            return f"raw x {self.scale:g}" + (f" ({self.origin})" if self.origin else "")
        pairs = ", ".join(f"{lo:g}..{hi:g}" for lo, hi in zip(self.low, self.high, strict=True))
        text = f"raw {pairs} -> {self.to[0]:g}..{self.to[1]:g}, clipped"
        return text + (f" ({self.origin})" if self.origin else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in a model's input record."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputRule:
        """Rebuild from :meth:`to_dict`'s output."""
        return cls(
            kind=str(data["kind"]),
            low=tuple(float(v) for v in data.get("low", ())),
            high=tuple(float(v) for v in data.get("high", ())),
            to=tuple(float(v) for v in data.get("to", (0.0, 255.0))),  # type: ignore[arg-type]
            scale=float(data.get("scale", 1.0)),
            origin=str(data.get("origin", "")),
        )


@dataclasses.dataclass(frozen=True)
class InputRecord:
    """The inputs a canopy model was trained on.

    Attributes:
        dtype: the raw dtype of the training images (``uint8``...).
        range: the values the model's normaliser expects, after ``rule`` (e.g. ``(0, 255)``).
        observed: per band ``(min, max)`` of the valid training values after ``rule`` (empty when unknown).
        rule: the rule fit applied to its images; applied again to inputs of ``dtype``.
    """

    dtype: str
    range: tuple[float, float]
    observed: tuple[tuple[float, float], ...] = ()
    rule: InputRule | None = None

    def describe(self) -> str:
        """One line: ``uint8, values 0..255`` (plus the stored rule)."""
        text = f"{self.dtype}, values {self.range[0]:g}..{self.range[1]:g}"
        return text + (f", converted by {self.rule.describe()}" if self.rule else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the model sidecar (``metadata.input``)."""
        return {
            "dtype": self.dtype,
            "range": list(self.range),
            "observed": [list(pair) for pair in self.observed],
            "rule": self.rule.to_dict() if self.rule else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputRecord:
        """Rebuild from :meth:`to_dict`'s output."""
        rule = data.get("rule")
        low, high = data["range"]
        return cls(
            dtype=str(data["dtype"]),
            range=(float(low), float(high)),
            observed=tuple((float(a), float(b)) for a, b in data.get("observed") or ()),
            rule=InputRule.from_dict(rule) if rule else None,
        )


def parse_range(text: str | Sequence[float]) -> tuple[float, float] | str | None:
    """``"0,10000"`` or ``[0, 10000]`` -> ``(0.0, 10000.0)``; ``"auto"`` -> ``"auto"``; empty -> None."""
    if isinstance(text, str):
        text = text.strip()
        if not text:
            return None
        if text.lower() == "auto":
            return "auto"
        parts = [p for p in text.replace(" ", ",").split(",") if p]
    else:
        parts = list(text)
        if not parts:
            return None
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise DinoscopeError(
            f"input range {text!r} is not LOW,HIGH or auto",
            field="input_range",
            fix="e.g. --input-range 0,10000 (raw values mapped onto the model's range) or --input-range auto",
        ) from None
    if not high > low:
        raise DinoscopeError(
            f"input range {text!r} needs LOW < HIGH", field="input_range", fix="e.g. --input-range 0,10000"
        )
    return low, high


def user_rule(
    input_range: str | Sequence[float], input_scale: float, target: tuple[float, float], auto: Any = None
) -> InputRule | None:
    """The rule a user asked for (``--input-range`` or ``--input-scale``), or None.

    ``auto`` is a callable returning per-band ``(low, high)`` arrays (2nd and 98th percentiles of the inputs),
    called only for ``--input-range auto``.
    """
    parsed = parse_range(input_range)
    if parsed is not None and input_scale:
        raise DinoscopeError(
            "give either --input-range or --input-scale, not both",
            field="input_scale",
            fix="--input-range maps a raw range onto the model's; --input-scale multiplies raw values",
        )
    if input_scale:
        return InputRule("scale", scale=float(input_scale), origin=f"--input-scale {input_scale:g}")
    if parsed is None:
        return None
    if parsed == "auto":
        if auto is None:
            raise DinoscopeError("input range 'auto' needs the inputs to measure", field="input_range")
        low, high = auto()
        return InputRule("range", tuple(map(float, low)), tuple(map(float, high)), target, origin="auto: p2..p98")
    low, high = parsed  # type: ignore[misc]
    return InputRule("range", (low,), (high,), target, origin=f"--input-range {low:g},{high:g}")
