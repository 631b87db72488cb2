"""Runs of private EPT-violation exits at one RIP, as the TDX module's zero-step logic counts them.

Helpers for :mod:`tdxtrace_plugins.zero_step` (whose docstring states the rules). Rows are
sorted once by (vCPU, seq); a segment id that is global across vCPUs then replaces every
``over(td, vcpu)`` window: a change of vCPU is just another boundary, found with ``shift``.
"""

from __future__ import annotations

import polars as pl

from tdxtrace.codes import (
    EPF_GPA_LIST_SIZE,
    EXIT_QUAL_ZERO_STEP,
    EXIT_REASON_INVALID,
    STEPPING_EPF_THRESHOLD,
    TDX_EXT_EXIT_QUAL_TYPE_ACCEPT,
    TDX_EXT_EXIT_QUAL_TYPE_MASK,
    ExitReason,
    OperandId,
    Status,
)
from tdxtrace.trace import Trace

from ._values import u64
from ._vp_enter import vcpu_key, vp_enter_pairs

# Bit 47 is the shared bit of a TD with 4-level S-EPT (GPAW 48); a GPA with it clear is private.
SHARED_BIT = 1 << 47
NOT_SHARED = 0xFFFF_FFFF_FFFF_FFFF ^ SHARED_BIT
PAGE_MASK = 0xFFFF_FFFF_FFFF_F000  # a GPA's 4K page (the module lists pages)
# What TDH.VP.ENTER returns while the zero-step GPA list is non-empty and another CPU holds the
# S-EPT tree lock; also what concurrent TDH.MEM.* calls get while such a VP.ENTER holds it.
BUSY_SEPT = int(Status.OPERAND_BUSY) | int(OperandId.SEPT_TREE)
VCPU = ("td", "vcpu")


def synthesized_exit() -> pl.Expr:
    """True for an EPT-violation exit with the module's zero-step qualification, write access
    alone (hardware always adds the linear-address bits): one the module synthesized. False
    when the row carries no qualification."""
    return ((pl.col("exit_reason") == int(ExitReason.EPT_VIOLATION))
            & (pl.col("arg0") == u64(EXIT_QUAL_ZERO_STEP))).fill_null(False)


def td_exits(pairs: pl.LazyFrame) -> pl.LazyFrame:
    """Every TD_EXIT of a known vCPU, classified, sorted by (vkey, seq).

    ``pairs`` are the TD_EXIT rows in seq order (``_vp_enter.vp_enter_pairs``).
    ``real``: VP.ENTER entered the guest (not the BUSY pseudo-exit with reason -1u);
    ``private_ept``: an EPT violation on a private GPA that the guest's ACCEPT did not cause
    (the only exits the module counts);
    ``busy_sept``: VP.ENTER returned TDX_OPERAND_BUSY|SEPT_TREE;
    ``accept_fault``: an EPT violation the guest's ACCEPT caused (left out of ``private_ept``);
    ``zero_step_qual``: :func:`synthesized_exit`, and ``qual_known``: the row carries an exit
    qualification (arg0) at all.
    """
    reason = pl.col("exit_reason")
    # The extended exit qualification (arg1) names an EPT violation the guest's ACCEPT caused:
    # the module does not count it (§5.1). Null (not recorded) counts as any other violation.
    caused_by_accept = (
        (pl.col("arg1") & u64(TDX_EXT_EXIT_QUAL_TYPE_MASK)) == TDX_EXT_EXIT_QUAL_TYPE_ACCEPT
    ).fill_null(False)
    return (
        pairs.filter(pl.col("td").is_not_null() & pl.col("vcpu").is_not_null())
        .select(
            "seq", "ts_ns", "td", "vcpu", "rip", "gpa",
            vcpu_key(),
            (reason.is_not_null() & (reason != EXIT_REASON_INVALID)).alias("real"),
            (
                (reason == int(ExitReason.EPT_VIOLATION))
                & pl.col("gpa").is_not_null()
                & ((pl.col("gpa") & u64(SHARED_BIT)) == 0)
                & ~caused_by_accept
            ).fill_null(False).alias("private_ept"),
            (pl.col("status") == u64(BUSY_SEPT)).fill_null(False).alias("busy_sept"),
            ((reason == int(ExitReason.EPT_VIOLATION)) & caused_by_accept).fill_null(False)
            .alias("accept_fault"),
            synthesized_exit().alias("zero_step_qual"),
            pl.col("arg0").is_not_null().alias("qual_known"),
        )
        # Rows come in seq order, so a stable sort on the vCPU alone is (vkey, seq) order, at
        # half the cost of sorting on both.
        .sort("vkey", maintain_order=True)
    )


