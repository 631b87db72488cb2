"""Non-leaf S-EPT rows name the GPA of the entry, not the faulting one (KVM passes
gfn_to_gpa(iter->gfn) to TDH.MEM.SEPT.ADD, the GFN rounded down to the level's coverage)."""

from __future__ import annotations

import polars as pl
from emulator_helpers import run

from tdxtrace.codes import Leaf
from tdxtrace.events import Kind

SHARED_BIT = 1 << 47
PRIVATE_PART = SHARED_BIT - 1  # a GPA without its shared bit


def _private(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.Int64) & PRIVATE_PART


def _span(level: pl.Expr) -> pl.Expr:
    return pl.lit(4096, pl.Int64) * pl.lit(512, pl.Int64).pow(level)


def test_sept_add_names_the_entry_that_covers_the_fault() -> None:
    events, _ = run("fault-storm", "run.duration_us=2000")
    faults = events.filter(pl.col("kind") == Kind.PAGE_FAULT).select("corr", fault_gpa="gpa")
    adds = events.filter((pl.col("kind") == Kind.SEAMCALL)
                         & (pl.col("leaf") == Leaf.TDH_MEM_SEPT_ADD)).join(faults, on="corr")
    assert adds.height >= 3 and set(adds["level"].to_list()) >= {1, 2}
    span = _span(pl.col("level"))
    checked = adds.select(
        aligned=_private("gpa") % span == 0,
        covers=(_private("fault_gpa") - _private("gpa")).is_between(0, span - 1))
    assert checked["aligned"].all() and checked["covers"].all()


def test_non_leaf_spte_rows_are_aligned_on_both_roots() -> None:
    events, _ = run("memslot-churn", "run.duration_us=3000")
    nonleaf = events.filter((pl.col("kind") == Kind.SPTE_CHANGED) & (pl.col("level") > 0))
    assert nonleaf.filter(pl.col("gpa") & SHARED_BIT != 0).height >= 1  # the shared root's
    assert nonleaf.filter(pl.col("gpa") & SHARED_BIT == 0).height >= 1  # the mirror's
    assert nonleaf.select((_private("gpa") % _span(pl.col("level")) == 0).all()).item()
