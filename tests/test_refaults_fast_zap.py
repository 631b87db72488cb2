"""A fast zap (zap_scope = everything) and the refaults after it, emulator and analyzer alike.

kvm_mmu_zap_all_fast invalidates the direct root and kicks the vCPUs; each reloads a new,
empty root on its next entry, so a shared access faults at once, before the old root's SPTEs
are torn down. That fault is a refault of the zap: the ground truth counts it, and zap_scope
dates the zap of the direct root's pages at the ROOT INVALIDATED row. These seeds of
memslot-churn have such faults, and the two must still agree there. (Since such a fault
also maps nothing, being stale, and comes back, the counts alone no longer tell which fault
is the refault; test_zap_scope.py checks the analyzer's dating on a hand-built trace.)
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tdxtrace.events import Kind, RootEvent, RootKind
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.testing import run_analyzer
from tdxtrace.trace import open_trace

SHARED_BIT = 1 << 47


def _faults_inside_fast_zaps(rows: pl.DataFrame) -> int:
    """Shared PAGE_FAULTs between a zap's ROOT INVALIDATED and that zap's first SPTE row."""
    invalidated = rows.filter((pl.col("kind") == Kind.ROOT)
                              & (pl.col("sub") == RootEvent.INVALIDATED)
                              & (pl.col("arg0") == RootKind.DIRECT))
    first_zap_row = (rows.filter(pl.col("kind") == Kind.SPTE_CHANGED)
                     .group_by("corr").agg(pl.col("seq").min().alias("zap_row")))
    windows = invalidated.join(first_zap_row, on="corr").select("seq", "zap_row", "td")
    faults = rows.filter((pl.col("kind") == Kind.PAGE_FAULT)
                         & ((pl.col("gpa") & SHARED_BIT) != 0))
    inside = faults.join(windows, on="td", suffix="_w").filter(
        (pl.col("seq") > pl.col("seq_w")) & (pl.col("seq") < pl.col("zap_row")))
    return inside.height


@pytest.mark.parametrize("seed", [1, 2, 4])
def test_a_fault_between_invalidation_and_teardown_of_the_old_root_is_a_refault(
        tmp_path: Path, seed: int) -> None:
    path = tmp_path / "fast.arrow"
    summary = record(load_scenario("memslot-churn", ["policy.zap_scope=everything"]), seed,
                     path)
    trace = open_trace(path)
    rows = pl.read_ipc(path).filter(~pl.col("truth"))
    assert _faults_inside_fast_zaps(rows) > 0  # the case this test is about happened
    result = run_analyzer("zap_scope", trace)
    assert result.metrics["refaults"] == summary.truth["refaults"] > 0
