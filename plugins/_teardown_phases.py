"""Teardown rows and phases: which SEAMCALL belongs to which teardown phase of which TD.

Helper of :mod:`tdxtrace_plugins.teardown_latency`. Everything here is vectorized polars over
the (small) set of teardown rows: rows are stably sorted by ``seq`` and each row is placed in the
innermost *leaf* phase open on its TD at that moment (leaf phases never nest; RELEASE_HKID and
TEARDOWN are containers around them).
"""

from __future__ import annotations

import polars as pl

from tdxtrace.codes import Leaf, Status, status_name
from tdxtrace.events import Flow, IpiPurpose, Kind, Phase

from ._values import count, u64

# Phases drawn in the waterfall: the ones that do work themselves. TEARDOWN and RELEASE_HKID
# only contain other phases, so including them would count the same time twice.
LEAF_PHASES: tuple[Phase, ...] = (
    Phase.PRIVATE_PAGES, Phase.VP_FLUSH, Phase.VPFLUSHDONE, Phase.CACHE_WB, Phase.KEY_FREEID,
    Phase.RECLAIM_SEPT, Phase.RECLAIM_VCPU, Phase.RECLAIM_TD,
)
TEARDOWN_PHASES: tuple[Phase, ...] = (Phase.TEARDOWN, Phase.RELEASE_HKID, *LEAF_PHASES)
# Phases whose PHASE.arg0 counts pages that must come back to the host.
PAGE_PHASES: tuple[Phase, ...] = (
    Phase.PRIVATE_PAGES, Phase.RECLAIM_SEPT, Phase.RECLAIM_VCPU, Phase.RECLAIM_TD,
)
# Leaves the emulator may batch into one row with arg1 = how many identical calls it stands for.
BATCHED_LEAVES: tuple[int, ...] = (
    Leaf.TDH_PHYMEM_PAGE_RECLAIM, Leaf.TDH_MEM_RANGE_BLOCK, Leaf.TDH_MEM_TRACK,
    Leaf.TDH_MEM_PAGE_REMOVE, Leaf.TDH_PHYMEM_PAGE_WBINVD,
)
# Leaves that hand a page back to the host: REMOVE under a live HKID (late release), RECLAIM
# after the HKID is gone (early release and all control pages).
PAGE_RETURNING_LEAVES: tuple[int, ...] = (Leaf.TDH_MEM_PAGE_REMOVE, Leaf.TDH_PHYMEM_PAGE_RECLAIM)

ERROR_BIT = 1 << 63  # status bit 63: the call failed (BUSY, INTERRUPTED_RESUMABLE, ...)
STATUS_CLASS_MASK = 0xFFFFFFFF00000000
FLUSHVP_NOT_DONE = int(Status.FLUSHVP_NOT_DONE)
INTERRUPTED_RESUMABLE = int(Status.INTERRUPTED_RESUMABLE)
PAGES_PER_LEVEL = 512  # a level-1 (2M) entry covers 512 4K pages, level 2 (1G) 512 * 512

COLUMNS: tuple[str, ...] = (
    "seq", "ts_ns", "dur_ns", "kind", "flow", "sub", "corr", "td", "vcpu", "lp", "leaf",
    "status", "gpa", "level", "arg0", "arg1",
)


def status_class(col: str = "status") -> pl.Expr:
    return pl.col(col) & u64(STATUS_CLASS_MASK)


def is_error(col: str = "status") -> pl.Expr:
    return pl.col(col) >= u64(ERROR_BIT)


def _is_phase(kind: Kind, phases: tuple[Phase, ...]) -> pl.Expr:
    return (pl.col("kind") == int(kind)) & pl.col("sub").is_in([int(p) for p in phases])


