"""TDX_OPERAND_BUSY and friends: who got them, how often, how long retrying took, who held on.

A *call* is a SEAMCALL row, or a VP.ENTER attempt (a TD_EXIT row; it starts at the vCPU's
preceding TD_ENTRY). *Retry statuses* make KVM call again; all three are counted by leaf x
operand x flow (``by_leaf_operand``), but they mean different things:

* OPERAND_BUSY (any operand) and PREVIOUS_TLB_EPOCH_BUSY are *contention*: the call found its
  resource taken and did nothing (tdx-reference.md section 6);
* INTERRUPTED_RESUMABLE is a *resume*: the call did part of its work (one CACHE.WB sub-block)
  and KVM calls again with resume = 1, the designed protocol, up to TDX_SEAMCALL_RETRIES
  (10000) calls (section 4(c)). A normal flush of n sub-blocks is n calls.

An *operation* is the calls with the same corr, TD, vCPU, leaf and target (the GPA, else RCX
such as a reclaimed page; CACHE.WB: its LP), in seq order.

A *retry chain* (contention only) is a run of an operation's calls in which every call but
possibly the last returned a contention status, at least one retry happened (length >= 2). It
*gave up* when its last call still returned one, failed (an error other than
INTERRUPTED_RESUMABLE, which means the call got its resource), or a VM_BUGGED for that leaf
followed; else it succeeded. Time lost = last call's start - first call's. The metrics ``chains``,
``max_chain``, ``gave_up``, ``lost_ns``, ``livelock_candidates`` and the tables ``chains``,
``chain_length_hist`` and ``livelock`` describe these chains only.

A *resume chain* is a run of an operation's calls that starts at a call that returned
INTERRUPTED_RESUMABLE and in which every call but the last returned a retry status (length >=
2). It gave up when its last call still returned a retry status (the budget ran out, or a BUSY,
which KVM does not retry in CACHE.WB), failed, or was followed by a VM_BUGGED for that leaf.
Its time (``resume_ns``) runs from its first call's start to its last call's end: how long the
flush took. Figures: ``resume_chains``, ``max_resume_chain``, ``resume_gave_up``,
``resume_ns``, table ``resume_chains``.

Mixed operations: BUSY calls before the first resume form a retry chain that ends, as a
success, at the call that returned INTERRUPTED_RESUMABLE (it got its resource); the resume
chain starts there. A BUSY between two resumes stays in the resume chain (counted in its
``busy_calls``) and also forms a retry chain with the call after it, so that gap counts in
both ``lost_ns`` and ``resume_ns``.

*Holders* (who held the contended resource) are inferred from the contention matrix of the
TDX module (tdx-reference.md section 6.2): a BUSY call is attributed to a call of a leaf that
takes the resource, in the same scope (TD, GPA, vCPU, or host), whose interval [start, end)
covers the BUSY call's start. VP.ENTER intervals run from TD_ENTRY to TD_EXIT; a VP.ENTER
holds the S-EPT tree only while its vCPU is *stepping* (its zero-step GPA list is non-empty,
as zero_step reconstructs it: from the 7th private EPT violation at one RIP until progress),
since only then does the module take that lock on entry, and not when its exit is a
synthesized one (exit qualification 0x2: the module released the lock before emulating it).
A call that returned
INTERRUPTED_RESUMABLE took its locks, so it can be a holder; a BUSY call cannot.
"""

from __future__ import annotations

from typing import ClassVar

import polars as pl

from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult
from tdxtrace.codes import Leaf as L
from tdxtrace.events import Kind
from tdxtrace.trace import Trace

from ._busy_chains import CHAIN_SCHEMA as CHAIN_SCHEMA  # the tables' shapes, for users
from ._busy_chains import RESUME_SCHEMA as RESUME_SCHEMA
from ._busy_chains import chains
from ._busy_holders import GUEST_ACCEPT, HOLDER_NAMES, attribute_holders
from ._busy_names import class_name, flow_name, leaf_name, named, operand_name
from ._status import (
    BUSY,
    CONTENTION_CLASSES,
    INTERRUPTED,
    PREV_EPOCH,
    RESUME_CLASSES,
    status_class,
)
from ._values import unsigned
from ._vp_enter import vp_enter_pairs
from ._zero_step_runs import exit_segments, stepping_at, synthesized_exit

MAX_ROWS = 100


