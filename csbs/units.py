"""Byte sizes as people write them: ``4096``, ``64MiB``, ``1GiB``, ``512KiB``, ``2G``."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, field: str = "size") -> int:
    """Parse a byte count; raise ValueError naming ``field`` when it is not one."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{field} must not be negative")
        return text
    match = _SIZE_RE.fullmatch(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"{field} must be a number of bytes or a size like 64MiB, 1GiB, 512KiB (got {text!r})"
        )
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def format_size(n: int) -> str:
    """Human-readable binary size (``1.5 GiB``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
