"""mapgpa: guest MapGPA conversions, the host's RETRY answers, and how the guest coped.

A conversion is one guest ``tdx_map_gpa()`` call (GUEST_MAPGPA START) with every TDVMCALL it
issued; all of its rows share a corr. Each host answer is classified the way the Linux guest
checks it: RETRY with R11 == R12 made no progress (one of the guest's three tries used), R11
inside (R12, R12 + R13) made progress (budget reset), R11 outside [R12, R12 + R13) is a bad R11
(the guest fails at once). A trace without guest rows (recorded on a host) falls back to the
host's TDVMCALL<MapGPA> rows; the guest's give-ups are then inferred.

``bad_r11`` counts the conversions the host answered with a bad R11 at least once, including
one the trace ends in before the guest reads the answer: it is about the host.
``bad_r11_endings`` counts the conversions the guest ended because of one (outcome
``bad_r11``): it is about the guest, and equals the emulator's truth ``mapgpa_bad_r11``. The
two differ by the conversions the trace ends in before the guest read the bad answer.
"""

from __future__ import annotations

from typing import ClassVar

import polars as pl

from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult
from tdxtrace.codes import (
    EAGAIN,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    TDVMCALL_STATUS_NAMES,
    TdvmcallLeaf,
    TdvmcallStatus,
)
from tdxtrace.events import Flow, GuestMapGpa, Kind
from tdxtrace.trace import Trace

from ._mapgpa_tables import CONVERSION_SCHEMA, by_outcome_table, retry_runs_table
from ._values import signed

GUEST_RETRY_BUDGET = 3  # Linux guest: max_retries_per_page consecutive no-progress RETRYs
MAP_GPA = int(TdvmcallLeaf.MAP_GPA)
RETRY = int(TdvmcallStatus.RETRY)
COLUMNS: tuple[str, ...] = (
    "seq", "ts_ns", "dur_ns", "kind", "flow", "sub", "corr", "td", "vcpu", "gpa", "status",
    "arg0", "arg1",
)
GUEST_OUTCOMES: dict[int, str] = {
    int(GuestMapGpa.DONE): "done", int(GuestMapGpa.GIVE_UP): "gave_up",
    int(GuestMapGpa.BAD_R11): "bad_r11", int(GuestMapGpa.FAILED): "failed",
}
HOST_ONLY_NOTE = (
    "No guest rows in this trace: conversions are the host's TDVMCALL<MapGPA> sequences (one "
    "per corr). Outcomes are inferred from the last host answer; a conversion whose answers end "
    f"in {GUEST_RETRY_BUDGET} no-progress RETRYs counts as a guest give-up (the Linux guest's "
    "budget), other guests may differ."
)
BAD_R11_NOTE = (
    "The host answered RETRY with an R11 outside [R12, R12 + R13): a guest that trusted it "
    "would retry a range it never asked for; the Linux guest fails the conversion instead."
)


def _kind(kind: Kind) -> pl.Expr:
    return pl.col("kind") == int(kind)


