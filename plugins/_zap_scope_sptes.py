"""Zapped SPTEs, the zap each belongs to, and the faults that came back for them.

Helpers for :mod:`tdxtrace_plugins.zap_scope` (whose docstring states the rules). All of it is
sorts, forward fills and shifts over small keys; nothing joins rows against time ranges.
"""

from __future__ import annotations

import polars as pl

from tdxtrace.codes import FROZEN_SPTE, SHADOW_NONPRESENT_VALUE
from tdxtrace.events import Kind, RootEvent, RootKind, ZapReason, ZapScope

from ._values import count, u64

SHARED_BIT = 1 << 47  # 4-level S-EPT shared bit; stripped so a GFN names one page of the TD
NOT_SHARED = 0xFFFF_FFFF_FFFF_FFFF ^ SHARED_BIT
LARGE_PAGE_BIT = 1 << 7  # SPTE bit 7: a 2M/1G SPTE maps a page instead of a table
UNATTRIBUTED = "unattributed"
UNLISTED_ROOT = "unlisted"  # SPTEs a ZAP_DONE reports beyond its SPTE_CHANGED rows
REASON_NAMES = {int(m): m.name.lower() for m in ZapReason}
SCOPE_NAMES = {int(m): m.name.lower() for m in ZapScope}
ROOT_NAMES = {int(m): m.name.lower() for m in RootKind}


def name_of(column: str, names: dict[int, str]) -> pl.Expr:
    """Enum number -> lower-case name; an unknown number keeps its decimal text."""
    col = pl.col(column)
    return col.replace_strict(names, default=col.cast(pl.String), return_dtype=pl.String)


def _present(spte: pl.Expr) -> pl.Expr:
    return (spte.is_not_null() & (spte != 0) & ((spte & u64(SHADOW_NONPRESENT_VALUE)) == 0))


def _is_leaf(level: pl.Expr, spte: pl.Expr) -> pl.Expr:
    # KVM's is_last_spte(): a 4K SPTE, or a large one with the page-size bit.
    return ((level == 0) | ((spte & u64(LARGE_PAGE_BIT)) != 0)).fill_null(False)


def gfn_of(gpa: pl.Expr) -> pl.Expr:
    return (gpa & u64(NOT_SHARED)) // 4096


def zap_ops(observable: pl.LazyFrame) -> pl.LazyFrame:
    """ZAP rows, each with the ZAP_DONE that ended it (the k-th ZAP_DONE of the same corr)."""
    nth = pl.int_range(pl.len()).over("corr").alias("_nth")
    begins = observable.filter(pl.col("kind") == int(Kind.ZAP)).sort("seq").with_columns(nth)
    ends = (
        observable.filter((pl.col("kind") == int(Kind.ZAP_DONE)) & pl.col("corr").is_not_null())
        .sort("seq")
        .with_columns(nth)
        .select("corr", "_nth", pl.col("ts_ns").alias("_done_ns"),
                count(pl.col("arg0")).alias("reported_sptes"),
                count(pl.col("arg1")).alias("reported_private"))
    )
    return (
        begins.join(ends, on=["corr", "_nth"], how="left")
        .select(
            pl.col("seq").alias("zap_seq"), "corr", "td",
            name_of("sub", REASON_NAMES).alias("reason"),
            name_of("arg1", SCOPE_NAMES).alias("scope"),
            "gpa", count(pl.col("arg0")).alias("pages"), pl.col("ts_ns").alias("start_ns"),
            (pl.col("_done_ns") - pl.col("ts_ns")).alias("dur_ns"),
            "reported_sptes", "reported_private",
        )
    )


