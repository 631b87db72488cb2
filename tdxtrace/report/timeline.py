"""The per-vCPU timeline chart, downsampled so its size does not depend on the trace.

Intervals are snapped to pixel columns and merged with polars (sort, running max, run ids), so a
million intervals cost the same SVG as a thousand: at most :data:`MAX_LANES` lanes,
:data:`MAX_STATES` colours and :data:`MAX_RECTS` rectangles. When the finest grid would exceed
the rectangle budget the grid is coarsened (480, 240, ... columns) until it fits.
"""

from __future__ import annotations

import math

import polars as pl
from markupsafe import Markup

from tdxtrace.report import svg
from tdxtrace.report.formatting import format_int, format_ns

MAX_LANES = 32
MAX_STATES = 7  # states beyond these (by most intervals) are drawn as "other"
MAX_RECTS = 1500
GRIDS = (480, 240, 120, 60, 30)
OTHER = "other"
ALARM = "#d55e00"
ALARM_WORDS = ("incident", "fail", "error", "bug", "stuck")


def _prepare(frame: pl.DataFrame) -> tuple[pl.DataFrame, int, int, list[str], str]:
    """Rows with lane numbers and capped states; also t0, t1, the state order and a note."""
    data = (frame.select(pl.col("td").cast(pl.Int64), pl.col("vcpu").cast(pl.Int64),
                         pl.col("start_ns").cast(pl.Int64), pl.col("end_ns").cast(pl.Int64),
                         pl.col("state").cast(pl.String).fill_null("?"))
            .drop_nulls("start_ns"))
    bounds = data.select(pl.col("start_ns").min().alias("t0"),
                         pl.max_horizontal(pl.col("start_ns").max(),
                                           pl.col("end_ns").max()).alias("t1")).row(0)
    t0, t1 = int(bounds[0]), int(bounds[1])
    # An open interval (no end) lasts to the end of what the table covers.
    data = data.with_columns(pl.max_horizontal(pl.col("end_ns").fill_null(t1), "start_ns"))
    lanes = data.select("td", "vcpu").unique().sort(["td", "vcpu"], nulls_last=True)
    notes = []
    if lanes.height > MAX_LANES:
        notes.append(f"The first {MAX_LANES} of {format_int(lanes.height)} vCPUs are drawn.")
        lanes = lanes.head(MAX_LANES)
    lanes = lanes.with_row_index("lane")
    data = data.join(lanes, on=["td", "vcpu"], nulls_equal=True)
    ranked = (data.group_by("state").len().sort(["len", "state"], descending=[True, False])
              ["state"].to_list())
    if len(ranked) > MAX_STATES:
        kept = set(ranked[: MAX_STATES - 1])
        notes.append(f"{len(ranked) - len(kept)} rarer states are drawn as \u201cother\u201d.")
        data = data.with_columns(
            pl.when(pl.col("state").is_in(sorted(kept))).then("state").otherwise(pl.lit(OTHER)))
        states = [*sorted(kept), OTHER]
    else:
        states = sorted(ranked)
    return data, t0, t1, states, " ".join(notes)


def _colours(states: list[str]) -> dict[str, str]:
    """Alarming states in vermillion, the rest from the palette in state order."""
    calm = [c for c in svg.PALETTE if c != ALARM]
    out, i = {}, 0
    for state in states:
        if any(word in state.lower() for word in ALARM_WORDS):
            out[state] = ALARM
        else:
            out[state], i = calm[i % len(calm)], i + 1
    return out


def _merge(data: pl.DataFrame, t0: int, span: int, columns: int) -> pl.DataFrame:
    """Intervals snapped to ``columns`` pixel columns, overlapping ones per lane+state merged."""
    key = ["lane", "state"]
    snapped = data.with_columns(
        ((pl.col("start_ns") - t0) * columns // span).clip(0, columns - 1).alias("c0"),
        (-((-(pl.col("end_ns") - t0) * columns) // span)).alias("c1"),
    ).with_columns(pl.max_horizontal("c1", pl.col("c0") + 1).clip(upper_bound=columns))
    # A new run starts where an interval begins after everything before it (same lane and
    # state) has ended: compare with the running maximum of the previous ends.
    runs = (snapped.sort([*key, "c0", "c1"])
            .with_columns(pl.col("c1").cum_max().over(key).alias("reach"))
            .with_columns(pl.col("reach").shift(1).over(key).fill_null(-1).alias("prev"))
            .with_columns((pl.col("c0") > pl.col("prev")).cum_sum().over(key).alias("run")))
    return (runs.group_by([*key, "run"])
            .agg(pl.col("c0").min(), pl.col("c1").max(), pl.col("start_ns").min(),
                 pl.col("end_ns").max(), pl.len().alias("n"))
            .sort(["lane", "state", "c0"]))


def timeline_chart(chart_id: str, title: str, frame: pl.DataFrame,
                   width: int) -> tuple[Markup | None, str]:
    """The SVG (or None when no row has a start) and a note about what was left out."""
    if frame.select(pl.col("start_ns").is_not_null().any()).item() is not True:
        return None, "No interval has a start time."
    data, t0, t1, states, note = _prepare(frame)
    span = max(t1 - t0, 1)
    for columns in GRIDS:
        rects = _merge(data, t0, span, columns)
        if rects.height <= MAX_RECTS:
            break
    if rects.height > MAX_RECTS:
        note = f"{note} The first {MAX_RECTS} spans are drawn.".strip()
        rects = rects.head(MAX_RECTS)
    lanes = data.select("lane", "td", "vcpu").unique().sort("lane").to_dicts()
    colour = _colours(states)
    legend_items = [(s, colour[s]) for s in states]
    left, right, lane_h = 120, 16, 18
    plot_w = width - left - right
    top = 14 + svg.legend_height(legend_items, plot_w) + 4
    axis_y = top + lane_h * len(lanes) + 2
    height = math.ceil(axis_y + 30)
    body = svg.legend(legend_items, left, 14, plot_w)
    step = svg.nice_step(float(span), 6)
    tick = math.ceil(t0 / step) * step
    while tick <= t1:
        x = left + (tick - t0) / span * plot_w
        body.append(svg.line(x, top, x, axis_y))
        body.append(svg.text(x, axis_y + 14, format_ns(tick), anchor="middle"))
        tick += step
    names = {}
    for lane in lanes:
        td = "—" if lane["td"] is None else str(lane["td"])
        vcpu = "—" if lane["vcpu"] is None else str(lane["vcpu"])
        names[lane["lane"]] = f"TD {td} vCPU {vcpu}"
        y = top + lane["lane"] * lane_h
        body.append(svg.rect(left, y + 2, plot_w, lane_h - 4, cls="lane"))
        body.append(svg.text(left - 8, y + 13, names[lane["lane"]], anchor="end"))
    scale = plot_w / columns
    for r in rects.iter_rows(named=True):
        y = top + r["lane"] * lane_h
        tip = (f"{names[r['lane']]} {r['state']}: {format_ns(r['start_ns'])} – "
               f"{format_ns(r['end_ns'])} ({format_int(r['n'])} intervals)")
        body.append(svg.rect(left + r["c0"] * scale, y + 2, (r["c1"] - r["c0"]) * scale,
                             lane_h - 4, fill=colour[r["state"]], tip=tip))
    body.append(svg.line(left, axis_y, left + plot_w, axis_y, cls="axis"))
    desc = (f"{len(lanes)} vCPUs from {format_ns(t0)} to {format_ns(t1)}; "
            f"{format_int(frame.height)} intervals.")
    return svg.svg_root(chart_id, title, desc, width, height, *body), note
