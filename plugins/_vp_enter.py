"""TDH.VP.ENTER as an interval: each TD_EXIT paired with its vCPU's TD_ENTRY (shared helpers).

VP.ENTER is not a SEAMCALL row: a vCPU's TD_ENTRY is written just before the call and its
TD_EXIT after it returned, so the call spans from the entry to the next exit of that vCPU.
Rows without a TD or a vCPU belong to no vCPU: such an exit is never paired (its null key
compares as unknown, never equal).
"""

from __future__ import annotations

import polars as pl

from tdxtrace.events import Kind
from tdxtrace.trace import Trace


def vcpu_key() -> pl.Expr:
    """(td, vcpu) packed in one Int64 (null when either is), so per-vCPU order is one
    integer sort key: a stable sort on it is about twice as fast as sorting on both."""
    return (pl.col("td").cast(pl.Int64) * (1 << 32) + (pl.col("vcpu").cast(pl.Int64) & 0xFFFFFFFF)
            ).alias("vkey")


def paired_exits(events: pl.LazyFrame, columns: tuple[str, ...],
                 entry_columns: tuple[str, ...]) -> pl.DataFrame:
    """Every TD_EXIT with ``columns``, plus ``entry_<c>`` for each of ``entry_columns`` taken
    from the TD_ENTRY just before it on the same vCPU (null when the vCPU's previous row is
    not an entry: the trace began with the vCPU in the guest). In seq order.

    ``events`` must be in seq order, as every trace is. The pairing itself sorts only the
    few columns it needs (the kind, the vCPU and ``entry_columns``); the exits' own columns
    are read apart, in seq order, and put beside the result: on a trace streamed from its
    file, sorting every column of every entry and exit was most of an analyzer's memory.
    """
    wanted = list(dict.fromkeys(["kind", "seq", *entry_columns]))
    after_entry = (pl.col("vkey") == pl.col("vkey").shift(1)) & (
        pl.col("kind").shift(1) == Kind.TD_ENTRY)
    entries = (
        events.filter(pl.col("kind").is_in([Kind.TD_ENTRY, Kind.TD_EXIT]))
        .select(*wanted, vcpu_key())
        # Rows come in seq order, so a stable sort on the vCPU alone lines up each vCPU's
        # rows in seq order, and its previous row is a shift rather than a window per vCPU.
        .sort("vkey", maintain_order=True)
        .with_columns(pl.when(after_entry).then(pl.col(c).shift(1)).alias(f"entry_{c}")
                      for c in entry_columns)
        .filter(pl.col("kind") == Kind.TD_EXIT)
        .select("seq", *(f"entry_{c}" for c in entry_columns))
        .sort("seq")
        .collect()
    )
    exits = events.filter(pl.col("kind") == Kind.TD_EXIT).select(columns).collect()
    # The same rows (every exit) in the same (seq) order: side by side, no join needed.
    assert exits.height == entries.height
    return pl.concat([exits, entries.drop("seq")], how="horizontal")


# What the built-in analyzers take from each pair: busy_retry all of it, seamcall_latency the
# times and status. One shape for both, so the pairing (a stable sort of every entry and exit)
# runs once per trace in memory (Trace.shared) instead of once per analyzer.
PAIR_COLUMNS = ("seq", "ts_ns", "td", "vcpu", "corr", "flow", "status")
ENTRY_COLUMNS = ("ts_ns", "seq")
PAIR_READS = ("kind", *PAIR_COLUMNS)  # the trace columns vp_enter_pairs reads


def vp_enter_pairs(trace: Trace) -> pl.DataFrame:
    """:func:`paired_exits` of every observable TD_EXIT with PAIR_COLUMNS and
    ``entry_ts_ns``/``entry_seq``; built once per trace held in memory, then shared."""
    return trace.shared("tdxtrace_plugins.vp_enter_pairs", lambda t: paired_exits(
        t.observable().select(PAIR_READS), PAIR_COLUMNS, ENTRY_COLUMNS))
