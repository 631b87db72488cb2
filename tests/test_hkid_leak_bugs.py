"""A leaked HKID bugs the VM the way mainline KVM does (tdx-reference.md §4(c)).

* VPFLUSHDONE failing with anything but FLUSHVP_NOT_DONE, or KEY.FREEID failing: TDX_BUG_ON
  with the VM ("... failed. HKID %d is leaked."), a VM_BUGGED row naming the call.
* FLUSHVP_NOT_DONE is a quiet ``goto out``; but the mirror root is still torn down, and
  tdx_sept_free_private_spt() finds the HKID assigned: KVM_BUG_ON with no SEAMCALL behind it
  (VM_BUGGED with null leaf and status), inside the teardown.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from emulator_helpers import run

from tdxtrace.codes import Leaf, Status
from tdxtrace.events import Kind, Phase
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.testing import run_analyzer
from tdxtrace.trace import open_trace

ONE_TD = ("td.count=1", "td.memory_mb=4")
FLUSHVP_NOT_DONE = ("faults.vcpu_load_during_teardown_p=1.0", "teardown.vpflushdone_tries=1")


def _rows(events: pl.DataFrame) -> pl.DataFrame:
    return events.filter(~pl.col("truth")).sort("seq")


def _phase_done_seq(rows: pl.DataFrame, phase: Phase) -> int:
    done = rows.filter((pl.col("kind") == Kind.PHASE_DONE) & (pl.col("sub") == phase))
    return int(done["seq"].item())


@pytest.mark.parametrize("leaf", [Leaf.TDH_MNG_VPFLUSHDONE, Leaf.TDH_MNG_KEY_FREEID],
                         ids=["vpflushdone", "key.freeid"])
def test_a_failed_hkid_release_call_bugs_the_vm_and_names_the_call(leaf: Leaf) -> None:
    option = {Leaf.TDH_MNG_VPFLUSHDONE: "mng.vpflushdone",
              Leaf.TDH_MNG_KEY_FREEID: "mng.key.freeid"}[leaf]
    events, truth = run("teardown", *ONE_TD, f"faults.spurious_busy_leaf='{option}'",
                        "faults.spurious_busy_p=1.0")
    rows = _rows(events)
    bugged = rows.filter(pl.col("kind") == Kind.VM_BUGGED)
    failed = rows.filter((pl.col("kind") == Kind.SEAMCALL) & (pl.col("leaf") == leaf))
    assert failed.height == 1 and failed["status"].item() != 0
    assert bugged["leaf"].to_list() == [leaf]
    assert bugged["status"].to_list() == failed["status"].to_list()
    assert truth["vms_bugged"] == 1 and truth["hkid_leaks"] == 1
    # Nothing is reclaimed after a leaked HKID.
    assert rows.filter((pl.col("kind") == Kind.SEAMCALL)
                       & (pl.col("leaf") == Leaf.TDH_PHYMEM_PAGE_RECLAIM)).is_empty()


def test_a_quiet_flushvp_not_done_is_bugged_by_the_sept_teardown() -> None:
    events, truth = run("teardown", *ONE_TD, *FLUSHVP_NOT_DONE)
    rows = _rows(events)
    flushdone = rows.filter((pl.col("kind") == Kind.SEAMCALL)
                            & (pl.col("leaf") == Leaf.TDH_MNG_VPFLUSHDONE))
    assert flushdone["status"].to_list() == [int(Status.FLUSHVP_NOT_DONE)]
    bugged = rows.filter(pl.col("kind") == Kind.VM_BUGGED)
    assert bugged.height == 1
    assert bugged["leaf"].is_null().all() and bugged["status"].is_null().all()
    seq = int(bugged["seq"].item())
    assert _phase_done_seq(rows, Phase.RELEASE_HKID) < seq < _phase_done_seq(rows, Phase.TEARDOWN)
    assert truth["vms_bugged"] == 1 and truth["hkid_leaks"] == 1


def test_zap_scope_lists_a_bug_with_no_seamcall(tmp_path: Path) -> None:
    path = tmp_path / "leak.arrow"
    summary = record(load_scenario("teardown", [*ONE_TD, *FLUSHVP_NOT_DONE]), 1, path)
    result = run_analyzer("zap_scope", open_trace(path))
    assert result.metrics["vms_bugged"] == summary.truth["vms_bugged"] == 1
    row = result.tables["bugged"].row(0, named=True)
    assert (row["leaf"], row["status"], row["flow"]) == (None, None, "teardown")