def segment_exits(exits: pl.LazyFrame) -> pl.LazyFrame:
    """Real exits with ``seg`` (a new one per vCPU change or RIP move), ``fault_no``, ``moved``.

    ``fault_no`` is the position of a private EPT violation within its segment: the module's
    counter after that exit is ``min(fault_no, 6)``; from ``fault_no == 7`` on it lists GPAs.
    Non-EPT exits at the same RIP neither count nor reset (they keep the segment).
    """
    private = pl.col("private_ept").cast(pl.Int64)
    moved = (
        (pl.col("vkey") != pl.col("vkey").shift(1)).fill_null(True)
        | pl.col("rip").ne_missing(pl.col("rip").shift(1))
    )
    return (
        exits.filter(pl.col("real"))
        .with_columns(moved.alias("moved"), private.cum_sum().alias("_faults"))
        .with_columns(
            pl.col("moved").cast(pl.Int64).cum_sum().set_sorted().alias("seg"),
            (pl.col("_faults") - pl.when("moved").then(pl.col("_faults") - private).forward_fill())
            .alias("fault_no"),
        )
        .drop("_faults")
    )


def exit_segments(trace: Trace) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`td_exits` and :func:`segment_exits` of the trace's exits, from the shared VP.ENTER
    pairs; built once per trace in memory (zero_step and busy_retry both read them)."""
    def build(of: Trace) -> tuple[pl.DataFrame, pl.DataFrame]:
        exits = td_exits(vp_enter_pairs(of).lazy()).collect()
        return exits, segment_exits(exits.lazy()).collect()

    return trace.shared("tdxtrace_plugins.exit_segments", build)


def stepping_at(calls: pl.DataFrame, segmented: pl.DataFrame) -> pl.Series:
    """For each of ``calls`` (td, vcpu, start_seq), whether its vCPU's zero-step GPA list was
    non-empty then: the vCPU's latest real exit before ``start_seq`` was the 7th or a later
    private EPT violation of its run. That is when TDH.VP.ENTER takes the S-EPT tree lock
    (§5.1). Only the few vCPUs that ever listed a GPA are looked up (an as-of join)."""
    listing = pl.col("fault_no") > STEPPING_EPF_THRESHOLD
    vkeys = segmented.filter(listing).get_column("vkey").unique()
    keyed = calls.select(vcpu_key(), "start_seq").with_row_index("_row")
    wanted = keyed.filter(pl.col("vkey").is_in(vkeys.implode()))
    flags = pl.repeat(False, calls.height, dtype=pl.Boolean, eager=True).alias("stepping")
    if wanted.height:
        marks = segmented.filter(pl.col("vkey").is_in(vkeys.implode())).select(
            "vkey", pl.col("seq").alias("_exit_seq"), listing.alias("stepping")).sort("_exit_seq")
        found = wanted.sort("start_seq").join_asof(
            marks, left_on="start_seq", right_on="_exit_seq", by="vkey", strategy="backward",
            allow_exact_matches=False, check_sortedness=False).filter(pl.col("stepping"))
        flags = flags.scatter(found.get_column("_row"), True)
    return flags


def assign_segments(segmented: pl.LazyFrame, rows: pl.LazyFrame) -> pl.LazyFrame:
    """Give each of ``rows`` (td, vcpu, seq, ...) the segment of its vCPU's latest real exit.

    Rows before their vCPU's first real exit get a null ``seg``.
    """
    marks = segmented.select("vkey", "seq", "seg", pl.lit(True).alias("_mark"))
    tagged = rows.with_columns(vcpu_key(), pl.lit(False).alias("_mark"))
    mark_vkey = pl.when("_mark").then(pl.col("vkey")).forward_fill()
    return (
        pl.concat([marks, tagged], how="diagonal_relaxed")
        .sort("vkey", "seq")
        .with_columns(
            pl.when(mark_vkey == pl.col("vkey")).then(pl.col("seg").forward_fill()).alias("seg")
        )
        .filter(~pl.col("_mark"))
        .drop("_mark")
    )


def runs(exits: pl.LazyFrame, segmented: pl.LazyFrame) -> pl.LazyFrame:
    """One row per segment with at least two private EPT violations (a *run*).

    Columns: seg, vkey, td, vcpu, rip, faults, start_ns, first_seq, armed_ns (ts of the 6th
    fault, null below the threshold), end_ns (the first exit at another RIP, else the vCPU's
    last exit, BUSY ones included). Single faults are left out: nearly every segment of a busy
    trace is one, and no table or metric needs them (:func:`longest_run` gives ``max_run``).
    """
    # A segment's second fault makes it a run: selecting those first keeps the group_by below
    # to the few segments that matter (on a fault-heavy trace, ~1 in 50).
    multi = segmented.filter(pl.col("private_ept") & (pl.col("fault_no") == 2)).select("seg")
    same_vcpu_next = pl.col("vkey").shift(-1) == pl.col("vkey")
    ends = segmented.filter("moved").select(
        "seg", pl.when(same_vcpu_next).then(pl.col("ts_ns").shift(-1)).alias("_next_start")
    ).join(multi, on="seg", how="semi")
    last_exit = exits.group_by("vkey").agg(pl.col("ts_ns").max().alias("_last_exit"))
    in_runs = segmented.join(multi, on="seg", how="semi")
    # fault_no stays put on the non-EPT exits after a fault: only the fault itself arms.
    armed = in_runs.filter(
        pl.col("private_ept") & (pl.col("fault_no") == STEPPING_EPF_THRESHOLD)
    ).select(
        "seg", pl.col("ts_ns").alias("armed_ns")
    )
    per_run = (
        in_runs.filter("private_ept")
        .group_by("seg")
        .agg(
            pl.col("vkey", "td", "vcpu", "rip").first(),
            pl.len().cast(pl.Int64).alias("faults"),
            pl.col("ts_ns").min().alias("start_ns"),
            pl.col("seq").min().alias("first_seq"),
        )
    )
    return (
        per_run.join(armed, on="seg", how="left")
        .join(ends, on="seg", how="left")
        .join(last_exit, on="vkey", how="left")
        .with_columns(pl.coalesce("_next_start", "_last_exit").alias("end_ns"))
        .drop("_next_start", "_last_exit")
        .sort("seg")
    )


def longest_run(segmented: pl.LazyFrame) -> int:
    """The most private EPT violations at one RIP in a row on one vCPU (0 without any)."""
    longest = segmented.filter("private_ept").select(pl.col("fault_no").max()).collect().item()
    return int(longest) if longest is not None else 0


def listed_gpas(segmented: pl.LazyFrame) -> pl.LazyFrame:
    """Per segment: the module's GPA list and the exits it synthesized.

    The list holds the distinct pages of faults 7, 8, ... in first-seen order, at most 32.
    When every exit carries its exit qualification, the synthesized ones are those with the
    zero-step exit's (write access alone). Otherwise they are estimated: the first exit on each
    listed page is the real guest fault that listed it, and later exits on a listed page are
    counted as synthesized (VP.ENTER found the page still unmapped).
    """
    after = segmented.filter(
        pl.col("private_ept") & (pl.col("fault_no") > STEPPING_EPF_THRESHOLD)
    ).with_columns((pl.col("gpa") & u64(PAGE_MASK)).alias("page"))
    pages = (
        after.group_by("seg", "page")
        .agg(pl.col("seq").min().alias("_first"), pl.len().cast(pl.Int64).alias("_exits"),
             pl.col("zero_step_qual").sum().cast(pl.Int64).alias("_by_qual"),
             pl.col("qual_known").all().alias("_known"))
        .sort("seg", "_first")
        .with_columns(pl.int_range(1, pl.len() + 1).over("seg").alias("_rank"))
        .filter(pl.col("_rank") <= EPF_GPA_LIST_SIZE)
    )
    return pages.group_by("seg").agg(
        pl.len().cast(pl.Int64).alias("listed_gpas"),
        pl.col("page").sort_by("_first").first().alias("first_listed_gpa"),
        pl.when(pl.col("_known").all()).then(pl.col("_by_qual").sum())
        .otherwise((pl.col("_exits") - 1).sum()).cast(pl.Int64).alias("synthesized_exits"),
    )
