"""Why a zero-step incident happened, from KVM's fault handling (helpers for zero_step).

Each fault-handler invocation (one ``corr``: PAGE_FAULT, FAULT_RETRY*, SEAMCALLs, FAULT_DONE)
is summarised in one row, placed in the run of the exit that caused it, and the run's rows
decide the cause. The rules and their order are in :mod:`tdxtrace_plugins.zero_step`.
Only the incidents' vCPUs and pages are looked at, so a trace without incidents costs nothing.
"""

from __future__ import annotations

import polars as pl

from tdxtrace.codes import STATUS_MASK, Status
from tdxtrace.events import FaultOutcome, Kind, RetryCause

from ._values import u64
from ._zero_step_runs import NOT_SHARED, assign_segments

# A private 4K fault takes ~8 µs typically and ~153 µs under heavy load (tdx-reference §8);
# one invocation longer than this is "slow" enough for the guest to notice.
DEFAULT_SLOW_FAULT_NS = 100_000

CAUSES = ("frozen_spte_contention", "busy_on_fault_path", "stale_after_zap",
          "memory_fault_exit", "slow_fault_handling", "other")
_BUSY_CLASSES = [int(Status.OPERAND_BUSY), int(Status.OPERAND_BUSY_HOST_PRIORITY)]
_RESOLVED = [int(FaultOutcome.MAPPED), int(FaultOutcome.ALREADY_MAPPED)]


def busy_call() -> pl.Expr:
    """True for a SEAMCALL that returned OPERAND_BUSY (any operand, host priority too)."""
    return (pl.col("kind") == int(Kind.SEAMCALL)) & (
        (pl.col("status") & u64(STATUS_MASK)).is_in(_BUSY_CLASSES).fill_null(False)
    )


def fault_handling(tds: pl.Series) -> pl.Expr:
    """True for the fault-handling rows (PAGE_FAULT, FAULT_RETRY, FAULT_DONE) of ``tds``.

    With the BUSY SEAMCALLs, these are the rows :func:`incident_causes` reads; only the TDs
    with an incident can matter.
    """
    handling = [int(Kind.PAGE_FAULT), int(Kind.FAULT_RETRY), int(Kind.FAULT_DONE)]
    return pl.col("kind").is_in(handling) & pl.col("td").is_in(tds.implode())


