"""Who held the resource behind a BUSY: helpers for busy_retry.

*Holders* (who held the contended resource) are inferred from the contention matrix of the
TDX module (tdx-reference.md section 6.2): a BUSY call is attributed to a call of a leaf that
takes the resource, in the same scope (TD, GPA, vCPU, or host), whose interval [start, end)
covers the BUSY call's start. VP.ENTER intervals run from TD_ENTRY to TD_EXIT, and a VP.ENTER
holds the S-EPT tree only when ``stepping`` (its vCPU's zero-step GPA list was non-empty: the
module takes the tree lock on entry then, §5.1; not for an entry that ended in a synthesized
exit, before which the module releases it). A call that
returned BUSY or PREVIOUS_TLB_EPOCH_BUSY took no lock and holds nothing; one that returned
INTERRUPTED_RESUMABLE (a CACHE.WB sub-block) took its locks and did part of its work, so it
holds like any other call. When several candidates cover the BUSY, the rule's order decides,
except among the leaves that take the S-EPT tree shared (they hold it together): of those,
the call that ends last is named, the one an exclusive taker waits for.
"""

from __future__ import annotations

from typing import TypeVar

import polars as pl

from tdxtrace.codes import LEAF_NAMES, TDCALL_LEAF_NAMES, OperandId, TdcallLeaf
from tdxtrace.codes import Leaf as L
from tdxtrace.events import GUEST_LEAF_BASE

from ._status import BUSY, DIV, PREV_EPOCH, status_class

PREV_EPOCH_KEY = -1  # the holder rules' operand key for PREVIOUS_TLB_EPOCH_BUSY
# Holder id of the guest's TDG.MEM.PAGE.ACCEPT (a TDCALL: kept apart from SEAMCALL leaves).
GUEST_ACCEPT = GUEST_LEAF_BASE + int(TdcallLeaf.TDG_MEM_PAGE_ACCEPT)
HOLDER_NAMES = {**LEAF_NAMES, GUEST_ACCEPT: TDCALL_LEAF_NAMES[int(TdcallLeaf.TDG_MEM_PAGE_ACCEPT)]}
FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)
HOLDER_KEY = ["op_key", "holder_leaf", "s_td", "s_vcpu", "s_gpa"]

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


def _tier(holders: tuple[int, ...], priority: int, op: int) -> int:
    """The holder's rank when two holders cover a BUSY at once: its priority, except that the
    leaves taking the S-EPT tree *shared* tie (they can hold it together) and are told apart
    by whose call ends last, the one the module names (its shared lock keeps the latest).
    Only for the tree: an S-EPT entry's lock is exclusive, one holder at a time."""
    if op != _O.SEPT_TREE or holders[priority] not in _SHARED_SEPT:
        return priority
    return min(i for i, leaf in enumerate(holders) if leaf in _SHARED_SEPT)


def holder_matrix() -> pl.DataFrame:
    """HOLDER_RULES as rows: busy_leaf, op_key, holder_leaf, priority (0 = first), tier (see
    _tier), scope."""
    rows = [
        (int(busy), int(op), int(holder), priority, _tier(holders, priority, op), scope)
        for busy_leaves, ops, holders, scope in HOLDER_RULES
        for busy in (busy_leaves if busy_leaves is not None else tuple(L))
        for op in ops
        for priority, holder in enumerate(holders)
    ]
    schema = {"busy_leaf": pl.Int64, "op_key": pl.Int64, "holder_leaf": pl.Int64,
              "priority": pl.Int64, "tier": pl.Int64, "scope": pl.String}
    return pl.DataFrame(rows, schema=schema, orient="row").unique(
        ["busy_leaf", "op_key", "holder_leaf"], keep="first", maintain_order=True)


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
        (pl.col("tier") if query else pl.lit(None, pl.Int64)).alias("tier"),
        # An interval's start carries its end: the latest end among the intervals started so
        # far, when past the query's time, is the latest end among those still active.
        (pl.col("end_ns") if phase == 1 and delta == 1 else pl.lit(None, pl.Int64))
        .alias("end"),
    )


