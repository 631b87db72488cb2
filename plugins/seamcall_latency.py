"""SEAMCALL latency per leaf, in the shape of ``perf kvm stat``: how often, how long, how busy.

Every SEAMCALL other than VP.ENTER is one row whose ``dur_ns`` is the call's execution time.
TDH.VP.ENTER is not a SEAMCALL row: its latency is the time from a vCPU's TD_ENTRY to its next
TD_EXIT (time spent in the guest plus the entry/exit cost), paired by order per (td, vCPU). A
TD_EXIT without a preceding TD_ENTRY (the trace began with the vCPU in the guest), a
TD_ENTRY without an exit (the trace ended first) and rows without a TD or vCPU are left out.
"""

from __future__ import annotations

from typing import ClassVar

import polars as pl

from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult
from tdxtrace.codes import LEAF_NAMES, Leaf
from tdxtrace.events import Kind
from tdxtrace.trace import Trace

from ._status import is_operand_busy
from ._values import count
from ._vp_enter import vp_enter_pairs

BY_LEAF_SCHEMA: dict[str, pl.DataType] = {
    "leaf": pl.String(), "leaf_id": pl.Int64(), "count": pl.Int64(), "pct": pl.Float64(),
    "min_ns": pl.Int64(), "mean_ns": pl.Float64(), "p50_ns": pl.Int64(), "p99_ns": pl.Int64(),
    "max_ns": pl.Int64(), "busy_pct": pl.Float64(),
}