def teardown_rows(events: pl.LazyFrame) -> pl.DataFrame:
    """Every teardown row with its TD (``tdk``) and leaf-phase instance (``inst``).

    ``inst`` is the seq of the PHASE row that opened the leaf phase the row ran in (null
    outside leaf phases). SEAMCALL rows also get ``calls`` (arg1 for batched rows), ``pages``
    (4K pages they cover) and ``is_retry`` (the previous call on the same operand in the
    same phase failed, so this one is a re-issue: a BUSY retry, a CACHE.WB resume, a repeated
    VPFLUSHDONE).
    """
    is_teardown_phase = pl.col("kind").is_in([int(Kind.PHASE), int(Kind.PHASE_DONE)]) & (
        pl.col("sub").is_in([int(p) for p in TEARDOWN_PHASES]))
    rows = (
        events.filter((pl.col("flow") == int(Flow.TEARDOWN)) | is_teardown_phase)
        .select(COLUMNS)
        .sort("seq")
        .collect()
    )
    # Rows that carry no td (IPIs) get it from their teardown's corr: one corr per TD.
    td_of_corr = (
        rows.filter(_is_phase(Kind.PHASE, (Phase.TEARDOWN,)) & pl.col("corr").is_not_null())
        .select("corr", pl.col("td").alias("corr_td"))
        .unique("corr", keep="first", maintain_order=True)
    )
    rows = (
        rows.join(td_of_corr, on="corr", how="left", maintain_order="left")
        .with_columns(tdk=pl.coalesce("td", "corr_td"))
        .drop("corr_td")
        .filter(pl.col("tdk").is_not_null())
    )
    opens = _is_phase(Kind.PHASE, LEAF_PHASES)
    closes = _is_phase(Kind.PHASE_DONE, LEAF_PHASES)
    open_seq = pl.when(opens).then(pl.col("seq")).forward_fill().over("tdk")
    close_seq = pl.when(closes).then(pl.col("seq")).forward_fill().over("tdk")
    rows = rows.with_columns(open_seq=open_seq, close_seq=close_seq).with_columns(
        inst=pl.when(pl.col("open_seq").is_not_null() & (
            pl.col("close_seq").is_null() | (pl.col("close_seq") < pl.col("open_seq"))))
        .then(pl.col("open_seq"))
    ).drop("open_seq", "close_seq")

    seamcall = pl.col("kind") == int(Kind.SEAMCALL)
    batched = pl.col("leaf").is_in(list(BATCHED_LEAVES))
    calls = pl.when(batched).then(count(pl.col("arg1").fill_null(1))).otherwise(1)
    level_pages = pl.lit(PAGES_PER_LEVEL, pl.Int64).pow(pl.col("level").fill_null(0))
    # CACHE.WB runs once per package, concurrently: a resume is on the same LP as its
    # interrupted call. TRACK names no GPA: it serves the page the last BLOCK blocked, so its
    # retries are the TRACKs after the same BLOCK (else a page's first TRACK would count as a
    # retry of the previous page's TRACK that KVM gave up on). Everything else retries on the
    # same (leaf, gpa, vCPU) from any LP.
    leaf = pl.col("leaf")
    retry_lp = pl.when(leaf == int(Leaf.TDH_PHYMEM_CACHE_WB)).then(pl.col("lp"))
    blocks = (leaf == int(Leaf.TDH_MEM_RANGE_BLOCK)).cast(pl.Int64).cum_sum().over("inst")
    track_page = pl.when(leaf == int(Leaf.TDH_MEM_TRACK)).then(blocks)
    prev_status = pl.col("status").shift(1).over(
        ["inst", "leaf", "gpa", "vcpu", "retry_lp", "track_page"])
    calls_frame = (
        rows.filter(seamcall & pl.col("inst").is_not_null())
        .with_columns(calls=calls, retry_lp=retry_lp, track_page=track_page)
        .with_columns(
            pages=pl.col("calls") * level_pages,
            is_retry=(prev_status >= u64(ERROR_BIT)).fill_null(False),
        )
        .select("seq", "calls", "pages", "is_retry")
    )
    return rows.join(calls_frame, on="seq", how="left", maintain_order="left")


