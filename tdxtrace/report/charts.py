"""The report's charts: hand-written inline SVG, drawn from an analyzer's aggregate tables.

Why hand-written SVG and not a plotting library: a report must open offline from a bug
attachment and stay small and byte-identical. JS chart libraries weigh 200 KB–3 MB inlined and
draw at load time (so a table of numbers would need JS to become a picture); matplotlib's SVG
output is ~50 KB per chart, embeds its own font glyphs and ids, and would be a heavy new
dependency. Four chart shapes in a few hundred lines of SVG cost a few KB each, are styled by the
report's CSS, render with JS disabled, and escape every label (see :mod:`tdxtrace.report.svg`).

Which table gets which chart is fixed by :data:`CHARTS` ((analyzer, table) -> builder). Each
builder bounds its own output (bars, rows, lanes, rectangles), so a chart's size does not grow
with the trace; a table with no rows gives a :class:`Chart` with a "no data" note and no SVG.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
from markupsafe import Markup

from tdxtrace.codes import LEAF_NAMES, Leaf
from tdxtrace.report import svg
from tdxtrace.report.formatting import format_int, format_ns, slug, truncate_text
from tdxtrace.report.timeline import timeline_chart

MAX_BARS = 40  # histogram: longer tails are merged into one ">= N" bar
MAX_ROWS = 40  # waterfall phases / latency leaves drawn
WIDTH = 920  # viewBox width; CSS scales the chart to the column (about 960 px)
MAX_SLOT = 64  # histogram: a bar's slot never gets wider than this


@dataclass(frozen=True)
class Chart:
    """One drawn chart: ``svg`` is None when there was nothing to draw (``note`` says why)."""

    key: str  # the table it draws, also its id within the section
    title: str
    svg: Markup | None
    note: str = ""  # "no data", or what was left out to keep the chart bounded


Builder = Callable[[str, pl.DataFrame], Chart]


def _missing(frame: pl.DataFrame, columns: tuple[str, ...]) -> list[str]:
    return [c for c in columns if c not in frame.columns]


def _checked(chart_id: str, title: str, frame: pl.DataFrame, columns: tuple[str, ...],
             empty_note: str) -> Chart | None:
    """A note-only chart when the table cannot be drawn; None when it can."""
    missing = _missing(frame, columns)
    if missing:
        return Chart(chart_id, title, None, f"Cannot draw: the table lacks {', '.join(missing)}.")
    if frame.height == 0:
        return Chart(chart_id, title, None, empty_note)
    return None


def retry_histogram(chart_id: str, frame: pl.DataFrame) -> Chart:
    """Bars of retry chains by length (busy_retry ``chain_length_hist``: length, chains)."""
    title = "BUSY retry chains by length"
    bad = _checked(chart_id, title, frame, ("length", "chains"), "No BUSY retry chains.")
    if bad:
        return bad
    data = (frame.select(pl.col("length").cast(pl.Int64), pl.col("chains").cast(pl.Int64))
            .drop_nulls().group_by("length").agg(pl.col("chains").sum()).sort("length"))
    labels = [str(v) for v in data["length"].to_list()]
    counts = data["chains"].to_list()
    note = ""
    if len(counts) > MAX_BARS:
        tail = sum(counts[MAX_BARS - 1:])
        note = f"Lengths from {labels[MAX_BARS - 1]} up are merged into the last bar."
        labels = [*labels[: MAX_BARS - 1], f"≥{labels[MAX_BARS - 1]}"]
        counts = [*counts[: MAX_BARS - 1], tail]
    left, right, top, bottom, height = 64, 16, 20, 46, 260
    # A few bars keep a sensible width instead of stretching across the page.
    plot_w = min(WIDTH - left - right, max(360, MAX_SLOT * len(counts)))
    plot_h = height - top - bottom
    ticks = svg.linear_ticks(max(counts), integer=True)
    y_max = ticks[-1] or 1.0
    slot = plot_w / len(counts)
    body: list[Markup] = []
    for tick in ticks:
        y = top + plot_h - tick / y_max * plot_h
        body.append(svg.line(left, y, left + plot_w, y))
        body.append(svg.text(left - 6, y + 4, format_int(round(tick)), anchor="end"))
    label_every = max(1, math.ceil(len(counts) / 20))
    for i, (label, count) in enumerate(zip(labels, counts, strict=True)):
        bar_h = count / y_max * plot_h
        x = left + i * slot + slot * 0.15
        body.append(svg.rect(x, top + plot_h - bar_h, slot * 0.7, bar_h, cls="bar",
                             tip=f"length {label}: {format_int(count)} chains"))
        if i % label_every == 0 or i == len(counts) - 1:
            body.append(svg.text(x + slot * 0.35, top + plot_h + 16, label, anchor="middle"))
    body.append(svg.line(left, top + plot_h, left + plot_w, top + plot_h, cls="axis"))
    body.append(svg.text(left + plot_w / 2, height - 8, "chain length (SEAMCALL attempts)",
                         anchor="middle", cls="axis-title"))
    body.append(svg.text(14, top + plot_h / 2, "chains", anchor="middle", cls="axis-title",
                         transform=f"rotate(-90 14 {svg.num(top + plot_h / 2)})"))
    desc = f"{len(counts)} bars; {format_int(sum(counts))} chains in all."
    return Chart(chart_id, title, svg.svg_root(chart_id, title, desc, WIDTH, height, *body), note)


def _time_axis(body: list[Markup], left: float, plot_w: float, y_top: float, y_axis: float,
               span: float) -> None:
    for tick in svg.linear_ticks(span, 6):
        if tick > span * 1.0001:
            break
        x = left + tick / span * plot_w
        body.append(svg.line(x, y_top, x, y_axis))
        body.append(svg.text(x, y_axis + 14, format_ns(tick), anchor="middle"))


def teardown_waterfall(chart_id: str, frame: pl.DataFrame) -> Chart:
    """Phase bars per TD from its teardown start (teardown_latency ``phases``)."""
    title = "Teardown phases (time from each TD's teardown start)"
    bad = _checked(chart_id, title, frame, ("td", "phase", "start_ns", "dur_ns"),
                   "No TD teardown in this trace.")
    if bad:
        return bad
    data = (frame.select("td", pl.col("phase").cast(pl.String), "start_ns", "dur_ns")
            .drop_nulls(["start_ns", "dur_ns"])
            .with_columns((pl.col("start_ns") - pl.col("start_ns").min().over("td")).alias("rel"))
            .sort(["td", "rel", "dur_ns"], descending=[False, False, True], nulls_last=True))
    note = ""
    if data.height > MAX_ROWS:
        note = f"The first {MAX_ROWS} of {format_int(data.height)} phases are drawn."
        data = data.head(MAX_ROWS)
    rows = data.to_dicts()
    phases = sorted({str(r["phase"]) for r in rows})
    colour = {p: svg.PALETTE[i % len(svg.PALETTE)] for i, p in enumerate(phases)}
    span = float(max(r["rel"] + r["dur_ns"] for r in rows)) or 1.0
    left, right, top, row_h = 200, 70, 12, 20
    plot_w = WIDTH - left - right
    height = top + row_h * len(rows) + 34
    axis_y = top + row_h * len(rows) + 4
    body: list[Markup] = []
    _time_axis(body, left, plot_w, top, axis_y, span)
    for i, r in enumerate(rows):
        y = top + i * row_h
        td = "—" if r["td"] is None else str(r["td"])
        label = f"TD {td} · {r['phase']}"
        x = left + r["rel"] / span * plot_w
        w = max(r["dur_ns"] / span * plot_w, 1.5)
        body.append(svg.text(left - 8, y + 14, truncate_text(label, 32), anchor="end"))
        tip = f"{label}: starts +{format_ns(r['rel'])}, lasts {format_ns(r['dur_ns'])}"
        body.append(svg.rect(x, y + 3, w, row_h - 6, fill=colour[str(r["phase"])], tip=tip))
        body.append(svg.text(x + w + 4, y + 14, format_ns(r["dur_ns"]), cls="val"))
    body.append(svg.line(left, axis_y, left + plot_w, axis_y, cls="axis"))
    desc = f"{len(rows)} phases over {format_ns(span)}."
    return Chart(chart_id, title, svg.svg_root(chart_id, title, desc, WIDTH, height, *body), note)


def _leaf_label(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return LEAF_NAMES.get(value, f"leaf {value}")
    return str(value)


VP_ENTER_NAME = LEAF_NAMES[int(Leaf.TDH_VP_ENTER)]
# The SEAMCALL returns at the TD exit, so its latency is mostly the guest running.
VP_ENTER_NOTE = ("TDH.VP.ENTER lasts from TD entry to TD exit: its bar is mostly time in the "
                 "guest, not in the TDX module.")


def latency_by_leaf(chart_id: str, frame: pl.DataFrame) -> Chart:
    """Log-scale bars per leaf: p50, p50–p99, min–max whisker (seamcall_latency ``by_leaf``)."""
    title = "SEAMCALL latency per leaf (log scale)"
    cols = ("leaf", "count", "min_ns", "p50_ns", "p99_ns", "max_ns")
    bad = _checked(chart_id, title, frame, cols, "No SEAMCALLs in this trace.")
    if bad:
        return bad
    data = frame.select(cols).drop_nulls(["min_ns", "p50_ns", "p99_ns", "max_ns"])
    if data.height == 0:
        return Chart(chart_id, title, None, "No SEAMCALL has a latency.")
    note = ""
    if data.height > MAX_ROWS:
        note = f"The first {MAX_ROWS} of {format_int(data.height)} leaves are drawn."
        data = data.head(MAX_ROWS)
    rows = data.to_dicts()
    if any(_leaf_label(r["leaf"]) == VP_ENTER_NAME for r in rows):
        note = " ".join(filter(None, [note, VP_ENTER_NOTE]))
    low_exp = math.floor(math.log10(max(1.0, min(float(r["min_ns"]) for r in rows))))
    high_exp = max(low_exp + 1, math.ceil(math.log10(max(1.0, *(float(r["max_ns"])
                                                                   for r in rows)))))
    left, right, top, row_h = 230, 80, 30, 20
    plot_w = WIDTH - left - right
    axis_y = top + row_h * len(rows) + 4
    height = axis_y + 30

    def x_of(ns: float) -> float:
        exp = math.log10(max(ns, 10.0 ** low_exp))
        return left + (exp - low_exp) / (high_exp - low_exp) * plot_w

    body = svg.legend([("p50", "#0072b2"), ("p50–p99", "#56b4e9"), ("min–max", "#6b6b6b")],
                      left, 14, plot_w)
    for exp in range(low_exp, high_exp + 1):
        x = x_of(10.0 ** exp)
        body.append(svg.line(x, top, x, axis_y))
        body.append(svg.text(x, axis_y + 14, format_ns(10.0 ** exp), anchor="middle"))
    for i, r in enumerate(rows):
        y = top + i * row_h
        name = _leaf_label(r["leaf"])
        count = 0 if r["count"] is None else int(r["count"])
        body.append(svg.text(left - 8, y + 14, f"{truncate_text(name, 28)} ({format_int(count)})",
                             anchor="end"))
        tip = (f"{name}: {format_int(count)} calls; min {format_ns(r['min_ns'])}, p50 "
               f"{format_ns(r['p50_ns'])}, p99 {format_ns(r['p99_ns'])}, max "
               f"{format_ns(r['max_ns'])}")
        mid = y + row_h / 2
        body.append(svg.line(x_of(r["min_ns"]), mid, x_of(r["max_ns"]), mid, cls="whisker"))
        body.append(svg.rect(left, y + 4, x_of(r["p50_ns"]) - left, row_h - 8, fill="#0072b2",
                             tip=tip))
        p99_x = x_of(r["p99_ns"])
        body.append(svg.rect(x_of(r["p50_ns"]), y + 4, p99_x - x_of(r["p50_ns"]), row_h - 8,
                             fill="#56b4e9", tip=tip))
        body.append(svg.text(x_of(r["max_ns"]) + 6, y + 14, f"p99 {format_ns(r['p99_ns'])}",
                             cls="val"))
    body.append(svg.line(left, axis_y, left + plot_w, axis_y, cls="axis"))
    desc = (f"{len(rows)} leaves, from {format_ns(10.0 ** low_exp)} "
            f"to {format_ns(10.0 ** high_exp)}.")
    return Chart(chart_id, title, svg.svg_root(chart_id, title, desc, WIDTH, height, *body), note)


def zero_step_timeline(chart_id: str, frame: pl.DataFrame) -> Chart:
    """Per-vCPU lanes of zero-step states over run time (zero_step ``timeline``)."""
    title = "Zero-step state per vCPU over the run"
    bad = _checked(chart_id, title, frame, ("td", "vcpu", "start_ns", "end_ns", "state"),
                   "No vCPU was suspected of zero-stepping.")
    if bad:
        return bad
    drawing, note = timeline_chart(chart_id, title, frame, WIDTH)
    return Chart(chart_id, title, drawing, note)


CHARTS: dict[tuple[str, str], Builder] = {
    ("busy_retry", "chain_length_hist"): retry_histogram,
    ("teardown_latency", "phases"): teardown_waterfall,
    ("zero_step", "timeline"): zero_step_timeline,
    ("seamcall_latency", "by_leaf"): latency_by_leaf,
}


def charts_for(analyzer: str, chart_prefix: str,
               tables: dict[str, pl.DataFrame]) -> dict[str, Chart]:
    """The charts an analyzer's tables give, by table name (a table that cannot be drawn, e.g.
    of an unexpected type, gives a note instead of stopping the report)."""
    out = {}
    for table in sorted(tables):
        builder = CHARTS.get((analyzer, table))
        if builder is None:
            continue
        chart_id = f"{chart_prefix}-{slug(table)}"
        try:
            out[table] = builder(chart_id, tables[table])
        except (pl.exceptions.PolarsError, ValueError, TypeError, OverflowError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            out[table] = Chart(chart_id, table, None, f"Cannot draw: {reason}")
    return out