# --- calls ------------------------------------------------------------------------------------
def calls(trace: Trace, events: pl.LazyFrame) -> pl.DataFrame:
    """SEAMCALLs and VP.ENTER attempts with one shape: start/end, ids, status, target, and
    ``stepping`` (a VP.ENTER of a vCPU whose zero-step GPA list was non-empty).

    ``start_seq`` (the seq of the row the call starts at) identifies a call. The two kinds
    are collected one after the other, so a trace streamed from its file never holds the
    SEAMCALL rows and the entry/exit rows in memory at the same time. ``events`` is the
    analyzer's observable rows; the VP.ENTER pairs come from ``vp_enter_pairs(trace)``, built
    once per trace in memory and shared with seamcall_latency.
    """
    seamcalls = events.filter(pl.col("kind") == Kind.SEAMCALL).select(
        pl.col("ts_ns").alias("start_ns"), pl.col("seq").alias("start_seq"),
        (pl.col("ts_ns") + pl.col("dur_ns")).alias("end_ns"), "td", "vcpu", "corr",
        "flow", pl.col("leaf").cast(pl.Int64).alias("leaf_id"), "status", "gpa",
        pl.when(pl.col("leaf") == L.TDH_PHYMEM_CACHE_WB).then(unsigned(pl.col("lp")))
        .otherwise(pl.coalesce("gpa", "arg0")).alias("target"),
    ).collect()
    # An exit without its vCPU's entry just before it (the trace began in the guest) starts
    # where it ends.
    vp_enters = vp_enter_pairs(trace).lazy().select(
        pl.coalesce("entry_ts_ns", "ts_ns").alias("start_ns"),
        pl.coalesce("entry_seq", "seq").alias("start_seq"), pl.col("ts_ns").alias("end_ns"),
        "td", "vcpu", "corr", "flow",
        pl.lit(int(L.TDH_VP_ENTER), pl.Int64).alias("leaf_id"), "status",
        pl.lit(None, pl.UInt64).alias("gpa"), pl.lit(None, pl.UInt64).alias("target"),
        # The module released the tree before it emulated a synthesized exit, so that entry
        # holds no tree.
        synthesized_exit().alias("_synthesized"),
    ).collect()
    # Under the zero-step mitigation VP.ENTER takes the S-EPT tree lock (the holder rules).
    seamcalls = seamcalls.with_columns(pl.lit(False).alias("stepping"))
    vp_enters = vp_enters.with_columns(
        stepping_at(vp_enters, exit_segments(trace)[1]) & ~vp_enters.get_column("_synthesized")
    ).drop("_synthesized")
    cls = status_class(pl.col("status"))
    return pl.concat([seamcalls, vp_enters], rechunk=False).with_columns(
        cls.is_in(CONTENTION_CLASSES).fill_null(False).alias("contended"),
        cls.is_in(RESUME_CLASSES).fill_null(False).alias("interrupted"))


def guest_accepts(events: pl.LazyFrame) -> pl.LazyFrame:
    """Guest TDG.MEM.PAGE.ACCEPTs that did not fail, shaped like calls (they hold the entry)."""
    return events.filter(
        (pl.col("kind") == Kind.GUEST_ACCEPT) & (pl.col("status").fill_null(0) < 1 << 63)
    ).select(
        pl.col("ts_ns").alias("start_ns"), pl.col("seq").alias("start_seq"),
        (pl.col("ts_ns") + pl.col("dur_ns")).alias("end_ns"), "td", "vcpu", "corr",
        "flow", pl.lit(GUEST_ACCEPT, pl.Int64).alias("leaf_id"), "status", "gpa",
        pl.col("gpa").alias("target"), pl.lit(False).alias("stepping"),
        pl.lit(False).alias("contended"), pl.lit(False).alias("interrupted"),
    )


# --- tables -----------------------------------------------------------------------------------
def by_leaf_operand(retried: pl.DataFrame) -> pl.DataFrame:
    """Retry-status calls counted by leaf x status (class and operand) x flow."""
    counts = retried.group_by("leaf_id", "status", "flow").agg(
        pl.len().cast(pl.Int64).alias("count"))
    counts = counts.sort(["count", "leaf_id", "status", "flow"],
                         descending=[True, False, False, False])
    return counts.select(
        named(counts, "leaf_id", leaf_name, "leaf"),
        named(counts, "status", operand_name, "operand"),
        named(counts, "flow", flow_name, "flow"),
        named(counts, "status", class_name, "status_class"),
        "count",
    )


def holders_table(attributed: pl.DataFrame) -> pl.DataFrame:
    """BUSY calls counted by leaf x status x inferred holder; pct within leaf x status."""
    counts = attributed.group_by("leaf_id", "status", "holder_leaf").agg(
        pl.len().cast(pl.Int64).alias("count")).with_columns(
        (pl.col("count") * 100 / pl.col("count").sum().over("leaf_id", "status")).alias("pct"),
    ).sort(["leaf_id", "status", "count", "holder_leaf"],
           descending=[False, False, True, False], nulls_last=True)
    return counts.select(
        named(counts, "leaf_id", leaf_name, "leaf"),
        named(counts, "status", operand_name, "operand"),
        named(counts, "status", class_name, "status_class"),
        pl.col("holder_leaf").replace_strict(HOLDER_NAMES, default="unresolved",
                                             return_dtype=pl.String).alias("holder"),
        "count", "pct",
    )