def seamcall_calls(events: pl.LazyFrame) -> pl.LazyFrame:
    """One row per SEAMCALL row other than VP.ENTER: leaf_id, dur_ns, busy, calls.

    A batched row (``arg1`` = N identical calls, as teardown writes them for large TDs) stands
    for N calls of ``dur_ns / N`` each, so counts and percentiles are per call, not per row:
    it stays one row with weight ``calls`` = N (expanding it would turn the teardown of a
    400 GB TD, a few rows in the trace, into 100 M rows here).
    """
    calls = count(pl.col("arg1")).fill_null(1).clip(lower_bound=1)
    return events.filter(pl.col("kind") == Kind.SEAMCALL).select(
        pl.col("leaf").cast(pl.Int64).alias("leaf_id"),
        (pl.col("dur_ns") // calls).alias("dur_ns"),
        is_operand_busy(pl.col("status")).alias("busy"),
        calls.alias("calls"),
    )


def vp_enter_calls(pairs: pl.DataFrame) -> pl.LazyFrame:
    """One row per TD_ENTRY followed by a TD_EXIT of the same vCPU (``pairs``, see
    _vp_enter.vp_enter_pairs): leaf_id 0, dur_ns, busy, calls (always 1)."""
    return pairs.lazy().filter(pl.col("entry_ts_ns").is_not_null()).select(
        pl.lit(int(Leaf.TDH_VP_ENTER), pl.Int64).alias("leaf_id"),
        (pl.col("ts_ns") - pl.col("entry_ts_ns")).alias("dur_ns"),
        is_operand_busy(pl.col("status")).alias("busy"),
        pl.lit(1, pl.Int64).alias("calls"),
    )


def nearest_rank(values: pl.Expr, weights: pl.Expr, percent: int) -> pl.Expr:
    """The nearest-rank percentile: the value at rank ceil(percent * n / 100), in integers,
    where each value stands for ``weights`` calls and n is their sum.

    The group's rows must be in ``values`` order (by_leaf sorts them once for all groups
    and percentiles instead of sorting each group per percentile).
    """
    rank = ((weights.sum() * percent + 99) // 100).clip(lower_bound=1)
    covered = weights.cum_sum()  # calls at or below each value
    return values.filter(covered >= rank).first().cast(pl.Int64)


def unit_nearest_ranks(calls: pl.DataFrame, percents: tuple[int, ...]) -> pl.DataFrame:
    """:func:`nearest_rank` of ``dur_ns`` when every row is one call: leaf_id and one
    ``p<percent>_ns`` column per percent, for each leaf of ``calls``.

    Each value is found by selection (``quantile`` at the exact position of the rank, O(n))
    instead of sorting the leaf's values (O(n log n), most of this analyzer's time). The loop
    is over leaves (a few dozen), not calls.
    """
    rows = []
    parts = calls.select("leaf_id", "dur_ns").partition_by("leaf_id", as_dict=True)
    for (leaf_id,), part in parts.items():
        values = part.get_column("dur_ns")
        ranks = [max((len(values) * p + 99) // 100, 1) for p in percents]
        rows.append((leaf_id, *values_at_ranks(values, ranks)))
    schema = {"leaf_id": pl.Int64, **{f"p{p}_ns": pl.Int64 for p in percents}}
    return pl.DataFrame(rows, schema=schema, orient="row")


def values_at_ranks(values: pl.Series, ranks: list[int]) -> list[int | None]:
    """``values.sort()[rank - 1]`` (nulls sort first) for each rank, without sorting: the
    nearest-rank quantile at the position of the rank among the non-null values. A float
    position ``i / (m - 1)`` rounds back to exactly ``i``; values beyond 2^53 (no exact
    float) are sorted instead. Nulls, minimum and maximum are counted once for all ranks."""
    nulls = values.null_count()
    present = len(values) - nulls
    if present == 0:
        return [None] * len(ranks)
    low, high = values.min(), values.max()
    assert isinstance(low, int) and isinstance(high, int)
    exact = max(-low, high) < 1 << 53
    ordered = None if exact else values.sort()
    picked: list[int | None] = []
    for rank in ranks:
        if rank <= nulls:
            picked.append(None)
            continue
        if ordered is not None:
            value = ordered[rank - 1]
        else:
            index = rank - 1 - nulls
            value = values.quantile(index / (present - 1) if present > 1 else 0.0, "nearest")
        assert value is not None
        picked.append(int(value))
    return picked


def by_leaf(calls: pl.DataFrame) -> pl.DataFrame:
    """The per-leaf table from calls (leaf_id, dur_ns, busy, calls); columns as BY_LEAF_SCHEMA.

    Each row stands for ``calls`` calls of ``dur_ns`` each.
    """
    if calls.height == 0:
        return pl.DataFrame(schema=BY_LEAF_SCHEMA)
    total = int(calls["calls"].sum())
    dur, weight = pl.col("dur_ns"), pl.col("calls")
    table = calls.group_by("leaf_id").agg(
        weight.sum().cast(pl.Int64).alias("count"),
        dur.min().alias("min_ns"),
        ((dur * weight).sum() / weight.sum()).alias("mean_ns"),
        dur.max().alias("max_ns"),
        ((pl.col("busy").cast(pl.Int64) * weight).sum() / weight.sum() * 100).alias("busy_pct"),
        (weight.max() == 1).alias("_unit"),
    )
    # Percentiles: leaves made only of single calls (nearly all) rank their sorted values;
    # the few leaves with batched rows sort their rows by duration and weigh them.
    unit_leaves = table.filter("_unit")["leaf_id"].implode()
    in_unit = pl.col("leaf_id").is_in(unit_leaves, nulls_equal=True)
    unit = unit_nearest_ranks(calls.filter(in_unit), (50, 99))
    # Groups see their rows in frame order: sorted by duration, each group is too.
    weighed = calls.filter(~in_unit).sort("dur_ns").group_by("leaf_id").agg(
        nearest_rank(dur, weight, 50).alias("p50_ns"),
        nearest_rank(dur, weight, 99).alias("p99_ns"))
    table = table.join(pl.concat([unit, weighed]), on="leaf_id", how="left", nulls_equal=True)
    return table.with_columns(
        pl.col("leaf_id").replace_strict(
            LEAF_NAMES, default=pl.format("LEAF_{}", pl.col("leaf_id")),
            return_dtype=pl.String).fill_null("unknown").alias("leaf"),
        (pl.col("count") * 100 / total).alias("pct"),
    ).select(
        [pl.col(name).cast(dtype) for name, dtype in BY_LEAF_SCHEMA.items()]
    ).sort(["count", "leaf_id"], descending=[True, False], nulls_last=True)


class SeamcallLatency(Analyzer):
    name: ClassVar[str] = "seamcall_latency"
    template: ClassVar[str | None] = "templates/seamcall_latency.html"
    description: ClassVar[str] = (
        "SEAMCALL count, share, latency (min/mean/p50/p99/max) and BUSY share per leaf")
    columns: ClassVar[tuple[str, ...]] = (
        "seq", "ts_ns", "dur_ns", "kind", "td", "vcpu", "corr", "flow", "leaf", "status",
        "exit_reason", "gpa", "rip", "arg0", "arg1")
    key_metrics: ClassVar[tuple[str, ...]] = ("seamcalls", "busy")

    def analyze(self, trace: Trace) -> AnalyzerResult:
        events = trace.observable().select(self.columns)
        calls = pl.concat([seamcall_calls(events), vp_enter_calls(vp_enter_pairs(trace))]).collect()
        table = by_leaf(calls)
        metrics: dict[str, int | float] = {
            "seamcalls": int(calls["calls"].sum()),
            "busy": int(calls.select((pl.col("busy").cast(pl.Int64) * pl.col("calls")).sum())
                        .item()),
            "leaves": table.height,
        }
        notes = (
            "TDH.VP.ENTER latency is TD_ENTRY to TD_EXIT of the same vCPU, time in the guest "
            "included; busy means TDX_OPERAND_BUSY with any operand.",
            "A batched SEAMCALL row (arg1 = N identical calls) counts as N calls of dur/N: "
            "for a leaf with such rows (teardown's BLOCK, TRACK, REMOVE, WBINVD, RECLAIM "
            "beyond teardown.row_pages), min, percentiles and max are of batch means, "
            "narrower than the calls' real spread; set teardown.row_pages higher to see it.",
        )
        return AnalyzerResult(metrics=metrics, tables={"by_leaf": table}, notes=notes)


@hookimpl
def register_analyzers() -> list[Analyzer]:
    return [SeamcallLatency()]