def mapgpa_rows(events: pl.LazyFrame) -> pl.DataFrame:
    """MapGPA rows by seq, host answers annotated with the R12/R13 they answer."""
    is_mapgpa = (
        (pl.col("flow") == int(Flow.MAPGPA)) | _kind(Kind.GUEST_MAPGPA)
        | (_kind(Kind.TDVMCALL) & (pl.col("arg0") == MAP_GPA))
        | (_kind(Kind.TDVMCALL_DONE) & (pl.col("arg1") == MAP_GPA))
    )
    rows = (
        events.filter(is_mapgpa & pl.col("corr").is_not_null())
        .select(COLUMNS)
        .sort("seq")
        .collect()
    )
    call = _kind(Kind.TDVMCALL)
    rows = rows.with_columns(
        call_seq=pl.when(call).then(pl.col("seq")).forward_fill().over("corr"),
        r12=pl.when(call).then(pl.col("gpa")).forward_fill().over("corr"),
        r13=pl.when(call).then(pl.col("arg1")).forward_fill().over("corr"),
    ).with_columns(
        # What userspace said last within this TDVMCALL: EAGAIN, or 0 (chunk done).
        last_ret=pl.when(_kind(Kind.USERSPACE_RETURN)).then(pl.col("status"))
        .forward_fill().over(["corr", "call_seq"]),
    )
    r11 = pl.col("arg0")
    retry = _kind(Kind.TDVMCALL_DONE) & (pl.col("status") == RETRY)
    # Unsigned: when R11 < R12 the difference wraps to a huge value, which is also "bad".
    bad = (r11 < pl.col("r12")) | ((r11 - pl.col("r12")) >= pl.col("r13"))
    # A RETRY whose TDVMCALL is not in the trace (it started earlier) stays unclassified.
    rows = rows.with_columns(
        retry=retry,
        retry_bad=(retry & bad).fill_null(False),
        retry_no_progress=(retry & ~bad & (r11 == pl.col("r12"))).fill_null(False),
        retry_progress=(retry & ~bad & (r11 > pl.col("r12"))).fill_null(False),
        # KVM stopped between chunks because an interrupt is pending (the chunk before it
        # completed, or none ran), rather than relaying userspace's EAGAIN.
        retry_interrupt=retry & (pl.col("last_ret").is_null() | (pl.col("last_ret") == 0)),
    )
    answers = rows.filter(_kind(Kind.TDVMCALL_DONE))
    streak = (
        answers.with_columns(run=(~pl.col("retry_no_progress")).cum_sum().over("corr"))
        .group_by("corr", "run")
        .agg(length=pl.col("retry_no_progress").sum().cast(pl.Int64),
             last_seq=pl.col("seq").max())
        .group_by("corr")
        .agg(longest_no_progress=pl.col("length").max(),
             trailing_no_progress=pl.col("length").sort_by("last_seq").last())
    )
    return rows.join(streak, on="corr", how="left")


def conversions_table(rows: pl.DataFrame, guest_mode: bool) -> pl.DataFrame:
    start = _kind(Kind.GUEST_MAPGPA) & (pl.col("sub") == int(GuestMapGpa.START))
    call = _kind(Kind.TDVMCALL)
    answer = _kind(Kind.TDVMCALL_DONE)
    terminal = _kind(Kind.GUEST_MAPGPA) & pl.col("sub").is_in(list(GUEST_OUTCOMES))
    exit_ = _kind(Kind.USERSPACE_EXIT)
    grouped = rows.group_by("corr").agg(
        has_start=start.any(),
        td=pl.col("td").drop_nulls().first(),
        vcpu=pl.col("vcpu").drop_nulls().first(),
        guest_start=pl.col("gpa").filter(start).first(),
        guest_end=pl.col("arg0").filter(start).first(),
        guest_private=pl.col("arg1").filter(start).first(),
        host_start=pl.col("gpa").filter(call).first(),
        host_len=pl.col("arg1").filter(call).first(),
        exit_attrs=pl.col("arg1").filter(exit_).first(),
        tdvmcalls=call.sum().cast(pl.Int64),
        chunks=exit_.sum().cast(pl.Int64),
        retries=pl.col("retry").sum().cast(pl.Int64),
        retries_progress=pl.col("retry_progress").sum().cast(pl.Int64),
        retries_no_progress=pl.col("retry_no_progress").sum().cast(pl.Int64),
        retries_bad=pl.col("retry_bad").sum().cast(pl.Int64),
        retries_interrupt=pl.col("retry_interrupt").sum().cast(pl.Int64),
        eagain=(_kind(Kind.USERSPACE_RETURN) & (pl.col("status") == EAGAIN)).sum()
        .cast(pl.Int64),
        longest_no_progress=pl.col("longest_no_progress").first().fill_null(0),
        trailing_no_progress=pl.col("trailing_no_progress").first().fill_null(0),
        guest_outcome=pl.col("sub").filter(terminal).last(),
        last_status=pl.col("status").filter(answer).last(),
        last_bad=pl.col("retry_bad").filter(answer).last(),
        start_ns=pl.col("ts_ns").min(),
        end_ns=(pl.col("ts_ns") + pl.col("dur_ns")).max(),
    )
    if guest_mode:
        grouped = grouped.filter(pl.col("has_start"))
        start_gpa, end_gpa = pl.col("guest_start"), pl.col("guest_end")
        to_private = pl.col("guest_private") == 1
        outcome = pl.col("guest_outcome").replace_strict(
            GUEST_OUTCOMES, default="unfinished", return_dtype=pl.String)
    else:
        start_gpa = pl.col("host_start")
        end_gpa = pl.col("host_start") + pl.col("host_len")
        to_private = pl.col("exit_attrs") == KVM_MAP_GPA_RANGE_ENCRYPTED
        status = pl.col("last_status")
        outcome = (
            pl.when(status == 0).then(pl.lit("done"))
            .when((status == RETRY) & pl.col("last_bad")).then(pl.lit("bad_r11"))
            .when((status == RETRY)
                  & (pl.col("trailing_no_progress") >= GUEST_RETRY_BUDGET)).then(pl.lit("gave_up"))
            .when(status.is_not_null() & (status != RETRY)).then(pl.lit("failed"))
            .otherwise(pl.lit("unfinished"))
        )
    direction = pl.when(to_private).then(pl.lit("to_private")).when(to_private.not_()).then(
        pl.lit("to_shared"))
    status_name = pl.when(pl.col("last_status").is_not_null()).then(
        pl.col("last_status").replace_strict(TDVMCALL_STATUS_NAMES, default="unknown",
                                             return_dtype=pl.String))
    return grouped.select(
        "corr", "td", "vcpu",
        start_gpa.alias("start_gpa"), end_gpa.alias("end_gpa"),
        (signed(end_gpa) - signed(start_gpa)).alias("bytes"),
        direction.alias("direction"),
        "tdvmcalls", "chunks", "retries", "retries_progress", "retries_no_progress", "retries_bad",
        "retries_interrupt", "eagain", "longest_no_progress",
        status_name.alias("last_status"), outcome.alias("outcome"),
        "start_ns", (pl.col("end_ns") - pl.col("start_ns")).alias("dur_ns"),
    ).cast(CONVERSION_SCHEMA).sort("start_ns", "corr")