def _covering_some(calls: pl.DataFrame, times: pl.Series) -> pl.DataFrame:
    """The ``calls`` whose [start_ns, end_ns] contains one of ``times``: the others cannot
    cover a BUSY call's start. Two binary searches per call, eagerly (three times faster
    than the same search in a lazy filter), so the joins below see only the calls that may
    matter. Inclusive at the end: the sweep settles ties exactly. Only the kept rows are
    copied: on a trace streamed from its file, copying every call first was a peak of its own."""
    points = times.unique().sort()
    return calls.filter(points.search_sorted(calls.get_column("start_ns"))
                        < points.search_sorted(calls.get_column("end_ns"), side="right"))


def attribute_holders(all_calls: pl.DataFrame, accepts: pl.DataFrame) -> pl.DataFrame:
    """The BUSY and PREVIOUS_TLB_EPOCH_BUSY calls, each with its inferred ``holder_leaf``.

    ``holder_leaf`` is a SEAMCALL leaf, GUEST_ACCEPT, or null when no holder was found.

    A sweep instead of interval joins: per group (operand, holder leaf, scope), interval starts
    count +1 and ends -1 in time order; a BUSY call is covered by a holder of that leaf when
    the running count is positive at its start. Ends sort before starts at the same ns
    (intervals are half-open) and a start sorts before the query only when its row came first.
    """
    cls = status_class(pl.col("status"))
    busy = all_calls.filter(cls.is_in([BUSY, PREV_EPOCH])).with_columns(
        pl.when(cls == BUSY).then((pl.col("status") % DIV).cast(pl.Int64))
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
        _covering_some(frame, queries.get_column("start_ns")).lazy().select(
            "start_seq", "start_ns", "end_ns", "td", "vcpu", "gpa",
            pl.col("leaf_id").alias("holder_leaf"), "contended", "stepping",
        ).filter(pl.col("holder_leaf").is_in(holder_leaves) & ~pl.col("contended")
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
    # VP.ENTER takes the S-EPT tree only while its vCPU's zero-step GPA list is non-empty.
    sept_free_entry = (pl.col("holder_leaf") == int(L.TDH_VP_ENTER)) & (
        pl.col("op_key") == int(_O.SEPT_TREE)) & ~pl.col("stepping")
    intervals = _scoped(pl.concat(near).filter(~sept_free_entry)).join(
        groups.lazy(), on=[*HOLDER_KEY, "scope"], nulls_equal=True,
    ).filter(covering).collect()
    sweep = pl.concat([
        _points(intervals, "end_ns", 0, -1, False), _points(intervals, "start_ns", 1, 1, False),
        _points(queries, "start_ns", 1, 0, True),
    ]).sort(["gid", "ts", "phase", "order", "delta"]).with_columns(
        # Every interval's +1 and -1 fall in the same group, so each group sums to zero and
        # the running sum over the whole sorted frame is the running sum within the group.
        pl.col("delta").cum_sum().alias("active"),
        pl.col("end").cum_max().forward_fill().over("gid").alias("latest_end"))
    # Per BUSY call, of the groups with a covering holder: the lowest tier, then the holder
    # whose call ends last, then the lowest priority (one row per qid and priority).
    best = sweep.filter((pl.col("delta") == 0) & (pl.col("active") > 0)).sort(
        ["qid", "tier", "latest_end", "priority"], descending=[False, False, True, False],
    ).group_by("qid").agg(pl.col("priority").first())
    chosen = best.join(queries.select(pl.col("start_seq").alias("qid"), "priority",
                                      "holder_leaf"),
                       on=["qid", "priority"])
    return busy.join(chosen.select(pl.col("qid").alias("start_seq"), "holder_leaf"),
                     on="start_seq", how="left").sort("start_seq")
