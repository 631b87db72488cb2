"""A shared fault that began before a zap of the direct root ended maps nothing.

KVM reads mmu_invalidate_seq before it takes mmu_lock, and is_page_fault_stale() retries the
fault when a zap ended in between (mmu_invalidate_retry_gfn()): the pfn it looked up may be
the one just zapped. The guest re-enters and faults again. The emulator did install such a
page, from a fault that had waited on the zap's mmu_lock, so a zap was undone at once.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from tdxtrace.events import Flow, Kind
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.testing import run_analyzer
from tdxtrace.trace import open_trace

SHARED_BIT = 1 << 47
# Zaps every 200-500 µs over a guest that touches shared pages often: many faults wait on a
# zap's mmu_lock (seed 1003 had 91 stale installs).
BUSY_ZAPS = ["vmm.memslot_interval_us=500", "vmm.notifier_interval_us=200",
             "guest.shared_fraction=0.3"]


def _shared(kind: Kind) -> pl.Expr:
    return (pl.col("kind") == kind) & ((pl.col("gpa") & SHARED_BIT) != 0)


def test_no_shared_page_is_installed_across_the_end_of_a_zap(tmp_path: Path) -> None:
    path = tmp_path / "churn.arrow"
    summary = record(load_scenario("memslot-churn", BUSY_ZAPS), 1003, path)
    rows = pl.read_ipc(path).filter(~pl.col("truth"))
    faults = rows.filter(_shared(Kind.PAGE_FAULT)).select("corr", "td", fault="seq")
    installs = rows.filter(_shared(Kind.SPTE_CHANGED) & (pl.col("flow") == Flow.FAULT)
                           & (pl.col("level") == 0)).select("corr", install="seq")
    zap_ends = rows.filter(pl.col("kind") == Kind.ZAP_DONE).select("td", zap_end="seq")
    mapped = faults.join(installs, on="corr")
    stale = mapped.join(zap_ends, on="td").filter(
        (pl.col("zap_end") > pl.col("fault")) & (pl.col("zap_end") < pl.col("install")))
    assert mapped.height > 1000 and stale.is_empty(), stale.head()
    # Each such fault comes back as a new one: a refault of the zap, both sides agree.
    result = run_analyzer("zap_scope", open_trace(path))
    assert result.metrics["refaults"] == summary.truth["refaults"] > 0