def _page_faults(observable: pl.LazyFrame) -> pl.LazyFrame:
    return observable.filter(
        (pl.col("kind") == int(Kind.PAGE_FAULT))
        & pl.col("corr").is_not_null()
        & pl.col("td").is_not_null()
        & pl.col("vcpu").is_not_null()
    ).select("seq", "ts_ns", "td", "vcpu", "corr",
             ((pl.col("gpa") & u64(NOT_SHARED)) // 4096).alias("gfn"))


def _invocations(observable: pl.LazyFrame, page_faults: pl.LazyFrame) -> pl.LazyFrame:
    """One row per corr of ``page_faults``: start/end, outcome, FROZEN, BUSY, STALE evidence."""
    kind, sub = pl.col("kind"), pl.col("sub")
    busy = busy_call()
    retry, done = kind == int(Kind.FAULT_RETRY), kind == int(Kind.FAULT_DONE)
    handling = (
        observable.filter(retry | done | busy)
        .join(page_faults.select("corr"), on="corr", how="semi")
        .select(
            "corr", "seq", "ts_ns", sub.alias("outcome"), done.alias("_done"),
            (retry & (sub == int(RetryCause.FROZEN_SPTE))).alias("frozen"),
            ((retry & (sub == int(RetryCause.SEAMCALL_BUSY))) | busy).alias("busy"),
            (retry & (sub == int(RetryCause.STALE))).alias("stale"),
        )
    )
    evidence = handling.group_by("corr").agg(
        pl.col("frozen", "busy", "stale").sum(), pl.col("ts_ns").max().alias("_last")
    )
    outcome = (
        handling.filter("_done")
        .sort("seq")
        .unique(subset="corr", keep="last")
        .select("corr", "outcome", pl.col("ts_ns").alias("_done_ns"))
    )
    return (
        page_faults.sort("seq")
        .unique(subset="corr", keep="first")
        .join(evidence, on="corr", how="left")
        .join(outcome, on="corr", how="left")
        .with_columns(
            pl.col("ts_ns").alias("start_ns"),
            pl.coalesce("_done_ns", "_last", "ts_ns").alias("end_ns"),
            pl.col("frozen", "busy", "stale").fill_null(0),
        )
        .drop("_done_ns", "_last", "ts_ns")
    )


def _contended(invocations: pl.LazyFrame) -> pl.LazyFrame:
    """Per corr: did another invocation on the same (td, gfn) overlap it in time?

    A sweep: +1 at each start, -1 at each end, in (td, gfn, time) order with ends first at a
    tie (touching intervals do not overlap). Every (td, gfn) group sums to zero, so one global
    running sum is each group's count of open intervals. An invocation overlaps an earlier one
    iff more than itself is open at its start, and a later one iff the next start on the same
    page is before its end. The other one is necessarily another vCPU's: a vCPU handles one
    fault at a time.
    """
    page = ["td", "gfn"]
    spans = invocations.select(
        *page, "corr", "seq", "start_ns",
        # A zero-length span still has to open before it closes.
        pl.max_horizontal("end_ns", pl.col("start_ns") + 1).alias("end_ns"),
    )
    opens = spans.select(*page, "corr", pl.col("start_ns").alias("_t"), pl.lit(1).alias("_d"))
    closes = spans.select(*page, "corr", pl.col("end_ns").alias("_t"), pl.lit(-1).alias("_d"))
    open_at_start = (
        pl.concat([opens, closes])
        .sort(*page, "_t", "_d", "corr")
        .with_columns(pl.col("_d").cum_sum().alias("_open"))
        .filter(pl.col("_d") == 1)
        .select("corr", "_open")
    )
    same_page_next = (pl.col("td").shift(-1) == pl.col("td")) & (
        pl.col("gfn").shift(-1) == pl.col("gfn")
    )
    later = spans.sort(*page, "start_ns", "seq").select(
        "corr",
        (same_page_next & (pl.col("start_ns").shift(-1) < pl.col("end_ns")))
        .fill_null(False)
        .alias("_later"),
    )
    return open_at_start.join(later, on="corr", how="inner").select(
        "corr", ((pl.col("_open") > 1) | pl.col("_later")).alias("contended")
    )


def incident_causes(
    observable: pl.LazyFrame,
    segmented: pl.LazyFrame,
    incidents: pl.LazyFrame,
    slow_fault_ns: int,
) -> pl.DataFrame:
    """Per incident segment (``seg``): ``cause``, the first rule that holds, in CAUSES order,
    and ``kvm_caused``: the run had a fault KVM resumed the guest on (RESUME_GUEST), or the
    contention of causes 1 and 2."""
    # Contention is per (TD, GFN), so faults of TDs without incidents cannot matter: dropping
    # them first keeps the joins below small on a trace of many TDs.
    page_faults = _page_faults(observable).join(
        incidents.select("td").unique(), on="td", how="semi"
    )
    own = (
        assign_segments(
            segmented.join(incidents.select("vkey").unique(), on="vkey", how="semi"),
            page_faults.join(incidents.select("td", "vcpu").unique(), on=["td", "vcpu"],
                             how="semi"),
        )
        .join(incidents.select("seg"), on="seg", how="semi")
        .select("corr", "seg")
    )
    with_own = page_faults.join(own, on="corr", how="left").collect().lazy()  # read twice
    # Every fault (any vCPU) on a page the incidents faulted on: the contention candidates.
    pages = with_own.filter(pl.col("seg").is_not_null()).select("td", "gfn").unique()
    nearby = _invocations(observable, with_own.join(pages, on=["td", "gfn"], how="semi"))
    nearby_df = nearby.collect()  # read twice below
    mine = (
        nearby_df.lazy()
        .filter(pl.col("seg").is_not_null())
        .join(_contended(nearby_df.lazy()), on="corr", how="left")
        .sort("seg", "gfn", "seq")
    )
    # refault: an earlier invocation of the same run resolved this GFN, yet it faulted again.
    # Rows are sorted by (seg, gfn, seq): resolutions before this row, minus those before the
    # (seg, gfn) group began, without a window function.
    resolved = pl.col("outcome").is_in(_RESOLVED).fill_null(False).cast(pl.Int64)
    before = resolved.cum_sum() - resolved
    group_start = (pl.col("seg") != pl.col("seg").shift(1)) | (
        pl.col("gfn") != pl.col("gfn").shift(1)
    )
    before_group = pl.when(group_start.fill_null(True)).then(before).forward_fill()
    resume = pl.col("outcome") == int(FaultOutcome.RESUME_GUEST)
    evidence = (
        mine.with_columns((before - before_group > 0).alias("refault"))
        .group_by("seg")
        .agg(
            # A resumed fault that overlapped another vCPU's on its page was frozen out,
            # unless it had gone stale (then the zap, not the other vCPU, sent it back).
            ((pl.col("frozen") > 0)
             | (resume & pl.col("contended") & (pl.col("stale") == 0)).fill_null(False))
            .any().alias("_frozen"),
            (pl.col("busy") > 0).any().alias("_busy"),
            (pl.col("stale") > 0).any().alias("_stale"),
            (pl.col("outcome") == int(FaultOutcome.MEMORY_FAULT_EXIT)).fill_null(False)
            .any().alias("_attr"),
            (pl.col("refault") | ((pl.col("end_ns") - pl.col("start_ns")) > slow_fault_ns))
            .any().alias("_slow"),
            resume.fill_null(False).any().alias("_resumed"),
        )
    )
    cause = (
        pl.when("_frozen").then(pl.lit(CAUSES[0]))
        .when("_busy").then(pl.lit(CAUSES[1]))
        .when("_stale").then(pl.lit(CAUSES[2]))
        .when("_attr").then(pl.lit(CAUSES[3]))
        .when("_slow").then(pl.lit(CAUSES[4]))
        .otherwise(pl.lit(CAUSES[5]))
    )
    # KVM caused it if it handed a fault back to the guest unresolved (RESUME_GUEST) or the
    # run shows the contention it could have retried through in the host.
    kvm_caused = pl.col("_frozen") | pl.col("_busy") | pl.col("_resumed")
    return evidence.select("seg", cause.alias("cause"), kvm_caused.alias("kvm_caused")).collect()
