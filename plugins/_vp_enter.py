"""TDH.VP.ENTER as an interval: each TD_EXIT paired with its vCPU's TD_ENTRY (shared helpers).

VP.ENTER is not a SEAMCALL row: a vCPU's TD_ENTRY is written just before the call and its
TD_EXIT after it returned, so the call spans from the entry to the next exit of that vCPU.
Rows without a TD or a vCPU belong to no vCPU: such an exit is never paired (a window would
group the null keys together, so they are left out explicitly).
"""

from __future__ import annotations

import polars as pl

from tdxtrace.events import Kind
from tdxtrace.trace import Trace


def vcpu_key() -> pl.Expr:
    """(td, vcpu) packed in one Int64 (null when either is): one key per vCPU, for a window
    or a stable sort (about twice as fast as sorting on both columns)."""
    return (pl.col("td").cast(pl.Int64) * (1 << 32) + (pl.col("vcpu").cast(pl.Int64) & 0xFFFFFFFF)
            ).alias("vkey")


def paired_exits(events: pl.LazyFrame, columns: tuple[str, ...],
                 entry_columns: tuple[str, ...]) -> pl.DataFrame:
    """Every TD_EXIT with ``columns``, plus ``entry_<c>`` for each of ``entry_columns`` taken
    from the TD_ENTRY just before it on the same vCPU (null when the vCPU's previous row is
    not an entry: the trace began with the vCPU in the guest). In seq order.

    ``events`` must be in seq order, as every trace is: a vCPU's previous row is then a
    shift within its window, and the rows never leave seq order (sorting every entry and
    exit by vCPU, and the exits back by seq, took twice as long).
    """
    def previous(name: str) -> pl.Expr:
        return pl.col(name).shift(1).over("vkey")

    after_entry = pl.col("vkey").is_not_null() & (previous("kind") == Kind.TD_ENTRY)
    return (
        events.filter(pl.col("kind").is_in([Kind.TD_ENTRY, Kind.TD_EXIT]))
        .select(*dict.fromkeys(["kind", *columns, *entry_columns]), vcpu_key())
        .with_columns(pl.when(after_entry).then(previous(c)).alias(f"entry_{c}")
                      for c in entry_columns)
        .filter(pl.col("kind") == Kind.TD_EXIT)
        .select(*columns, *(f"entry_{c}" for c in entry_columns))
        .collect()
    )


# What the built-in analyzers take from each pair: busy_retry the ids, times and status,
# seamcall_latency the times and status, zero_step (and busy_retry, through it) the exit's
# reason, RIP, GPA and exit qualifications (arg0, arg1). One shape for all, so the pairing
# (a window over every entry and exit) runs once per trace in memory (Trace.shared) instead of
# once per analyzer.
PAIR_COLUMNS = ("seq", "ts_ns", "td", "vcpu", "corr", "flow", "status", "exit_reason", "rip",
                "gpa", "arg0", "arg1")
ENTRY_COLUMNS = ("ts_ns", "seq")
PAIR_READS = ("kind", *PAIR_COLUMNS)  # the trace columns vp_enter_pairs reads


def vp_enter_pairs(trace: Trace) -> pl.DataFrame:
    """:func:`paired_exits` of every observable TD_EXIT with PAIR_COLUMNS and
    ``entry_ts_ns``/``entry_seq``; built once per trace held in memory, then shared."""
    return trace.shared("tdxtrace_plugins.vp_enter_pairs", lambda t: paired_exits(
        t.observable().select(PAIR_READS), PAIR_COLUMNS, ENTRY_COLUMNS))