def zap_totals(zaps: pl.LazyFrame, zapped: pl.LazyFrame) -> pl.LazyFrame:
    """Per zap: SPTEs and private leaves zapped, from its rows and from its ZAP_DONE.

    A producer may batch many pages into one row (teardown does), leaving SPTE_CHANGED rows
    for only some of them; ZAP_DONE still reports the totals. What it reports beyond the rows
    is ``batched_private`` (private leaves: mirror-root leaves by definition) and
    ``batched_other`` (SPTEs of a root the trace does not say).
    """
    seen = zapped.group_by("zap_seq").agg(
        pl.len().cast(pl.Int64).alias("_seen"),
        pl.col("private_leaf").sum().cast(pl.Int64).alias("_seen_private"),
    )
    zero = pl.lit(0, dtype=pl.Int64)
    batched_private = pl.max_horizontal(
        pl.col("reported_private").fill_null(0) - pl.col("_seen_private"), zero
    )
    batched_other = pl.max_horizontal(
        (pl.col("reported_sptes") - pl.col("reported_private")).fill_null(0)
        - (pl.col("_seen") - pl.col("_seen_private")),
        zero,
    )
    return (
        zaps.join(seen, on="zap_seq", how="left")
        .with_columns(pl.col("_seen", "_seen_private").fill_null(0))
        .with_columns(batched_private.alias("batched_private"),
                      batched_other.alias("batched_other"))
        .with_columns(
            (pl.col("_seen") + pl.col("batched_private") + pl.col("batched_other"))
            .alias("sptes_zapped"),
            (pl.col("_seen_private") + pl.col("batched_private")).alias("private_leaves"),
        )
        .drop("_seen", "_seen_private")
    )


def batched_by_reason_root(totals: pl.LazyFrame) -> pl.LazyFrame:
    """The batched SPTEs of ``zap_totals`` as (reason, root_kind) rows like the listed ones."""
    private = totals.select(
        "reason", pl.lit(ROOT_NAMES[int(RootKind.MIRROR)]).alias("root_kind"),
        *(pl.col("batched_private").alias(c)
          for c in ("sptes_zapped", "leaf_sptes", "private_leaves")),
    )
    other = totals.select(
        "reason", pl.lit(UNLISTED_ROOT).alias("root_kind"),
        pl.col("batched_other").alias("sptes_zapped"),
        pl.lit(0, dtype=pl.Int64).alias("leaf_sptes"),
        pl.lit(0, dtype=pl.Int64).alias("private_leaves"),
    )
    return pl.concat([private, other]).filter(pl.col("sptes_zapped") > 0)


def zapping_spte() -> pl.Expr:
    """True for an SPTE_CHANGED row that zaps: a present SPTE becomes non-present (but not
    FROZEN_SPTE, which is a fault freezing the entry)."""
    old, new = pl.col("arg0"), pl.col("arg1")
    return (
        (pl.col("kind") == int(Kind.SPTE_CHANGED))
        & _present(old)
        & ((new & u64(SHADOW_NONPRESENT_VALUE)) != 0).fill_null(False)
        & (new != u64(FROZEN_SPTE)).fill_null(False)
    )


def owned_by_zap(rows: pl.LazyFrame, zaps: pl.LazyFrame) -> pl.LazyFrame:
    """``rows`` (with seq and corr) and ``zap_seq``: the latest ZAP of their corr before them
    (a zap's rows share its corr, and several zaps may), null without one."""
    marks = zaps.filter(pl.col("corr").is_not_null()).select(
        pl.col("zap_seq").alias("seq"), "corr", "zap_seq", pl.lit(False).alias("_row")
    )
    return (
        pl.concat([marks, rows.with_columns(pl.lit(True).alias("_row"))],
                  how="diagonal_relaxed")
        .sort("seq")
        .with_columns(
            pl.when(pl.col("corr").is_not_null())
            .then(pl.col("zap_seq").forward_fill().over("corr"))
            .alias("zap_seq")
        )
        .filter(pl.col("_row"))
        .drop("_row")
    )


def zapped_sptes(observable: pl.LazyFrame, zaps: pl.LazyFrame) -> pl.LazyFrame:
    """SPTE_CHANGED rows that zap a present SPTE, each with the zap it belongs to.

    A row belongs to the latest ZAP of its ``corr`` before it (a zap's rows share its corr);
    rows with no such ZAP keep ``zap_seq`` null and reason ``"unattributed"``.
    Columns: seq, ts_ns, flow, corr, td, gpa, gfn, root_kind, leaf, private_leaf, zap_seq,
    reason.
    """
    old = pl.col("arg0")
    zapped = (
        observable.filter(zapping_spte())
        .with_columns(
            _is_leaf(pl.col("level"), old).alias("leaf"),
            (pl.col("sub") == int(RootKind.MIRROR)).alias("_mirror"),
            name_of("sub", ROOT_NAMES).alias("root_kind"),
            gfn_of(pl.col("gpa")).alias("gfn"),
        )
        .with_columns((pl.col("leaf") & pl.col("_mirror")).alias("private_leaf"))
        .select("seq", "ts_ns", "flow", "corr", "td", "gpa", "gfn", "root_kind", "leaf",
                "private_leaf")
    )
    return owned_by_zap(zapped, zaps).join(
        zaps.select("zap_seq", pl.col("td").alias("_zap_td"), "reason"), on="zap_seq",
        how="left",
    ).with_columns(
        pl.coalesce("td", "_zap_td").alias("td"),
        pl.col("reason").fill_null(UNATTRIBUTED),
    ).drop("_zap_td")


