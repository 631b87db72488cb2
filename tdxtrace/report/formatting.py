"""How numbers and cells read in a report: fixed precision, so the same data gives the same text.

Every function here is pure and locale-independent (Python's ``format`` with ``,`` grouping is
not locale-aware), which is part of what makes a report byte-identical from run to run.
"""

from __future__ import annotations

import math
from typing import Any

MAX_CELL_CHARS = 120  # longer text in a table cell is cut with an ellipsis

# Integer columns that hold addresses or status words read best in hex.
_HEX_NAMES = frozenset({"gpa", "rip", "status", "hpa", "spte", "old_spte", "new_spte"})
_HEX_SUFFIXES = ("_gpa", "_rip", "_status", "_addr", "_spte")


def format_int(value: int) -> str:
    """An integer with thousands grouped: ``1,234,567``."""
    return f"{value:,}"


def format_float(value: float) -> str:
    """A float with a precision fixed by its magnitude (never exponent notation below 1e15)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    if magnitude >= 0.001:
        return f"{value:.4f}"
    return f"{value:.3e}"


def format_number(value: int | float) -> str:
    """An int grouped, a float at fixed precision; bools print as ``true``/``false``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return format_int(value)
    return format_float(float(value))


def format_ns(ns: float) -> str:
    """A duration in the unit that keeps 3 significant digits: ``950 ns``, ``12.3 µs``."""
    if math.isnan(ns) or math.isinf(ns):
        return format_float(ns)
    sign = "−" if ns < 0 else ""
    value = abs(float(ns))
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if value >= scale:
            return sign + _three_digits(value / scale, unit)
    return f"{sign}{value:.0f} ns"


def _three_digits(value: float, unit: str) -> str:
    if value >= 100:
        return f"{value:,.0f} {unit}"
    if value >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.2f} {unit}"


def is_duration_name(name: str) -> bool:
    """Whether a metric or column name says it is in nanoseconds (``*_ns``)."""
    return name == "ns" or name.endswith("_ns")


def is_hex_name(name: str) -> bool:
    """Whether an integer column is an address or a status word (shown in hex)."""
    lowered = name.lower()
    return lowered in _HEX_NAMES or lowered.endswith(_HEX_SUFFIXES)


def truncate_text(text: str, limit: int = MAX_CELL_CHARS) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_cell(column: str, value: Any) -> str:
    """One table cell as text: ``—`` for null, hex for addresses/statuses, numbers grouped."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"0x{value:x}" if is_hex_name(column) and value >= 0 else format_int(value)
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, (list, tuple)):
        return truncate_text(", ".join(format_cell(column, item) for item in value))
    return truncate_text(str(value))


def slug(text: str) -> str:
    """An HTML id fragment from any text: lower-case letters, digits, ``-`` and ``_`` only."""
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "-"
                      for ch in text.lower())
    return cleaned.strip("-") or "x"
