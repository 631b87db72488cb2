"""TDX_OPERAND_BUSY and friends: who got them, how often, how long retrying took, who held on.

A *call* is a SEAMCALL row, or a VP.ENTER attempt (a TD_EXIT row; it starts at the vCPU's
preceding TD_ENTRY). *Retry statuses* are OPERAND_BUSY (any operand), PREVIOUS_TLB_EPOCH_BUSY
and INTERRUPTED_RESUMABLE. A *retry chain* is a run of calls of one operation - same corr, TD,
vCPU, leaf and target (the GPA, else RCX such as a reclaimed page; CACHE.WB: its LP) in seq
order - in which every call but possibly the last returned a retry status, and at least one
retry happened (length >= 2). It *gave up* when its last call still failed, or when the
operation ended with a VM_BUGGED for that leaf. Time lost = last call's start - first call's.

*Holders* (who held the contended resource) are inferred from the contention matrix of the
TDX module (tdx-reference.md section 6.2): a BUSY call is attributed to a call of a leaf that
takes the resource, in the same scope (TD, GPA, vCPU, or host), whose interval [start, end)
covers the BUSY call's start. VP.ENTER intervals run from TD_ENTRY to TD_EXIT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, TypeVar

import polars as pl

from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult
from tdxtrace.codes import (
    LEAF_NAMES,
    OPERAND_NAMES,
    STATUS_CLASS_NAMES,
    TDCALL_LEAF_NAMES,
    OperandId,
    Status,
    TdcallLeaf,
)
from tdxtrace.codes import Leaf as L
from tdxtrace.events import GUEST_LEAF_BASE, Flow, Kind
from tdxtrace.trace import Trace

from ._vp_enter import paired_exits

_DIV = 1 << 32  # status // _DIV = the class half; status % _DIV = the operand ID
BUSY = int(Status.OPERAND_BUSY) // _DIV
PREV_EPOCH = int(Status.PREVIOUS_TLB_EPOCH_BUSY) // _DIV
INTERRUPTED = int(Status.INTERRUPTED_RESUMABLE) // _DIV
RETRY_CLASSES = (BUSY, PREV_EPOCH, INTERRUPTED)
PREV_EPOCH_KEY = -1  # the holder rules' operand key for PREVIOUS_TLB_EPOCH_BUSY
# Holder id of the guest's TDG.MEM.PAGE.ACCEPT (a TDCALL: kept apart from SEAMCALL leaves).
GUEST_ACCEPT = GUEST_LEAF_BASE + int(TdcallLeaf.TDG_MEM_PAGE_ACCEPT)
HOLDER_NAMES = {**LEAF_NAMES, GUEST_ACCEPT: TDCALL_LEAF_NAMES[int(TdcallLeaf.TDG_MEM_PAGE_ACCEPT)]}
MAX_ROWS = 100
FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)
CHAIN_KEY = ["corr", "td", "vcpu", "leaf_id", "target"]
HOLDER_KEY = ["op_key", "holder_leaf", "s_td", "s_vcpu", "s_gpa"]
CHAIN_SCHEMA: dict[str, pl.DataType] = {
    "corr": pl.Int64(), "td": pl.Int64(), "vcpu": pl.Int64(), "leaf": pl.String(),
    "operand": pl.String(), "flow": pl.String(), "length": pl.Int64(), "outcome": pl.String(),
    "start_ns": pl.Int64(), "lost_ns": pl.Int64(),
}

# The contention matrix (tdx-reference.md 6.2/6.3): BUSY leaves, operand keys, the leaves that
# may hold that resource (most likely first), and the scope in which they conflict.
_SHARED_SEPT = (L.TDH_MEM_SEPT_ADD, L.TDH_MEM_PAGE_AUG, L.TDH_MEM_PAGE_REMOVE, L.TDH_MEM_PAGE_ADD)
_EXCL_SEPT = (L.TDH_MEM_RANGE_BLOCK, L.TDH_MEM_SEPT_REMOVE, L.TDH_MEM_RANGE_UNBLOCK)
_KOT_EXCL = (L.TDH_MNG_CREATE, L.TDH_MNG_VPFLUSHDONE, L.TDH_MNG_KEY_FREEID)
_TDR_EXCL = (*_KOT_EXCL, L.TDH_MNG_ADDCX, L.TDH_MNG_INIT, L.TDH_MNG_KEY_CONFIG, L.TDH_MR_EXTEND,
             L.TDH_MR_FINALIZE, L.TDH_VP_INIT, L.TDH_MEM_PAGE_ADD)
_TDVPR_EXCL = (L.TDH_VP_ENTER, L.TDH_VP_FLUSH, L.TDH_VP_CREATE, L.TDH_VP_ADDCX, L.TDH_VP_INIT)
_O = OperandId
HOLDER_RULES: tuple[tuple[tuple[int, ...] | None, tuple[int, ...], tuple[int, ...], str], ...] = (
    (_SHARED_SEPT, (_O.SEPT_TREE,), (*_EXCL_SEPT, L.TDH_VP_ENTER), "td"),
    ((*_EXCL_SEPT, L.TDH_VP_ENTER), (_O.SEPT_TREE,),
     (*_EXCL_SEPT, *_SHARED_SEPT, L.TDH_VP_ENTER), "td"),
    ((*_SHARED_SEPT, *_EXCL_SEPT), (_O.SEPT_ENTRY, _O.RCX),
     (*_EXCL_SEPT, *_SHARED_SEPT, GUEST_ACCEPT), "gpa"),
    ((L.TDH_MEM_TRACK,), (_O.TD_EPOCH, PREV_EPOCH_KEY), (L.TDH_VP_ENTER,), "td"),
    ((L.TDH_VP_ENTER,), (_O.TD_EPOCH,), (L.TDH_MEM_TRACK,), "td"),
    (None, (_O.TDR,), _TDR_EXCL, "td"),
    (_KOT_EXCL, (_O.KOT,), (L.TDH_PHYMEM_CACHE_WB, *_KOT_EXCL), "host"),
    ((L.TDH_PHYMEM_CACHE_WB,), (_O.KOT,), _KOT_EXCL, "host"),
    ((L.TDH_PHYMEM_CACHE_WB,), (_O.WBCACHE,), (L.TDH_PHYMEM_CACHE_WB,), "host"),
    ((*_TDVPR_EXCL, L.TDH_VP_RD, L.TDH_VP_WR), (_O.TDVPR,), _TDVPR_EXCL, "vcpu"),
)


def holder_matrix() -> pl.DataFrame:
    """HOLDER_RULES as rows: busy_leaf, op_key, holder_leaf, priority (0 = first), scope."""
    rows = [
        (int(busy), int(op), int(holder), priority, scope)
        for busy_leaves, ops, holders, scope in HOLDER_RULES
        for busy in (busy_leaves if busy_leaves is not None else tuple(L))
        for op in ops
        for priority, holder in enumerate(holders)
    ]
    schema = {"busy_leaf": pl.Int64, "op_key": pl.Int64, "holder_leaf": pl.Int64,
              "priority": pl.Int64, "scope": pl.String}
    return pl.DataFrame(rows, schema=schema, orient="row").unique(
        ["busy_leaf", "op_key", "holder_leaf"], keep="first", maintain_order=True)


# --- naming (applied to small, aggregated frames: a Python map over distinct values) ---------
def _flow_name(v: int) -> str:
    return Flow(v).name.lower() if v in Flow._value2member_map_ else str(v)


def _operand_name(status: int) -> str:
    low = status % _DIV
    if status // _DIV != BUSY:
        return "-" if low == 0 else f"0x{low:X}"
    return OPERAND_NAMES.get(low, f"0x{low:X}")


def _class_name(status: int) -> str:
    return STATUS_CLASS_NAMES.get(status - status % _DIV, f"0x{status - status % _DIV:X}")


def _named(frame: pl.DataFrame, column: str, namer: Callable[[int], str], alias: str) -> pl.Expr:
    values = [v for v in frame[column].unique().to_list() if v is not None]
    mapping = {v: namer(v) for v in values}
    return pl.col(column).replace_strict(mapping, default="?", return_dtype=pl.String).alias(
        alias)


def _leaf(v: int) -> str:
    return LEAF_NAMES.get(v, f"LEAF_{v}")


# --- calls ------------------------------------------------------------------------------------
def _class(status: pl.Expr) -> pl.Expr:
    return status // _DIV


def calls(events: pl.LazyFrame) -> pl.DataFrame:
    """SEAMCALLs and VP.ENTER attempts with one shape: start/end, ids, status, target.

    ``start_seq`` (the seq of the row the call starts at) identifies a call. The two kinds
    are collected one after the other, so a trace streamed from its file never holds the
    SEAMCALL rows and the entry/exit rows in memory at the same time.
    """
    seamcalls = events.filter(pl.col("kind") == Kind.SEAMCALL).select(
        pl.col("ts_ns").alias("start_ns"), pl.col("seq").alias("start_seq"),
        (pl.col("ts_ns") + pl.col("dur_ns")).alias("end_ns"), "td", "vcpu", "corr",
        "flow", pl.col("leaf").cast(pl.Int64).alias("leaf_id"), "status", "gpa",
        pl.when(pl.col("leaf") == L.TDH_PHYMEM_CACHE_WB).then(pl.col("lp").cast(pl.UInt64))
        .otherwise(pl.coalesce("gpa", "arg0")).alias("target"),
    ).collect()
    # An exit without its vCPU's entry just before it (the trace began in the guest) starts
    # where it ends.
    vp_enters = paired_exits(events, ("seq", "ts_ns", "td", "vcpu", "corr", "flow", "status"),
                             ("ts_ns", "seq")).lazy().select(
        pl.coalesce("entry_ts_ns", "ts_ns").alias("start_ns"),
        pl.coalesce("entry_seq", "seq").alias("start_seq"), pl.col("ts_ns").alias("end_ns"),
        "td", "vcpu", "corr", "flow",
        pl.lit(int(L.TDH_VP_ENTER), pl.Int64).alias("leaf_id"), "status",
        pl.lit(None, pl.UInt64).alias("gpa"), pl.lit(None, pl.UInt64).alias("target"),
    ).collect()
    return pl.concat([seamcalls, vp_enters], rechunk=False).with_columns(
        _class(pl.col("status")).is_in(RETRY_CLASSES).fill_null(False).alias("retryable"))


def guest_accepts(events: pl.LazyFrame) -> pl.LazyFrame:
    """Guest TDG.MEM.PAGE.ACCEPTs that did not fail, shaped like calls (they hold the entry)."""
    return events.filter(
        (pl.col("kind") == Kind.GUEST_ACCEPT) & (pl.col("status").fill_null(0) < 1 << 63)
    ).select(
        pl.col("ts_ns").alias("start_ns"), pl.col("seq").alias("start_seq"),
        (pl.col("ts_ns") + pl.col("dur_ns")).alias("end_ns"), "td", "vcpu", "corr",
        "flow", pl.lit(GUEST_ACCEPT, pl.Int64).alias("leaf_id"), "status", "gpa",
        pl.col("gpa").alias("target"), pl.lit(False).alias("retryable"),
    )


# --- tables -----------------------------------------------------------------------------------
def by_leaf_operand(retried: pl.DataFrame) -> pl.DataFrame:
    """Retry-status calls counted by leaf x status (class and operand) x flow."""
    counts = retried.group_by("leaf_id", "status", "flow").agg(
        pl.len().cast(pl.Int64).alias("count"))
    counts = counts.sort(["count", "leaf_id", "status", "flow"],
                         descending=[True, False, False, False])
    return counts.select(
        _named(counts, "leaf_id", _leaf, "leaf"),
        _named(counts, "status", _operand_name, "operand"),
        _named(counts, "flow", _flow_name, "flow"),
        _named(counts, "status", _class_name, "status_class"),
        "count",
    )


def chains(all_calls: pl.DataFrame, bugs: pl.DataFrame) -> pl.DataFrame:
    """Every retry chain, longest first; columns CHAIN_SCHEMA plus first_seq."""
    # Only operations with a retry status somewhere can hold a chain (usually very few). Sorted
    # by operation, then call order, a row continues a chain when the previous row is the same
    # operation and returned a retry status: plain shifts, no window per operation.
    retried_ops = all_calls.filter("retryable").select(CHAIN_KEY).unique()
    # corr alone (one column, nearly unique per operation) narrows the calls cheaply before
    # the join on the whole key.
    candidates = all_calls.filter(pl.col("corr").is_in(retried_ops["corr"].implode())
                                  | pl.col("corr").is_null()).join(
        retried_ops, on=CHAIN_KEY, how="semi", nulls_equal=True)
    ordered = candidates.sort([*CHAIN_KEY, "start_seq"], nulls_last=True)
    same_op = pl.all_horizontal(pl.col(k).eq_missing(pl.col(k).shift(1)) for k in CHAIN_KEY)
    cont = (same_op & pl.col("retryable").shift(1)).fill_null(False)
    members = ordered.with_columns(cont.alias("cont")).with_columns(
        (~pl.col("cont")).cum_sum().alias("chain"),
        pl.col("cont").shift(-1, fill_value=False).alias("continued"),
    ).filter(pl.col("cont") | pl.col("continued"))  # the calls of chains of 2 or more
    found = members.group_by("chain").agg(
        *(pl.col(k).first() for k in CHAIN_KEY),
        pl.len().cast(pl.Int64).alias("length"), pl.col("start_ns").first(),
        pl.col("start_ns").last().alias("last_ns"),
        pl.col("start_seq").first().alias("first_seq"),
        pl.col("status").first().alias("first_status"),
        pl.col("status").last().alias("last_status"), pl.col("flow").first(),
        pl.col("retryable").last().alias("last_retryable"),
    ).join(bugs, on=["corr", "leaf_id"], how="left")
    failed = (pl.col("last_status").fill_null(0) // (1 << 62) != 0)  # error / non-recoverable
    bugged = (pl.col("bug_seq") > pl.col("first_seq")).fill_null(False)
    found = found.with_columns(
        pl.when(pl.col("last_retryable") | failed | bugged).then(pl.lit("gave_up"))
        .otherwise(pl.lit("success")).alias("outcome"),
        (pl.col("last_ns") - pl.col("start_ns")).alias("lost_ns"),
    ).sort(["length", "start_ns", "first_seq"], descending=[True, False, False])
    return found.select(
        pl.col("corr", "td", "vcpu").cast(pl.Int64), _named(found, "leaf_id", _leaf, "leaf"),
        _named(found, "first_status", _operand_name, "operand"),
        _named(found, "flow", _flow_name, "flow"), "length", "outcome", "start_ns", "lost_ns",
        "first_seq",
    ).cast(CHAIN_SCHEMA)  # type: ignore[arg-type]


def _scoped(frame: FrameT) -> FrameT:
    """Scope columns: the TD (unless host-wide), and the vCPU or GPA for narrower scopes."""
    scope = pl.col("scope")
    return frame.with_columns(
        pl.when(scope != "host").then(pl.col("td")).alias("s_td"),
        pl.when(scope == "vcpu").then(pl.col("vcpu")).alias("s_vcpu"),
        pl.when(scope == "gpa").then(pl.col("gpa")).alias("s_gpa"),
    )


def _points(frame: pl.DataFrame, ts: str, phase: int, delta: int, query: bool) -> pl.DataFrame:
    return frame.select(
        "gid", pl.col(ts).alias("ts"), pl.lit(phase, pl.Int8).alias("phase"),
        pl.col("start_seq").alias("order"), pl.lit(delta, pl.Int64).alias("delta"),
        (pl.col("start_seq") if query else pl.lit(None, pl.Int64)).alias("qid"),
        (pl.col("priority") if query else pl.lit(None, pl.Int64)).alias("priority"),
    )


def attribute_holders(all_calls: pl.DataFrame, accepts: pl.DataFrame) -> pl.DataFrame:
    """The BUSY and PREVIOUS_TLB_EPOCH_BUSY calls, each with its inferred ``holder_leaf``.

    ``holder_leaf`` is a SEAMCALL leaf, GUEST_ACCEPT, or null when no holder was found.

    A sweep instead of interval joins: per group (operand, holder leaf, scope), interval starts
    count +1 and ends -1 in time order; a BUSY call is covered by a holder of that leaf when
    the running count is positive at its start. Ends sort before starts at the same ns
    (intervals are half-open) and a start sorts before the query only when its row came first.
    """
    cls = _class(pl.col("status"))
    busy = all_calls.filter(cls.is_in([BUSY, PREV_EPOCH])).with_columns(
        pl.when(cls == BUSY).then((pl.col("status") % _DIV).cast(pl.Int64))
        .otherwise(pl.lit(PREV_EPOCH_KEY, pl.Int64)).alias("op_key"))
    queries = _scoped(busy.join(holder_matrix(), left_on=["leaf_id", "op_key"],
                                right_on=["busy_leaf", "op_key"]))
    # One id per group with queries, and the time span its queries cover: intervals outside
    # every group's span cannot cover a query and are dropped before the sort.
    groups = queries.group_by([*HOLDER_KEY, "scope"]).agg(
        pl.col("start_ns").min().alias("first_q"), pl.col("start_ns").max().alias("last_q"),
    ).sort(HOLDER_KEY, nulls_last=True).with_row_index("gid")
    queries = queries.join(groups.select("gid", *HOLDER_KEY), on=HOLDER_KEY, nulls_equal=True)
    holder_leaves = groups["holder_leaf"].unique().implode()
    calls_of_holders = pl.concat([
        frame.lazy().select("start_seq", "start_ns", "end_ns", "td", "vcpu", "gpa",
                            pl.col("leaf_id").alias("holder_leaf"), "retryable")
        .filter(pl.col("holder_leaf").is_in(holder_leaves) & ~pl.col("retryable")
                & (pl.col("end_ns") > pl.col("start_ns")))
        for frame in (all_calls, accepts)
    ])
    covering = (pl.col("end_ns") > pl.col("first_q")) & (pl.col("start_ns") <= pl.col("last_q"))
    near = []
    # A call can only hold a resource of its own TD, except in host-wide groups. Before a call
    # is repeated once per group of its leaf (on a trace of many TDs that join was most of
    # the time and memory), keep just the calls that overlap the time span some group of
    # their leaf (and TD) asks about.
    for host, by in ((False, ["holder_leaf", "td"]), (True, ["holder_leaf"])):
        scoped = groups.filter((pl.col("scope") == "host") == host)
        spans = scoped.group_by(pl.col("holder_leaf"), pl.col("s_td").alias("td")).agg(
            pl.col("first_q").min(), pl.col("last_q").max()).select(*by, "first_q", "last_q")
        near.append(
            calls_of_holders.join(spans.lazy(), on=by, nulls_equal=True).filter(covering)
            .drop("first_q", "last_q")
            .join(scoped.lazy().select("op_key", "holder_leaf", "scope").unique(),
                  on="holder_leaf"))
    intervals = _scoped(pl.concat(near)).join(
        groups.lazy(), on=[*HOLDER_KEY, "scope"], nulls_equal=True,
    ).filter(covering).collect()
    sweep = pl.concat([
        _points(intervals, "end_ns", 0, -1, False), _points(intervals, "start_ns", 1, 1, False),
        _points(queries, "start_ns", 1, 0, True),
    ]).sort(["gid", "ts", "phase", "order", "delta"]).with_columns(
        # Every interval's +1 and -1 fall in the same group, so each group sums to zero and
        # the running sum over the whole sorted frame is the running sum within the group.
        pl.col("delta").cum_sum().alias("active"))
    best = sweep.filter((pl.col("delta") == 0) & (pl.col("active") > 0)).group_by("qid").agg(
        pl.col("priority").min())
    chosen = best.join(queries.select(pl.col("start_seq").alias("qid"), "priority",
                                      "holder_leaf"),
                       on=["qid", "priority"])
    return busy.join(chosen.select(pl.col("qid").alias("start_seq"), "holder_leaf"),
                     on="start_seq", how="left").sort("start_seq")


def holders_table(attributed: pl.DataFrame) -> pl.DataFrame:
    """BUSY calls counted by leaf x status x inferred holder; pct within leaf x status."""
    counts = attributed.group_by("leaf_id", "status", "holder_leaf").agg(
        pl.len().cast(pl.Int64).alias("count")).with_columns(
        (pl.col("count") * 100 / pl.col("count").sum().over("leaf_id", "status")).alias("pct"),
    ).sort(["leaf_id", "status", "count", "holder_leaf"],
           descending=[False, False, True, False], nulls_last=True)
    return counts.select(
        _named(counts, "leaf_id", _leaf, "leaf"),
        _named(counts, "status", _operand_name, "operand"),
        _named(counts, "status", _class_name, "status_class"),
        pl.col("holder_leaf").replace_strict(HOLDER_NAMES, default="unresolved",
                                             return_dtype=pl.String).alias("holder"),
        "count", "pct",
    )


class BusyRetry(Analyzer):
    name: ClassVar[str] = "busy_retry"
    template: ClassVar[str | None] = "templates/busy_retry.html"
    description: ClassVar[str] = (
        "BUSY statuses by leaf and operand, retry chains, livelock candidates, inferred holders")
    columns: ClassVar[tuple[str, ...]] = (
        "seq", "ts_ns", "dur_ns", "kind", "flow", "corr", "td", "vcpu", "lp", "leaf", "status",
        "gpa", "arg0")
    key_metrics: ClassVar[tuple[str, ...]] = ("busy_total", "chains", "max_chain")
    thresholds: ClassVar[dict[str, tuple[float, float]]] = {
        "livelock_candidates": (1, 10), "gave_up": (1, 1)}

    def __init__(self, livelock_length: int = 16, livelock_lost_ns: int = 1_000_000) -> None:
        # A chain is a livelock candidate at this many calls, or when it lost more than this.
        self.livelock_length = livelock_length
        self.livelock_lost_ns = livelock_lost_ns

    def analyze(self, trace: Trace) -> AnalyzerResult:
        observable = trace.observable().select(self.columns)
        all_calls = calls(observable)
        others = observable.filter(
            pl.col("kind").is_in([Kind.VM_BUGGED, Kind.GUEST_ACCEPT])).collect().lazy()
        bugs = others.filter(pl.col("kind") == Kind.VM_BUGGED).group_by(
            "corr", pl.col("leaf").cast(pl.Int64).alias("leaf_id")).agg(
            pl.col("seq").max().alias("bug_seq")).collect()
        accepts = guest_accepts(others).collect()
        del others
        found = chains(all_calls, bugs)
        livelock = found.filter((pl.col("length") >= self.livelock_length)
                                | (pl.col("lost_ns") > self.livelock_lost_ns))
        hist = found.group_by("length").agg(pl.len().cast(pl.Int64).alias("chains")).sort(
            "length")
        attributed = attribute_holders(all_calls, accepts)
        considered = attributed.height
        resolved = considered - attributed["holder_leaf"].null_count()
        retried = all_calls.filter("retryable")  # every status counted below is a retry one
        by_class = retried.group_by(_class(pl.col("status")).alias("cls")).len()
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
            "holders_resolved_pct": resolved * 100 / considered if considered else 0.0,
        }
        tables = {
            "by_leaf_operand": by_leaf_operand(retried),
            "chains": found.head(MAX_ROWS).drop("first_seq"),
            "chain_length_hist": hist,
            "livelock": livelock.head(MAX_ROWS).drop("first_seq"),
            "holders": holders_table(attributed),
        }
        notes = (
            f"Chains and livelock list at most {MAX_ROWS} rows, longest first; livelock "
            f"candidates: length >= {self.livelock_length} or more than "
            f"{self.livelock_lost_ns} ns lost.",
            "Holders are inferred from the contention matrix and call intervals; VP.ENTER "
            "holds from TD_ENTRY to TD_EXIT (the trace cannot show zero-step mode, so a "
            "SEPT_TREE holder VP.ENTER means a vCPU was between entry and exit).",
        )
        return AnalyzerResult(metrics=metrics, tables=tables, notes=notes)


@hookimpl
def register_analyzers() -> list[Analyzer]:
    return [BusyRetry()]
