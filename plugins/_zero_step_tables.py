"""The summary tables of zero_step: run-length histogram, per-vCPU timeline, per-vCPU totals.

Every table has a fixed schema (also when empty) and a sorted row order.
"""

from __future__ import annotations

import polars as pl

from tdxtrace.codes import STEPPING_EPF_THRESHOLD

# The timeline is drawn per vCPU; runs are merged into this many equal time bins over the
# trace's span, one row per (bin, state), so at most 2 x TIMELINE_BINS rows per vCPU.
TIMELINE_BINS = 100
TIMELINE_SCHEMA: dict[str, pl.DataType] = {
    "td": pl.Int32(), "vcpu": pl.Int32(), "start_ns": pl.Int64(), "end_ns": pl.Int64(),
    "state": pl.String(), "runs": pl.Int64(),
}


def runs_hist(all_runs: pl.DataFrame) -> pl.DataFrame:
    """Run length -> number of runs, for runs of at least 2 faults at one RIP."""
    return (
        all_runs.filter(pl.col("faults") >= 2)
        .group_by("faults")
        .agg(pl.len().cast(pl.Int64).alias("runs"))
        .rename({"faults": "run_length"})
        .select(pl.col("run_length").cast(pl.Int64), "runs")
        .sort("run_length")
    )


def timeline(all_runs: pl.DataFrame) -> pl.DataFrame:
    """Runs of 2+ faults per vCPU, state "incident" (6+) or "fault_run", downsampled.

    Runs starting in the same bin with the same state are merged into one row spanning them
    (``runs`` says how many); bins are shared by all vCPUs so their rows line up.
    """
    shown = all_runs.filter(pl.col("faults") >= 2)
    if shown.is_empty():
        return pl.DataFrame(schema=TIMELINE_SCHEMA)
    first = int(shown.get_column("start_ns").min())  # type: ignore[arg-type]
    last = int(shown.get_column("end_ns").max())  # type: ignore[arg-type]
    span = last - first + 1
    state = (
        pl.when(pl.col("faults") >= STEPPING_EPF_THRESHOLD)
        .then(pl.lit("incident"))
        .otherwise(pl.lit("fault_run"))
    )
    return (
        shown.with_columns(
            state.alias("state"),
            ((pl.col("start_ns") - first) * TIMELINE_BINS // span).alias("_bin"),
        )
        .group_by("td", "vcpu", "_bin", "state")
        .agg(
            pl.col("start_ns").min(),
            pl.col("end_ns").max(),
            pl.len().cast(pl.Int64).alias("runs"),
        )
        .select([pl.col(c).cast(t) for c, t in TIMELINE_SCHEMA.items()])
        .sort("td", "vcpu", "start_ns", "state")
    )


def by_vcpu(incidents: pl.DataFrame, vp_busy: pl.DataFrame) -> pl.DataFrame:
    """Per vCPU with an incident or a VP.ENTER BUSY|SEPT: incidents, their faults, busy_sept.

    ``busy_sept`` counts all of the vCPU's VP.ENTER BUSY|SEPT_TREE returns, inside incidents
    or not (outside one, no run seen here was long enough to arm the module).
    """
    per_vcpu = incidents.group_by("td", "vcpu").agg(
        pl.len().cast(pl.Int64).alias("incidents"),
        pl.col("faults").sum().cast(pl.Int64).alias("faults_in_incidents"),
    )
    return (
        per_vcpu.join(vp_busy, on=["td", "vcpu"], how="full", coalesce=True)
        .select(
            pl.col("td").cast(pl.Int32),
            pl.col("vcpu").cast(pl.Int32),
            pl.col("incidents", "faults_in_incidents", "busy_sept").fill_null(0).cast(pl.Int64),
        )
        .sort("td", "vcpu")
    )