class MapGpa(Analyzer):
    name: ClassVar[str] = "mapgpa"
    template: ClassVar[str | None] = "templates/mapgpa.html"
    description: ClassVar[str] = (
        "MapGPA conversions: chunks, RETRYs with and without progress, give-ups, bad R11")
    columns: ClassVar[tuple[str, ...]] = COLUMNS
    key_metrics: ClassVar[tuple[str, ...]] = ("conversions", "retries", "giveups")
    thresholds: ClassVar[dict[str, tuple[float, float]]] = {
        "giveups": (1, 1), "bad_r11": (1, 1)}

    def analyze(self, trace: Trace) -> AnalyzerResult:
        rows = mapgpa_rows(trace.observable())
        guest_mode = rows.filter(_kind(Kind.GUEST_MAPGPA)).height > 0
        conversions = conversions_table(rows, guest_mode)
        outcome = pl.col("outcome")
        bad = (outcome == "bad_r11") | (pl.col("retries_bad") > 0)

        def total(expr: pl.Expr) -> int:
            return int(conversions.select(expr.sum()).item() or 0)

        metrics: dict[str, int | float] = {
            "conversions": conversions.height,
            "bytes": total(pl.col("bytes")),
            "chunks": total(pl.col("chunks")),
            "tdvmcalls": total(pl.col("tdvmcalls")),
            "retries": total(pl.col("retries")),
            "retries_progress": total(pl.col("retries_progress")),
            "retries_no_progress": total(pl.col("retries_no_progress")),
            "retries_interrupt": total(pl.col("retries_interrupt")),
            "giveups": total(outcome == "gave_up"),
            "bad_r11": total(bad),
            "bad_r11_endings": total(outcome == "bad_r11"),
            "failed": total(outcome == "failed"),
            "unfinished": total(outcome == "unfinished"),
            "eagain": total(pl.col("eagain")),
        }
        notes: list[str] = []
        if not guest_mode and conversions.height:
            notes.append(HOST_ONLY_NOTE)
        if total(pl.col("retries_bad")):
            notes.append(BAD_R11_NOTE)
        return AnalyzerResult(
            metrics=metrics,
            tables={
                "conversions": conversions,
                "by_outcome": by_outcome_table(conversions),
                "retry_runs": retry_runs_table(conversions),
            },
            notes=tuple(notes),
        )


@hookimpl
def register_analyzers() -> list[Analyzer]:
    return [MapGpa()]
