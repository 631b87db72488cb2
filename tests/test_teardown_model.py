"""TD creation and teardown: the module's rules and KVM's sequence (issue 4, items 1-3, 8-10).

Module rules are pinned on the model directly (tdx-reference.md §4(c) module side, §6.2);
KVM's sequence on small emulator runs of the ``teardown`` scenario.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import polars as pl
import pytest
from emulator_helpers import run

from tdxtrace.codes import Leaf, OperandId, Status, with_operand
from tdxtrace.errors import ScenarioError
from tdxtrace.events import Flow, Kind, Phase, SeptState
from tdxtrace.sim.module import TdxModule
from tdxtrace.sim.module_state import ModuleTd, ModuleVcpu, PageKind, SeptEntry, TdLifecycle
from tdxtrace.sim.module_teardown import LifecycleLeaves
from tdxtrace.testing import run_analyzer
from tdxtrace.trace import Trace

SMALL = ("td.count=1", "td.memory_mb=2", "run.duration_us=300")
ME = (9, 0, 1)


def _blocked_pair(packages: int = 2, blocks: int = 3) -> tuple[LifecycleLeaves, ModuleTd]:
    """A module with one runnable TD whose only vCPU ran on LP 0, and its lifecycle leaves."""
    module = TdxModule()
    td = ModuleTd(td=0, hkid=1, lifecycle=TdLifecycle.RUNNABLE, vcpus=[ModuleVcpu()])
    module.tds.append(td)
    leaves = LifecycleLeaves(module, packages, blocks)
    assert module.vp_enter(td, 0, 0, 0x1000, 0, 10, ME)[0] == Status.SUCCESS
    module.td_exit(td, 0, 0x1000, None)
    return leaves, td


def _lifecycle(td: ModuleTd) -> TdLifecycle:
    return td.lifecycle  # read through a call: the state changes behind mypy's back


def test_vpflushdone_with_an_associated_vcpu_is_flushvp_not_done() -> None:
    leaves, td = _blocked_pair()
    assert leaves.vpflushdone(td, 100, 110, ME) == Status.FLUSHVP_NOT_DONE
    assert _lifecycle(td) == TdLifecycle.RUNNABLE
    # VP.FLUSH must run on the LP the vCPU is associated with.
    assert leaves.vp_flush(td, 0, 3, 200, 210, ME) == Status.VCPU_NOT_ASSOCIATED
    assert leaves.vp_flush(td, 0, 0, 300, 310, ME) == Status.SUCCESS
    assert td.vcpus[0].assoc_lp == -1 and td.num_assoc == 0
    assert leaves.vpflushdone(td, 400, 410, ME) == Status.SUCCESS
    assert _lifecycle(td) == TdLifecycle.BLOCKED


def test_cache_wb_resumes_through_its_sub_blocks_and_freeid_needs_every_package() -> None:
    leaves, td = _blocked_pair(packages=2, blocks=3)
    assert leaves.cache_wb(0, False, 0, 10, ME) == Status.NO_HKID_READY_TO_WBCACHE
    leaves.vp_flush(td, 0, 0, 20, 30, ME)
    assert leaves.vpflushdone(td, 40, 50, ME) == Status.SUCCESS
    assert leaves.cache_wb(0, True, 60, 70, ME) == Status.WBCACHE_RESUME_ERROR
    assert [leaves.cache_wb(0, resume, 100 + 20 * i, 110 + 20 * i, ME)
            for i, resume in enumerate((False, True, True))] == [
        Status.INTERRUPTED_RESUMABLE, Status.INTERRUPTED_RESUMABLE, Status.SUCCESS]
    # Package 1's caches may still hold the HKID's lines.
    assert leaves.key_freeid(td, 200, 210, ME) == Status.WBCACHE_NOT_COMPLETE
    assert _lifecycle(td) == TdLifecycle.BLOCKED
    for i in range(3):
        leaves.cache_wb(1, i > 0, 300 + 20 * i, 310 + 20 * i, ME)
    assert leaves.key_freeid(td, 400, 410, ME) == Status.SUCCESS
    assert _lifecycle(td) == TdLifecycle.TEARDOWN


def test_kot_and_wb_mutex_are_try_locks() -> None:
    leaves, td = _blocked_pair(packages=1, blocks=2)
    other = ModuleTd(td=1, hkid=2, lifecycle=TdLifecycle.RUNNABLE, vcpus=[ModuleVcpu()])
    leaves.module.tds.append(other)
    leaves.vp_flush(td, 0, 0, 0, 10, ME)
    assert leaves.vpflushdone(td, 20, 30, ME) == Status.SUCCESS
    assert leaves.cache_wb(0, False, 100, 200, ME) == Status.INTERRUPTED_RESUMABLE
    # Another TD's VPFLUSHDONE needs the KOT exclusively while CACHE.WB holds it shared.
    assert leaves.vpflushdone(other, 150, 160, ME) == with_operand(
        int(Status.OPERAND_BUSY), OperandId.KOT)
    assert leaves.cache_wb(0, True, 150, 160, ME) == with_operand(
        int(Status.OPERAND_BUSY), OperandId.WBCACHE)


def test_reclaim_needs_td_teardown_and_the_tdr_goes_last() -> None:
    leaves, td = _blocked_pair(packages=1, blocks=1)
    ctl = leaves.of(td)
    ctl.tdcs, ctl.vcpu_pages = 1, [2]
    td.entries[0x100] = SeptEntry(state=SeptState.MAPPED)
    assert leaves.reclaim(td, PageKind.TDCS, None, 0, 10, ME) == Status.LIFECYCLE_STATE_INCORRECT
    leaves.vp_flush(td, 0, 0, 20, 30, ME)
    leaves.vpflushdone(td, 40, 50, ME)
    leaves.cache_wb(0, False, 60, 70, ME)
    assert leaves.key_freeid(td, 80, 90, ME) == Status.SUCCESS
    assert leaves.reclaim(td, PageKind.TDR, None, 100, 110, ME) == \
        Status.TD_ASSOCIATED_PAGES_EXIST
    assert leaves.reclaim(td, PageKind.TDVPR, 0, 120, 130, ME) != Status.SUCCESS  # TDCX first
    for n, (kind, key) in enumerate([(PageKind.PRIVATE, 0x100), (PageKind.TDCX, 0),
                                     (PageKind.TDVPR, 0), (PageKind.TDCS, None),
                                     (PageKind.TDR, None)]):
        assert leaves.reclaim(td, kind, key, 200 + 20 * n, 210 + 20 * n, ME) == Status.SUCCESS
    assert leaves.children(td) == 0


# --- KVM's sequence ---------------------------------------------------------------------------

def _teardown_rows(events: pl.DataFrame, td: int = 0) -> pl.DataFrame:
    return events.filter((pl.col("flow") == Flow.TEARDOWN) & (pl.col("td") == td))


def _calls(rows: pl.DataFrame, leaf: Leaf) -> pl.DataFrame:
    return rows.filter((pl.col("kind") == Kind.SEAMCALL) & (pl.col("leaf") == leaf))


def _pages(rows: pl.DataFrame, leaf: Leaf) -> int:
    return int(_calls(rows, leaf)["arg1"].fill_null(1).sum())


def _phase_seq(rows: pl.DataFrame, kind: Kind, phase: Phase) -> list[int]:
    return rows.filter((pl.col("kind") == kind) & (pl.col("sub") == phase))["seq"].to_list()


def test_every_trace_starts_with_creation_and_ends_with_a_complete_teardown() -> None:
    events, truth = run("fault-storm", "td.vcpus=2", "run.duration_us=500")
    seamcalls = events.filter(pl.col("kind") == Kind.SEAMCALL)
    first_entry = events.filter(pl.col("kind") == Kind.TD_ENTRY)["seq"].min()
    before_run = seamcalls.filter(pl.col("seq") < first_entry)
    create = before_run.filter(pl.col("flow") == Flow.CREATE)["leaf"].to_list()
    per_vcpu = [Leaf.TDH_VP_CREATE] + [Leaf.TDH_VP_ADDCX] * 5 + [Leaf.TDH_VP_INIT]
    assert create == ([Leaf.TDH_MNG_CREATE] + [Leaf.TDH_MNG_KEY_CONFIG] * 2
                      + [Leaf.TDH_MNG_ADDCX] * 4 + [Leaf.TDH_MNG_INIT] + per_vcpu * 2
                      + [Leaf.TDH_MR_FINALIZE])
    # The rest: the first run's VP.FLUSH of each vCPU off the VMM's LP (VP.INIT ran there).
    first_runs = before_run.filter(pl.col("flow") != Flow.CREATE)
    assert first_runs["leaf"].to_list() == [Leaf.TDH_VP_FLUSH] * first_runs.height
    assert first_runs.height == 2 and (first_runs["lp"] == 9).all()  # one per vCPU
    key_config = seamcalls.filter(pl.col("leaf") == Leaf.TDH_MNG_KEY_CONFIG)
    assert key_config["lp"].to_list() == [0, 5]  # the first LP of each of the 2 packages
    assert (seamcalls.filter(pl.col("seq") < first_entry)["status"] == 0).all()

    rows = _teardown_rows(events)
    private_pages = rows.filter((pl.col("kind") == Kind.PHASE)
                                & (pl.col("sub") == Phase.PRIVATE_PAGES))["arg0"].item()
    assert private_pages > 0
    assert _pages(rows, Leaf.TDH_MEM_PAGE_REMOVE) == private_pages  # late release
    done = rows.filter((pl.col("kind") == Kind.PHASE_DONE) & (pl.col("sub") == Phase.TEARDOWN))
    assert done["status"].item() == Status.SUCCESS
    assert truth["teardowns"] == 1 and truth["hkid_leaks"] == 0
    assert truth["teardown_ns"] == [done["dur_ns"].item()]
    assert _calls(rows, Leaf.TDH_MNG_KEY_FREEID)["status"].to_list() == [Status.SUCCESS]
    # The last SEAMCALL of the TD is the TDR's PAGE.WBINVD.
    assert _calls(rows, Leaf.TDH_PHYMEM_PAGE_WBINVD)["seq"].max() == rows.filter(
        pl.col("kind") == Kind.SEAMCALL)["seq"].max()


@pytest.mark.parametrize("row_pages", [0, 1 << 20])
def test_late_release_zaps_every_page_before_the_hkid_goes(row_pages: int) -> None:
    events, truth = run("teardown", *SMALL, f"teardown.row_pages={row_pages}")
    rows = _teardown_rows(events)
    pages = 512  # 2 MB, all mapped (prepopulate)
    for leaf in (Leaf.TDH_MEM_RANGE_BLOCK, Leaf.TDH_MEM_TRACK, Leaf.TDH_MEM_PAGE_REMOVE):
        assert _pages(rows, leaf) == pages
    assert int(rows.filter(pl.col("kind") == Kind.KICK)["arg1"].fill_null(1).sum()) == pages
    assert _phase_seq(rows, Kind.PHASE_DONE, Phase.PRIVATE_PAGES)[0] < _phase_seq(
        rows, Kind.PHASE, Phase.RELEASE_HKID)[0]
    # S-EPT pages of one 2M range (levels 1, 2, 3), 6 per vCPU, 4 TDCS pages and the TDR.
    assert _pages(rows, Leaf.TDH_PHYMEM_PAGE_RECLAIM) == 3 + 6 * 4 + 4 + 1
    # Batched or not, the cost is modelled per page.
    private = rows.filter((pl.col("kind") == Kind.PHASE_DONE)
                          & (pl.col("sub") == Phase.PRIVATE_PAGES))["dur_ns"].item()
    assert 12_000 < private / pages < 18_000
    assert truth["teardowns_finished"] == 1


def test_early_release_reclaims_each_page_once_and_never_blocks() -> None:
    events, truth = run("teardown", *SMALL, "policy.hkid_release='early'")
    rows = _teardown_rows(events)
    assert _calls(rows, Leaf.TDH_MEM_RANGE_BLOCK).height == 0
    assert _calls(rows, Leaf.TDH_MEM_TRACK).height == 0
    assert _calls(rows, Leaf.TDH_MEM_PAGE_REMOVE).height == 0
    assert _phase_seq(rows, Kind.PHASE_DONE, Phase.RELEASE_HKID)[0] < _phase_seq(
        rows, Kind.PHASE, Phase.PRIVATE_PAGES)[0]
    start, end = (_phase_seq(rows, Kind.PHASE, Phase.PRIVATE_PAGES)[0],
                  _phase_seq(rows, Kind.PHASE_DONE, Phase.PRIVATE_PAGES)[0])
    inside = rows.filter(pl.col("seq").is_between(start, end))
    assert _pages(inside, Leaf.TDH_PHYMEM_PAGE_RECLAIM) == 512
    assert (_calls(inside, Leaf.TDH_PHYMEM_PAGE_RECLAIM)["status"] == 0).all()
    assert truth["teardowns_finished"] == 1


def test_cache_wb_is_resumed_on_one_lp_per_package_until_it_succeeds() -> None:
    events, truth = run("teardown", *SMALL, "teardown.cache_wb_blocks=5")
    wb = _calls(_teardown_rows(events), Leaf.TDH_PHYMEM_CACHE_WB)
    assert sorted(set(wb["lp"].to_list())) == [0, 5]
    for lp in (0, 5):
        on_lp = wb.filter(pl.col("lp") == lp).sort("seq")
        assert on_lp["status"].to_list() == [Status.INTERRUPTED_RESUMABLE] * 4 + [0]
        assert on_lp["arg0"].to_list() == [0, 1, 1, 1, 1]  # RCX = resume flag
    assert truth["cache_wb_resumes"] == 8


@pytest.mark.parametrize("loop", ["resend_flush", "vpflushdone_only"])
def test_a_vcpu_entering_during_teardown(loop: str) -> None:
    events, truth = run("teardown", *SMALL, "faults.vcpu_load_during_teardown_p=1.0",
                        f"teardown.flush_loop='{loop}'")
    rows = _teardown_rows(events)
    flushdone = _calls(rows, Leaf.TDH_MNG_VPFLUSHDONE)
    assert flushdone["status"][0] == Status.FLUSHVP_NOT_DONE
    reentry = events.filter((pl.col("kind") == Kind.TD_ENTRY)
                            & (pl.col("seq") > _phase_seq(rows, Kind.PHASE, Phase.VP_FLUSH)[0]))
    assert reentry.height == 1  # the racing vCPU entered once, after the VP.FLUSH round
    after_leak = rows.filter(pl.col("seq") > flushdone["seq"][0])
    if loop == "resend_flush":
        # The second round flushes the vCPU again, so VPFLUSHDONE and the rest succeed.
        flushes = _calls(after_leak, Leaf.TDH_VP_FLUSH)
        assert flushes["vcpu"].to_list() == [reentry["vcpu"].item()]
        assert flushes["lp"].to_list() == [reentry["lp"].item()]
        assert flushdone["status"].to_list() == [Status.FLUSHVP_NOT_DONE, Status.SUCCESS]
        assert truth["hkid_leaks"] == 0 and truth["teardowns_finished"] == 1
        return
    # Re-issuing VPFLUSHDONE alone can never succeed: the HKID leaks, nothing follows.
    assert flushdone["status"].to_list() == [Status.FLUSHVP_NOT_DONE] * 3
    assert _calls(after_leak, Leaf.TDH_VP_FLUSH).height == 0
    for leaf in (Leaf.TDH_PHYMEM_CACHE_WB, Leaf.TDH_MNG_KEY_FREEID,
                 Leaf.TDH_PHYMEM_PAGE_RECLAIM):
        assert _calls(rows, leaf).height == 0
    ends = rows.filter(pl.col("kind") == Kind.PHASE_DONE).filter(
        pl.col("sub").is_in([Phase.RELEASE_HKID, Phase.TEARDOWN]))
    assert (ends["status"] == Status.FLUSHVP_NOT_DONE).all() and ends.height == 2
    assert truth["hkid_leaks"] == 1 and truth.get("teardowns_finished", 0) == 0


def test_concurrent_teardowns_are_serialised_by_tdx_lock() -> None:
    events, truth = run("teardown", "td.count=3", "td.memory_mb=1", "run.duration_us=300",
                        "policy.hkid_release='early'")
    assert not any(key.endswith("|KOT") or key.endswith("|WBCACHE")
                   for key in truth["busy_by_leaf_operand"])
    # Each TD holds tdx_lock from VPFLUSHDONE to KEY.FREEID; those windows never overlap.
    windows = []
    for td in range(3):
        rows = _teardown_rows(events, td)
        start = _calls(rows, Leaf.TDH_MNG_VPFLUSHDONE)["ts_ns"].min()
        freeid = _calls(rows, Leaf.TDH_MNG_KEY_FREEID)
        windows.append((start, freeid["ts_ns"].item() + freeid["dur_ns"].item()))
    windows.sort()
    assert all(a[1] <= b[0] for a, b in pairwise(windows))
    # ... while their private pages are reclaimed concurrently.
    phases = events.filter((pl.col("kind") == Kind.PHASE) & (pl.col("sub") == Phase.TEARDOWN))
    assert phases["ts_ns"].n_unique() == 1
    assert truth["teardowns_finished"] == 3


def test_teardown_latency_analyzer_reads_the_emulated_teardown() -> None:
    events, truth = run("teardown", *SMALL, "teardown.row_pages=16")
    result = run_analyzer("teardown_latency", Trace.from_frame(events))
    per_td: dict[str, Any] = result.tables["per_td"].row(0, named=True)
    assert per_td["finished"] and not per_td["hkid_leaked"]
    assert per_td["private_pages"] == 512 and per_td["policy"] == "late"
    assert per_td["teardown_ns"] == truth["teardown_ns"][0]
    assert result.metrics["cache_wb_resumes"] == truth["cache_wb_resumes"]


def test_cache_wb_gives_up_after_tdx_seamcall_retries_and_freeid_leaks_the_hkid() -> None:
    events, truth = run("teardown", *SMALL, "host.packages=1", "teardown.cache_wb_blocks=10001")
    rows = _teardown_rows(events)
    wb = _calls(rows, Leaf.TDH_PHYMEM_CACHE_WB)
    assert wb.height == 10_000  # TDX_SEAMCALL_RETRIES, all INTERRUPTED_RESUMABLE
    assert (wb["status"] == Status.INTERRUPTED_RESUMABLE).all()
    assert _calls(rows, Leaf.TDH_MNG_KEY_FREEID)["status"].to_list() == [
        Status.WBCACHE_NOT_COMPLETE]
    assert _calls(rows, Leaf.TDH_PHYMEM_PAGE_RECLAIM).height == 0
    assert truth["hkid_leaks"] == 1


def test_prepopulating_more_than_the_emulator_can_map_is_refused_by_name() -> None:
    with pytest.raises(ScenarioError, match=r"^teardown\.prepopulate: .*8192 MB"):
        run("teardown", "td.count=2", "td.memory_mb=4096")
