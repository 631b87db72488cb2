"""A tiny SVG writer that escapes by construction, and the geometry helpers the charts share.

Every attribute value and every text node goes through :func:`markupsafe.escape`, so a string
from a trace or a plugin (a leaf name, a state, a phase) can never close an element or open a
script; only :class:`markupsafe.Markup` produced by this module is trusted as-is. Coordinates are
written with one decimal so output is identical from run to run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from markupsafe import Markup, escape

from tdxtrace.report.formatting import format_int, format_ns, truncate_text

# Okabe–Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#8c6d1f",
           "#6b6b6b")

Attr = str | int | float | None


def num(value: float) -> str:
    """A coordinate with fixed precision (``-0.0`` folded to ``0.0``)."""
    text = f"{value:.1f}"
    return "0.0" if text == "-0.0" else text


def _attrs(attrs: Mapping[str, Attr]) -> str:
    parts = []
    for key, value in attrs.items():
        if value is None:
            continue
        shown = num(value) if isinstance(value, float) else str(value)
        parts.append(f' {key.rstrip("_").replace("_", "-")}="{escape(shown)}"')
    return "".join(parts)


def el(tag: str, attrs: Mapping[str, Attr] | None = None, *children: Markup | str) -> Markup:
    """One element; ``str`` children are escaped, :class:`Markup` children are kept."""
    inner = "".join(str(escape(child)) for child in children)
    if not inner:
        return Markup(f"<{tag}{_attrs(attrs or {})}/>")
    return Markup(f"<{tag}{_attrs(attrs or {})}>{inner}</{tag}>")


def svg_root(chart_id: str, title: str, desc: str, width: int, height: int,
             *body: Markup) -> Markup:
    """The outer ``<svg>``: sized by viewBox (CSS scales it), labelled by its ``<title>``."""
    attrs: dict[str, Attr] = {
        "xmlns": "http://www.w3.org/2000/svg",
        "viewBox": f"0 0 {width} {height}",
        "width": width,
        "height": height,
        "role": "img",
        "aria-labelledby": f"{chart_id}-t {chart_id}-d",
        "class": "chart",
    }
    head = (el("title", {"id": f"{chart_id}-t"}, title), el("desc", {"id": f"{chart_id}-d"}, desc))
    return el("svg", attrs, *head, *body)


def text(x: float, y: float, content: str, *, anchor: str = "start", cls: str = "lbl",
         **extra: Attr) -> Markup:
    return el("text", {"x": float(x), "y": float(y), "text-anchor": anchor, "class": cls,
                       **extra}, content)


def rect(x: float, y: float, w: float, h: float, *, fill: str | None = None,
         cls: str | None = None, tip: str | None = None) -> Markup:
    children = (el("title", None, tip),) if tip else ()
    return el("rect", {"x": float(x), "y": float(y), "width": float(max(w, 0.0)),
                       "height": float(max(h, 0.0)), "fill": fill, "class": cls}, *children)


def line(x1: float, y1: float, x2: float, y2: float, cls: str = "grid") -> Markup:
    return el("line", {"x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2),
                       "class": cls})


def nice_step(span: float, target_ticks: int = 5) -> float:
    """A 1/2/5 × 10^k step that cuts ``span`` into about ``target_ticks`` intervals."""
    if span <= 0:
        return 1.0
    raw = span / target_ticks
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * power >= raw:
            return float(factor * power)
    return float(10 * power)


def linear_ticks(top: float, target_ticks: int = 5, *, integer: bool = False) -> list[float]:
    """Tick values from 0 up to at least ``top`` on a 1/2/5 step."""
    step = nice_step(top, target_ticks)
    if integer:
        step = max(1.0, math.ceil(step))
    count = max(1, math.ceil(top / step)) if top > 0 else 1
    return [i * step for i in range(count + 1)]


def tick_label(value: float, *, ns: bool) -> str:
    return format_ns(value) if ns else format_int(round(value))


def legend(items: list[tuple[str, str]], x: float, y: float, width: float) -> list[Markup]:
    """Colour swatches with labels, wrapped onto new lines within ``width``."""
    out: list[Markup] = []
    cx, cy = x, y
    for label, colour in items:
        item_w = 18 + 7 * min(len(label), 28) + 14
        if cx + item_w > x + width and cx > x:
            cx, cy = x, cy + 16
        out.append(rect(cx, cy - 9, 10, 10, fill=colour))
        out.append(text(cx + 14, cy, truncate_text(label, 28)))
        cx += item_w
    return out


def legend_height(items: list[tuple[str, str]], width: float) -> float:
    lines, cx = 1, 0.0
    for label, _ in items:
        item_w = 18 + 7 * min(len(label), 28) + 14
        if cx + item_w > width and cx > 0:
            lines, cx = lines + 1, 0.0
        cx += item_w
    return 16.0 * lines
