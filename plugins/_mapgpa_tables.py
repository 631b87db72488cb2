"""The mapgpa analyzer's table shapes and its summary tables (helper of ``mapgpa``)."""

from __future__ import annotations

import polars as pl

# Outcomes in the order a reader scans them: success first, then the ways a conversion fails.
OUTCOMES: tuple[str, ...] = ("done", "gave_up", "bad_r11", "failed", "unfinished")

CONVERSION_SCHEMA = pl.Schema({
    "corr": pl.Int64(), "td": pl.Int32(), "vcpu": pl.Int32(),
    "start_gpa": pl.UInt64(), "end_gpa": pl.UInt64(), "bytes": pl.Int64(),
    "direction": pl.String(),  # "to_private" / "to_shared"; null when the trace cannot tell
    "tdvmcalls": pl.Int64(), "chunks": pl.Int64(),  # chunks = userspace exits
    "retries": pl.Int64(),  # every RETRY answer
    "retries_progress": pl.Int64(), "retries_no_progress": pl.Int64(),
    "retries_bad": pl.Int64(),  # RETRY with R11 outside [R12, R12 + R13)
    "retries_interrupt": pl.Int64(),  # RETRY because an interrupt was pending, not EAGAIN
    "eagain": pl.Int64(),  # userspace returned EAGAIN
    "longest_no_progress": pl.Int64(),  # longest run of consecutive no-progress RETRYs
    "last_status": pl.String(),  # the host's last answer (TDVMCALL status name)
    "outcome": pl.String(),
    "start_ns": pl.Int64(), "dur_ns": pl.Int64(),
})


def by_outcome_table(conversions: pl.DataFrame) -> pl.DataFrame:
    """Conversions, bytes, TDVMCALLs and RETRYs per outcome, in OUTCOMES order."""
    rank = {name: i for i, name in enumerate(OUTCOMES)}
    return (
        conversions.group_by("outcome")
        .agg(
            conversions=pl.len().cast(pl.Int64),
            bytes=pl.col("bytes").sum(),
            tdvmcalls=pl.col("tdvmcalls").sum(),
            retries=pl.col("retries").sum(),
        )
        .sort(pl.col("outcome").replace_strict(rank, default=len(OUTCOMES)), "outcome")
    )


def retry_runs_table(conversions: pl.DataFrame) -> pl.DataFrame:
    """Histogram: how many conversions had each longest no-progress RETRY streak."""
    return (
        conversions.group_by("longest_no_progress")
        .agg(conversions=pl.len().cast(pl.Int64))
        .sort("longest_no_progress")
    )
