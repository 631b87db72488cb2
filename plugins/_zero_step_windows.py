"""Points against time windows, by sort-merge instead of a join (helpers for zero_step).

Counting "rows that fall inside an incident's window" with a join on the TD and a filter costs
rows x incidents per TD. Here windows and points are merged into one stream sorted by time and
a running sum is read off at each window boundary or point: one sort, linear after it.

A window is closed on both ends: a point at exactly ``start`` or ``end`` is inside it. Within one
timestamp, starts sort before points and ends after them, which is what makes that true.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

_START, _POINT, _END = 0, 1, 2


def _stream(
    points: pl.LazyFrame, windows: pl.LazyFrame, by: Sequence[str], window_key: str
) -> pl.LazyFrame:
    """One time-ordered stream of window starts, points and window ends, per ``by`` group."""
    keys = list(by)
    starts = windows.select(
        *keys, pl.col(window_key), pl.col("start_ns").alias("_t"), pl.lit(_START).alias("_o")
    )
    ends = windows.select(
        *keys, pl.col(window_key), pl.col("end_ns").alias("_t"), pl.lit(_END).alias("_o")
    )
    pts = points.select(
        *keys, pl.col("seq"), pl.col("ts_ns").alias("_t"), pl.lit(_POINT).alias("_o")
    )
    merged = pl.concat([starts, pts, ends], how="diagonal_relaxed")
    return merged.sort([*keys, "_t", "_o", window_key, "seq"], nulls_last=True)


def count_points_in_windows(
    points: pl.LazyFrame, windows: pl.LazyFrame, by: Sequence[str], window_key: str
) -> pl.LazyFrame:
    """Per window (``window_key``): how many points of the same ``by`` group lie in it.

    ``points`` needs ``by`` columns, ``seq`` and ``ts_ns``; ``windows`` needs ``by`` columns,
    ``window_key`` (unique), ``start_ns`` and ``end_ns``. Returns ``window_key``, ``points``.
    """
    keys = list(by)
    running = _stream(points, windows, keys, window_key).with_columns(
        (pl.col("_o") == _POINT).cast(pl.Int64).cum_sum().over(keys).alias("_seen")
    )
    at_start = running.filter(pl.col("_o") == _START).select(
        window_key, pl.col("_seen").alias("_before")
    )
    at_end = running.filter(pl.col("_o") == _END).select(
        window_key, pl.col("_seen").alias("_upto")
    )
    return at_start.join(at_end, on=window_key, how="inner").select(
        window_key, (pl.col("_upto") - pl.col("_before")).alias("points")
    )


def windows_open_at_points(
    points: pl.LazyFrame, windows: pl.LazyFrame, by: Sequence[str], window_key: str
) -> pl.LazyFrame:
    """Per point (``seq``): how many windows of the same ``by`` group contain it.

    Returns ``seq`` and ``open``; points whose group has no window get 0.
    """
    keys = list(by)
    delta = (
        pl.when(pl.col("_o") == _START).then(1).when(pl.col("_o") == _END).then(-1).otherwise(0)
    )
    running = _stream(points, windows, keys, window_key).with_columns(
        delta.cast(pl.Int64).cum_sum().over(keys).alias("_open")
    )
    return running.filter(pl.col("_o") == _POINT).select("seq", pl.col("_open").alias("open"))
