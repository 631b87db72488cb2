"""A KVM_BUG_ON in a zap ends that page, not the work waiting on the zap.

tdx-reference.md §4(b) step 6: a failed BLOCK/TRACK/REMOVE bugs the VM and leaks the page; the
hook returns and the TDP MMU goes on with the next leaf. §4(c): kvm_destroy_vm() then releases
the HKID (VP.FLUSH, VPFLUSHDONE, CACHE.WB, KEY.FREEID) and reclaims the control pages whether
the VM is bugged or not; the TDR cannot be reclaimed while leaked pages are still the TD's.
Whatever waits on a zap at runtime (a conversion, a memslot change) gets its continuation.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from emulator_helpers import run

from tdxtrace.codes import Leaf, OperandId, Status, with_operand
from tdxtrace.events import Flow, Kind, Phase
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.testing import run_analyzer
from tdxtrace.trace import open_trace

ONE_TD = ("td.count=1", "td.memory_mb=4")  # 1024 pages: 64 with rows of their own, 960 batched
PAGES = 1024
TRACK_ALWAYS_BUSY = ("faults.spurious_busy_leaf='mem.track'", "faults.spurious_busy_p=1.0")
BUSY_EPOCH = with_operand(int(Status.OPERAND_BUSY), OperandId.TD_EPOCH)
ASSOCIATED_PAGES = int(Status.TD_ASSOCIATED_PAGES_EXIST)


def _observable(events: pl.DataFrame) -> pl.DataFrame:
    return events.filter(~pl.col("truth")).sort("seq")


def _calls(rows: pl.DataFrame, leaf: Leaf) -> pl.DataFrame:
    return rows.filter((pl.col("kind") == Kind.SEAMCALL) & (pl.col("leaf") == leaf))


def _pages(calls: pl.DataFrame) -> int:
    """4K pages the calls stand for (a batched row: arg1 of them)."""
    return int(calls["arg1"].fill_null(1).sum())


def _ok(calls: pl.DataFrame) -> pl.DataFrame:
    return calls.filter(pl.col("status") == 0)


def _phases_done(rows: pl.DataFrame) -> list[Phase]:
    return [Phase(p) for p in rows.filter(pl.col("kind") == Kind.PHASE_DONE)["sub"].to_list()]


def _done_status(rows: pl.DataFrame, phase: Phase) -> int:
    done = rows.filter((pl.col("kind") == Kind.PHASE_DONE) & (pl.col("sub") == phase))
    return int(done["status"].item())


def _every_zap_ends(rows: pl.DataFrame) -> None:
    zaps = rows.filter(pl.col("kind") == Kind.ZAP).group_by("corr").len()
    done = rows.filter(pl.col("kind") == Kind.ZAP_DONE).group_by("corr").len()
    pairs = zaps.join(done, on="corr", how="left", suffix="_done")
    assert pairs.height > 0
    assert pairs.filter(pl.col("len") != pl.col("len_done").fill_null(0)).is_empty(), pairs


def test_a_bug_in_the_teardown_zap_still_releases_the_hkid_and_reclaims() -> None:
    events, truth = run("teardown", *ONE_TD, *TRACK_ALWAYS_BUSY)
    rows = _observable(events)
    bugged = rows.filter(pl.col("kind") == Kind.VM_BUGGED)
    assert bugged["leaf"].to_list() == [Leaf.TDH_MEM_TRACK]
    assert bugged["status"].to_list() == [BUSY_EPOCH]
    # KVM zapped every leaf, batched ones included: BLOCK went through, TRACK never did, so
    # every REMOVE found the TLB not tracked and every page stayed the TD's.
    assert _pages(_ok(_calls(rows, Leaf.TDH_MEM_RANGE_BLOCK))) == PAGES
    remove = _calls(rows, Leaf.TDH_MEM_PAGE_REMOVE)
    assert _pages(remove) == PAGES and _ok(remove).is_empty()
    assert set(remove["status"].to_list()) == {
        with_operand(int(Status.TLB_TRACKING_NOT_DONE), OperandId.RCX)}
    # ... and then tdx_mmu_release_hkid() and the reclaim ran to their end.
    for phase in (Phase.PRIVATE_PAGES, Phase.VP_FLUSH, Phase.VPFLUSHDONE, Phase.CACHE_WB,
                  Phase.KEY_FREEID, Phase.RELEASE_HKID, Phase.RECLAIM_SEPT, Phase.RECLAIM_VCPU,
                  Phase.RECLAIM_TD):
        assert phase in _phases_done(rows), phase
    teardown_flushes = _calls(rows, Leaf.TDH_VP_FLUSH).filter(pl.col("flow") == Flow.TEARDOWN)
    assert teardown_flushes.height == 4
    assert _calls(rows, Leaf.TDH_MNG_KEY_FREEID)["status"].to_list() == [0]
    # The leaked pages keep the TDR: its RECLAIM fails, its PAGE.WBINVD is skipped.
    reclaim = _calls(rows, Leaf.TDH_PHYMEM_PAGE_RECLAIM)
    assert reclaim["status"].to_list()[-1] == ASSOCIATED_PAGES
    assert (reclaim["status"].to_list()[:-1] == pl.Series([0] * (reclaim.height - 1))).all()
    assert _calls(rows, Leaf.TDH_PHYMEM_PAGE_WBINVD).is_empty()
    # Each PHASE_DONE names the first failure its phase carried on past: the zap's TRACK
    # for PRIVATE_PAGES and for the whole teardown, the TDR's RECLAIM for RECLAIM_TD.
    assert _done_status(rows, Phase.PRIVATE_PAGES) == BUSY_EPOCH
    assert _done_status(rows, Phase.RELEASE_HKID) == 0
    assert _done_status(rows, Phase.RECLAIM_TD) == ASSOCIATED_PAGES
    last = rows.row(-1, named=True)
    assert (last["kind"], last["sub"], last["status"]) == (Kind.PHASE_DONE, Phase.TEARDOWN,
                                                          BUSY_EPOCH)
    assert truth["pages_leaked"] == truth["teardown_pages_leaked"] == PAGES + 1  # + the TDR
    assert truth["teardowns_finished"] == 1 and truth["hkid_leaks"] == 0
    assert truth["vms_bugged"] == 1
    _every_zap_ends(rows)


def test_the_analyzers_show_the_bug_and_a_finished_teardown(tmp_path: Path) -> None:
    path = tmp_path / "bugged.arrow"
    summary = record(load_scenario("teardown", [*ONE_TD, *TRACK_ALWAYS_BUSY]), 1, path)
    trace = open_trace(path)
    zap = run_analyzer("zap_scope", trace)
    assert zap.metrics["vms_bugged"] == summary.truth["vms_bugged"] == 1
    assert zap.tables["bugged"]["leaf"].to_list() == ["TDH.MEM.TRACK"]
    assert zap.metrics["sptes_zapped"] == summary.truth["sptes_zapped"] == PAGES
    teardown = run_analyzer("teardown_latency", trace)
    assert teardown.metrics["teardowns"] == teardown.metrics["finished"] == 1
    assert teardown.metrics["hkid_leaks"] == summary.truth["hkid_leaks"] == 0
    phases = teardown.tables["phases"]
    assert phases["finished"].all() and "reclaim_td" in phases["phase"].to_list()
    # The failures each phase carried on past, by name.
    failed = dict(phases.filter(pl.col("status") != "TDX_SUCCESS")
                  .select("phase", "status").iter_rows())
    assert failed == {"private_pages": "TDX_OPERAND_BUSY|TD_EPOCH",
                      "reclaim_td": "TDX_TD_ASSOCIATED_PAGES_EXIST"}


def test_a_page_that_fails_is_leaked_and_the_pages_after_it_are_removed() -> None:
    # seamcall_spinlock: no retry, so every injected BUSY on REMOVE is a TDX_BUG_ON.
    events, truth = run("teardown", *ONE_TD, "policy.zap_busy='seamcall_spinlock'",
                        "faults.spurious_busy_leaf='mem.page.remove'",
                        "faults.spurious_busy_p=0.02")
    rows = _observable(events)
    remove = _calls(rows, Leaf.TDH_MEM_PAGE_REMOVE)
    failed = remove.filter(pl.col("status") != 0)
    assert failed.height > 1  # the first one bugged the VM; the zap went on regardless
    # Failures among the per-row pages and among the batched ones.
    first_batched = remove.filter(pl.col("arg1").is_not_null())["gpa"].min()
    assert failed.filter(pl.col("gpa") < first_batched).height > 0
    assert failed.filter(pl.col("gpa") > first_batched).height > 0
    assert _pages(_ok(remove)) + failed.height == PAGES
    assert rows.filter(pl.col("kind") == Kind.VM_BUGGED).height == 1
    assert truth["teardown_pages_leaked"] == failed.height + 1  # + the TDR
    assert Phase.RECLAIM_TD in _phases_done(rows) and truth["teardowns_finished"] == 1
    assert _done_status(rows, Phase.PRIVATE_PAGES) == failed["status"][0]


def _no_entry_after_the_bug(rows: pl.DataFrame) -> None:
    bug_seq = rows.filter(pl.col("kind") == Kind.VM_BUGGED)["seq"].min()
    assert bug_seq is not None
    later = rows.filter((pl.col("seq") > bug_seq) & (pl.col("kind") == Kind.TD_ENTRY))
    assert later.is_empty()


def test_a_bug_in_a_runtime_zap_ends_that_zap_and_teardown_still_runs() -> None:
    # The VMM's conversion zaps (ZapPath, no caller waiting): the first BLOCK bugs the VM.
    # All memory mapped from the start (teardown.prepopulate), so the zap has every page to do.
    events, truth = run("zap-under-load", "run.duration_us=3000", "teardown.prepopulate=true",
                        "policy.zap_busy='seamcall_spinlock'",
                        "faults.spurious_busy_leaf='mem.range.block'",
                        "faults.spurious_busy_p=1.0")
    rows = _observable(events)
    _every_zap_ends(rows)
    _no_entry_after_the_bug(rows)
    runtime = rows.filter(pl.col("flow") == Flow.ZAP)
    bugging = runtime.filter(pl.col("kind") == Kind.VM_BUGGED)["corr"].item()
    done = runtime.filter((pl.col("kind") == Kind.ZAP_DONE) & (pl.col("corr") == bugging))
    zapped = done["arg0"].item()
    assert zapped == 32  # vmm.zap_pages
    # Every page of that zap was tried after the bug, and each one leaked.
    in_zap = runtime.filter(pl.col("corr") == bugging)
    assert _calls(in_zap, Leaf.TDH_MEM_RANGE_BLOCK).height == zapped
    assert truth["pages_leaked"] - truth["teardown_pages_leaked"] >= zapped
    assert Phase.RECLAIM_TD in _phases_done(rows) and truth["teardowns_finished"] == 1


def test_conversions_waiting_on_a_bugged_zap_get_their_answer() -> None:
    # MapGPA conversions wait on their zap (KVM_SET_MEMORY_ATTRIBUTES returns after it) in
    # both directions: to shared through ZapPath, to private through the roots' zap.
    events, truth = run("mapgpa-convert", "run.duration_us=4000",
                        "policy.zap_busy='seamcall_spinlock'",
                        "faults.spurious_busy_leaf='mem.range.block'",
                        "faults.spurious_busy_p=1.0")
    rows = _observable(events)
    assert truth["vms_bugged"] == 1
    _every_zap_ends(rows)
    _no_entry_after_the_bug(rows)
    assert Phase.RECLAIM_TD in _phases_done(rows) and truth["teardowns_finished"] == 1


def test_vp_flush_and_cache_wb_phases_name_their_first_failure() -> None:
    # VP.FLUSH BUSY: TDX_BUG_ON in KVM, the release goes on and VPFLUSHDONE finds the vCPU
    # still associated. CACHE.WB BUSY: a WARN, then KEY.FREEID fails. RELEASE_HKID names what
    # leaked the HKID; TEARDOWN the first of its phases' failures.
    events, _ = run("teardown", *ONE_TD, "faults.spurious_busy_leaf='vp.flush'",
                    "faults.spurious_busy_p=1.0")
    rows = _observable(events)
    flushes = rows.filter((pl.col("kind") == Kind.PHASE_DONE) & (pl.col("sub") == Phase.VP_FLUSH))
    assert flushes["status"][0] == with_operand(int(Status.OPERAND_BUSY), OperandId.TDVPR)
    assert _done_status(rows, Phase.RELEASE_HKID) == int(Status.FLUSHVP_NOT_DONE)
    events, _ = run("teardown", *ONE_TD, "faults.spurious_busy_leaf='phymem.cache.wb'",
                    "faults.spurious_busy_p=1.0")
    rows = _observable(events)
    assert _done_status(rows, Phase.CACHE_WB) == with_operand(int(Status.OPERAND_BUSY),
                                                              OperandId.KOT)
    assert _done_status(rows, Phase.RELEASE_HKID) == int(Status.WBCACHE_NOT_COMPLETE)
    assert _done_status(rows, Phase.TEARDOWN) == int(Status.WBCACHE_NOT_COMPLETE)


RECLAIM_ALWAYS_BUSY = ("faults.spurious_busy_leaf='phymem.page.reclaim'",
                       "faults.spurious_busy_p=1.0")


def test_a_failed_control_or_sept_page_reclaim_leaks_the_page_without_bugging_the_vm() -> None:
    # Late release: private pages leave through REMOVE; RECLAIM is only for S-EPT pages
    # (WARN in handle_removed_pt()) and control pages (tdx_reclaim_control_page(), the TDR):
    # __tdx_reclaim_page()'s TDX_BUG_ON_3(..., NULL) has no VM to bug.
    events, truth = run("teardown", *ONE_TD, *RECLAIM_ALWAYS_BUSY)
    rows = _observable(events)
    reclaim = _calls(rows, Leaf.TDH_PHYMEM_PAGE_RECLAIM)
    assert reclaim.height > 0 and _ok(reclaim).is_empty()
    assert rows.filter(pl.col("kind") == Kind.VM_BUGGED).is_empty()
    assert truth.get("vms_bugged", 0) == 0
    assert truth["teardown_pages_leaked"] == reclaim.height  # every page it gave up on
    # The TDR stayed the TD's, so its PAGE.WBINVD (after the last RECLAIM) never ran.
    assert _calls(rows, Leaf.TDH_PHYMEM_PAGE_WBINVD)["seq"].max() < reclaim["seq"].max()
    assert truth["teardowns_finished"] == 1


def test_a_failed_private_page_reclaim_bugs_the_vm_once() -> None:
    # Early release: private pages are reclaimed through the TDP MMU, whose
    # remove_external_spte() does KVM_BUG_ON on the error.
    events, truth = run("teardown", *ONE_TD, "policy.hkid_release='early'",
                        *RECLAIM_ALWAYS_BUSY)
    rows = _observable(events)
    bugged = rows.filter(pl.col("kind") == Kind.VM_BUGGED)
    assert bugged["leaf"].to_list() == [Leaf.TDH_PHYMEM_PAGE_RECLAIM]
    assert truth["vms_bugged"] == 1
    first_failure = _calls(rows, Leaf.TDH_PHYMEM_PAGE_RECLAIM).filter(pl.col("status") != 0)
    assert bugged["seq"].item() > first_failure["seq"].min()
    assert bugged["status"].item() == first_failure["status"][0]