class BusyRetry(Analyzer):
    name: ClassVar[str] = "busy_retry"
    template: ClassVar[str | None] = "templates/busy_retry.html"
    description: ClassVar[str] = (
        "BUSY statuses by leaf and operand, retry chains, livelock candidates, inferred holders, "
        "resume chains")
    columns: ClassVar[tuple[str, ...]] = (
        "seq", "ts_ns", "dur_ns", "kind", "flow", "corr", "td", "vcpu", "lp", "leaf", "status",
        "exit_reason", "gpa", "rip", "arg0", "arg1")
    key_metrics: ClassVar[tuple[str, ...]] = ("busy_total", "chains", "max_chain")
    thresholds: ClassVar[dict[str, tuple[float, float]]] = {
        "livelock_candidates": (1, 10), "gave_up": (1, 1), "resume_gave_up": (1, 1)}

    def __init__(self, livelock_length: int = 16, livelock_lost_ns: int = 1_000_000) -> None:
        # A chain is a livelock candidate at this many calls, or when it lost more than this.
        self.livelock_length = livelock_length
        self.livelock_lost_ns = livelock_lost_ns

    def analyze(self, trace: Trace) -> AnalyzerResult:
        observable = trace.observable().select(self.columns)
        all_calls = calls(trace, observable)
        others = observable.filter(
            pl.col("kind").is_in([Kind.VM_BUGGED, Kind.GUEST_ACCEPT])).collect().lazy()
        bugs = others.filter(pl.col("kind") == Kind.VM_BUGGED).group_by(
            "corr", pl.col("leaf").cast(pl.Int64).alias("leaf_id")).agg(
            pl.col("seq").max().alias("bug_seq")).collect()
        accepts = guest_accepts(others).collect()
        del others
        found, resumes = chains(all_calls, bugs)
        livelock = found.filter((pl.col("length") >= self.livelock_length)
                                | (pl.col("lost_ns") > self.livelock_lost_ns))
        hist = found.group_by("length").agg(pl.len().cast(pl.Int64).alias("chains")).sort(
            "length")
        attributed = attribute_holders(all_calls, accepts)
        considered = attributed.height
        resolved = considered - attributed["holder_leaf"].null_count()
        # every status counted below is a retry one
        retried = all_calls.filter(pl.col("contended") | pl.col("interrupted"))
        by_class = retried.group_by(status_class(pl.col("status")).alias("cls")).len()
        count = dict(zip(by_class["cls"].to_list(), by_class["len"].to_list(), strict=True))
        metrics: dict[str, int | float] = {
            "busy_total": count.get(BUSY, 0),
            "prev_epoch_busy": count.get(PREV_EPOCH, 0),
            "interrupted_resumable": count.get(INTERRUPTED, 0),
            "chains": found.height,
            "max_chain": int(found["length"].max() or 0),  # type: ignore[arg-type]
            "gave_up": found.filter(pl.col("outcome") == "gave_up").height,
            "lost_ns": int(found["lost_ns"].sum()),
            "livelock_candidates": livelock.height,
            "resume_chains": resumes.height,
            "max_resume_chain": int(resumes["length"].max() or 0),  # type: ignore[arg-type]
            "resume_gave_up": resumes.filter(pl.col("outcome") == "gave_up").height,
            "resume_ns": int(resumes["resume_ns"].sum()),
            "holders_resolved_pct": resolved * 100 / considered if considered else 0.0,
        }
        tables = {
            "by_leaf_operand": by_leaf_operand(retried),
            "chains": found.head(MAX_ROWS).drop("first_seq"),
            "chain_length_hist": hist,
            "livelock": livelock.head(MAX_ROWS).drop("first_seq"),
            "resume_chains": resumes.head(MAX_ROWS).drop("first_seq"),
            "holders": holders_table(attributed),
        }
        notes = (
            "Retry chains, lost_ns and livelock candidates count contention only (OPERAND_BUSY, "
            "PREVIOUS_TLB_EPOCH_BUSY). INTERRUPTED_RESUMABLE is the designed resume protocol "
            "(CACHE.WB flushes one sub-block per call): it is counted in by_leaf_operand and "
            "interrupted_resumable, and its loops are resume chains (resume_ns: first call's "
            "start to last call's end); a resume chain that gave up left its flush unfinished.",
            f"Chains and livelock list at most {MAX_ROWS} rows, longest first; resume chains "
            f"at most {MAX_ROWS}, those that gave up first; livelock "
            f"candidates: length >= {self.livelock_length} or more than "
            f"{self.livelock_lost_ns} ns lost.",
            "Holders are inferred from the contention matrix and call intervals; VP.ENTER "
            "holds from TD_ENTRY to TD_EXIT, the S-EPT tree only while its vCPU is stepping "
            "(7+ private EPT violations at one RIP, no progress since: the module's zero-step "
            "GPA list is non-empty and entry takes the tree lock), unless its exit was a "
            "synthesized one (arg0 0x2: the lock was released first). The trace cannot show how "
            "long entry held it, so a SEPT_TREE holder VP.ENTER means a stepping vCPU was "
            "between entry and exit. Of several calls holding the S-EPT tree shared at once, "
            "the one ending last is named.",
        )
        return AnalyzerResult(metrics=metrics, tables=tables, notes=notes)


@hookimpl
def register_analyzers() -> list[Analyzer]:
    return [BusyRetry()]