def phase_instances(rows: pl.DataFrame) -> pl.DataFrame:
    """One row per leaf-phase instance of every TD, with its timing and the work done in it.

    The k-th PHASE of a (TD, phase) pairs with the k-th PHASE_DONE of that (TD, phase), so a
    phase that runs twice (VP_FLUSH resent after FLUSHVP_NOT_DONE) stays two instances. An
    instance without PHASE_DONE (trace ended, HKID leaked) lasts until its last observed row.
    """
    key = ["tdk", "sub"]
    nth = pl.int_range(pl.len(), dtype=pl.Int64).over(key)
    opened = rows.filter(_is_phase(Kind.PHASE, LEAF_PHASES)).select(
        "tdk", "sub", inst=pl.col("seq"), start_ns=pl.col("ts_ns"),
        work=count(pl.col("arg0")), k=nth)
    closed = rows.filter(_is_phase(Kind.PHASE_DONE, LEAF_PHASES)).select(
        "tdk", "sub", done_ts=pl.col("ts_ns"), done_dur=pl.col("dur_ns"),
        done_status=pl.col("status"), k=nth)
    seamcall = pl.col("kind") == int(Kind.SEAMCALL)
    success = ~is_error()
    returned = seamcall & pl.col("leaf").is_in(list(PAGE_RETURNING_LEAVES)) & success
    work_done = (
        rows.filter(pl.col("inst").is_not_null())
        .group_by("inst")
        .agg(
            last_end=(pl.col("ts_ns") + pl.col("dur_ns")).max(),
            calls=pl.col("calls").filter(seamcall).sum(),
            retries=pl.col("is_retry").filter(seamcall).sum().cast(pl.Int64),
            freed_pages=pl.col("pages").filter(returned).sum(),
            removes=pl.col("pages").filter(
                seamcall & (pl.col("leaf") == int(Leaf.TDH_MEM_PAGE_REMOVE))).sum(),
            reclaims=pl.col("pages").filter(
                seamcall & (pl.col("leaf") == int(Leaf.TDH_PHYMEM_PAGE_RECLAIM))).sum(),
        )
    )
    done = pl.col("done_ts").is_not_null()
    measured = pl.when(pl.col("done_dur") > 0).then(pl.col("done_dur")).otherwise(
        pl.col("done_ts") - pl.col("start_ns"))
    observed = pl.max_horizontal(pl.col("last_end").fill_null(0) - pl.col("start_ns"), 0)
    return (
        opened.join(closed, on=["tdk", "sub", "k"], how="left", maintain_order="left")
        .join(work_done, on="inst", how="left", maintain_order="left")
        .with_columns(
            pl.col("calls", "retries", "freed_pages", "removes", "reclaims")
            .fill_null(0).cast(pl.Int64),
            finished=done,
            dur_ns=pl.when(done).then(measured).otherwise(observed).cast(pl.Int64),
        )
        .drop("k", "last_end", "done_dur")
        .sort("tdk", "start_ns", "inst")
    )


def phases_table(instances: pl.DataFrame) -> pl.DataFrame:
    """The public ``phases`` table: what the report's waterfall is drawn from.

    ``status``: the PHASE_DONE's, named: the first failure the phase carried on past (a page
    KVM leaked after a TDX_BUG_ON, FLUSHVP_NOT_DONE), TDX_SUCCESS, or null if it never ended.
    """
    names = {int(p): p.name.lower() for p in LEAF_PHASES}
    # A few rows per TD: naming the distinct statuses in Python is fine.
    statuses = {s: status_name(s) for s in instances["done_status"].drop_nulls().unique()}
    return instances.select(
        pl.col("tdk").cast(pl.Int32).alias("td"),
        pl.col("sub").replace_strict(names, return_dtype=pl.String).alias("phase"),
        pl.col("start_ns").cast(pl.Int64),
        pl.col("dur_ns").cast(pl.Int64),
        pl.col("work").cast(pl.Int64),
        "calls",
        "retries",
        "finished",
        pl.col("done_status").replace_strict(statuses, default=None, return_dtype=pl.String)
        .alias("status"),
    )


def vp_flush_table(rows: pl.DataFrame) -> pl.DataFrame:
    """Per vCPU: its TDH.VP.FLUSH (on the LP it last ran on) and the IPI that carried it there.

    The IPI is the VP_FLUSH IPI to the same LP right before the call; a flush run on the local
    LP has no IPI (``ipi_ns`` 0).
    """
    vp_flush_ipi = (pl.col("kind") == int(Kind.IPI)) & (pl.col("sub") == int(IpiPurpose.VP_FLUSH))
    flush = (pl.col("kind") == int(Kind.SEAMCALL)) & (pl.col("leaf") == int(Leaf.TDH_VP_FLUSH))
    prev_is_ipi = (pl.col("kind").shift(1) == int(Kind.IPI)).over(["tdk", "lp"])
    prev_dur = pl.col("dur_ns").shift(1).over(["tdk", "lp"])
    return (
        rows.filter(vp_flush_ipi | flush)
        .with_columns(ipi_ns=pl.when(prev_is_ipi).then(prev_dur).otherwise(0))
        .filter(flush)
        .select(
            pl.col("tdk").cast(pl.Int32).alias("td"),
            pl.col("vcpu").cast(pl.Int32),
            pl.col("lp").cast(pl.Int32),
            pl.col("ts_ns").cast(pl.Int64).alias("start_ns"),
            pl.col("ipi_ns").cast(pl.Int64),
            pl.col("dur_ns").cast(pl.Int64),
            pl.col("status").cast(pl.UInt64),
        )
        .sort("td", "start_ns", "vcpu", maintain_order=True)
    )