def refaults(observable: pl.LazyFrame, zapped: pl.LazyFrame, zap_rows: pl.LazyFrame,
             zaps: pl.LazyFrame) -> pl.LazyFrame:
    """One row per zapped page whose next event on the same (td, gfn) is a PAGE_FAULT.

    A zapped page is one (zap, td, gfn) with a zapped leaf SPTE, zapped at its first such row;
    but a zap that invalidates the direct root (a ROOT INVALIDATED row that belongs to it:
    same corr, after it and before the corr's next ZAP; a fast zap) takes the direct root's
    pages away right then, since a vCPU reloads a new root and faults before the old root's
    SPTEs are torn down. Installs are not accesses: KVM installs what a fault asked for, and
    a fault raised before a zap may only finish after it. ``zap_rows`` holds the ROOT rows,
    ``zaps`` is :func:`zap_ops`. Columns: reason, delay_ns (fault ts - zap ts).
    """
    invalidations = zap_rows.filter(
        (pl.col("kind") == int(Kind.ROOT)) & (pl.col("sub") == int(RootEvent.INVALIDATED))
        & (pl.col("arg0") == int(RootKind.DIRECT)) & pl.col("corr").is_not_null()
    ).select("seq", "ts_ns", "corr")
    invalidated = (
        owned_by_zap(invalidations, zaps)  # an invalidation belongs to a zap as SPTE rows do
        .filter(pl.col("zap_seq").is_not_null())
        .group_by("zap_seq")
        .agg(pl.col("seq").min().alias("_inv_seq"), pl.col("ts_ns").min().alias("_inv_ns"))
        .with_columns(pl.lit(ROOT_NAMES[int(RootKind.DIRECT)]).alias("root_kind"))
    )
    pages = (
        zapped.filter(pl.col("leaf") & pl.col("td").is_not_null())
        .join(invalidated, on=["zap_seq", "root_kind"], how="left")
        .group_by("zap_seq", "td", "gfn", "reason")
        .agg(pl.coalesce("_inv_seq", "seq").min().alias("seq"),
             pl.coalesce("_inv_ns", "ts_ns").min().alias("ts_ns"))
        .select("seq", "ts_ns", "td", "gfn", "reason", pl.lit(True).alias("_zap"))
    )
    accesses = (
        observable.filter(
            pl.col("td").is_not_null()
            & pl.col("gpa").is_not_null()
            & (pl.col("kind") == int(Kind.PAGE_FAULT))
        )
        .select("seq", "ts_ns", "td", gfn_of(pl.col("gpa")).alias("gfn"),
                pl.lit(False).alias("_zap"))
    )
    # Only pages that were zapped matter: keeps the sort below small. The GFN alone (one
    # column) narrows the accesses cheaply before the join on (td, gfn).
    zapped_pages = pages.select("td", "gfn").unique().collect()
    accesses = accesses.filter(pl.col("gfn").is_in(zapped_pages["gfn"].implode())).join(
        zapped_pages.lazy(), on=["td", "gfn"], how="semi")
    stream = pl.concat([pages, accesses], how="diagonal_relaxed").sort("td", "gfn", "seq")
    same_page_next = (pl.col("td").shift(-1) == pl.col("td")) & (
        pl.col("gfn").shift(-1) == pl.col("gfn")
    )
    return (
        stream.with_columns(
            (same_page_next & ~pl.col("_zap").shift(-1)).fill_null(False).alias("_accessed"),
            (pl.col("ts_ns").shift(-1) - pl.col("ts_ns")).alias("delay_ns"),
        )
        .filter(pl.col("_zap") & pl.col("_accessed"))
        .select("reason", "delay_ns")
    )
