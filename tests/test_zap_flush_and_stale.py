"""What a runtime zap does to the vCPUs and to faults in flight.

* kvm_flush_remote_tlbs(): a zap that removed a leaf from a valid root kicks every vCPU in
  guest mode (KVM_REQ_TLB_FLUSH; TDX has no flush hook) before it drops mmu_lock.
* is_page_fault_stale(): a private fault that began before a zap ended retries (STALE).
* ZAP's arg1 says what the zap covered, not the zap_scope policy, for the zaps the policy
  does not choose.
"""

from __future__ import annotations

import polars as pl
import pytest
from emulator_helpers import run

from tdxtrace.codes import KVM_MEMORY_ATTRIBUTE_PRIVATE
from tdxtrace.events import FaultOutcome, Flow, KickReason, Kind, RetryCause, ZapReason, ZapScope


def _zaps(events: pl.DataFrame) -> pl.DataFrame:
    """Each runtime ZAP with its ZAP_DONE (SPTEs removed) and its TLB-flush kick, if any."""
    zaps = events.filter((pl.col("kind") == Kind.ZAP) & (pl.col("flow") == Flow.ZAP)).select(
        "corr", "sub", "arg1", zap_seq="seq")
    done = events.filter(pl.col("kind") == Kind.ZAP_DONE).select(
        "corr", done_seq="seq", removed="arg0")
    kicks = events.filter((pl.col("kind") == Kind.KICK)
                          & (pl.col("sub") == KickReason.TLB_FLUSH)).select(
        "corr", kick_seq="seq")
    return zaps.join(done, on="corr").join(kicks, on="corr", how="left")


def test_a_zap_that_removed_leaves_flushes_remote_tlbs_before_it_ends() -> None:
    events, _ = run("memslot-churn", "run.duration_us=12000")
    zaps = _zaps(events)
    removed = zaps.filter(pl.col("removed") > 0)
    assert removed.height >= 3
    assert removed["kick_seq"].null_count() == 0
    assert (removed["kick_seq"] < removed["done_seq"]).all()
    assert zaps.filter(pl.col("removed") == 0)["kick_seq"].null_count() == zaps.filter(
        pl.col("removed") == 0).height  # nothing removed, nothing to flush


def test_teardown_zaps_do_not_flush() -> None:
    events, truth = run("teardown", "td.count=1", "td.memory_mb=2", "run.duration_us=300")
    assert truth["teardowns"] == 1
    assert events.filter((pl.col("kind") == Kind.KICK)
                         & (pl.col("sub") == KickReason.TLB_FLUSH)).height == 0


def test_a_private_fault_that_waited_behind_a_zap_is_stale() -> None:
    events, _ = run("zap-under-load", "run.duration_us=6000")
    stale = events.filter((pl.col("kind") == Kind.FAULT_RETRY)
                          & (pl.col("sub") == RetryCause.STALE))
    assert stale.height >= 10
    # Each began (PAGE_FAULT, or its previous retry) before some zap of its TD ended, and that
    # zap ended before the retry.
    starts = events.filter(pl.col("kind").is_in([Kind.PAGE_FAULT, Kind.FAULT_RETRY])).select(
        "corr", "seq", "ts_ns")
    ends = events.filter(pl.col("kind") == Kind.ZAP_DONE).select(end="ts_ns", end_seq="seq")
    # A change to private is an invalidation too (no zap rows without direct roots): its
    # MEM_ATTR row is written when userspace asks, before it waits for mmu_lock.
    to_private = events.filter((pl.col("kind") == Kind.MEM_ATTR)
                               & (pl.col("arg1") == KVM_MEMORY_ATTRIBUTE_PRIVATE))
    by_zap = 0
    for row in stale.iter_rows(named=True):
        began = starts.filter((pl.col("corr") == row["corr"])
                              & (pl.col("seq") < row["seq"]))["ts_ns"].max()
        between = ends.filter(pl.col("end").is_between(began, row["ts_ns"])
                              & (pl.col("end_seq") < row["seq"]))
        by_zap += between.height > 0
        asked = to_private.filter(pl.col("ts_ns").is_between(began - 200_000, row["ts_ns"]))
        assert between.height + asked.height >= 1, row
    assert by_zap >= stale.height // 2


def test_under_resume_guest_a_stale_fault_goes_back_to_the_guest() -> None:
    events, _ = run("zap-under-load", "run.duration_us=6000",
                    "policy.frozen_spte=resume_guest")
    stale = events.filter((pl.col("kind") == Kind.FAULT_RETRY)
                          & (pl.col("sub") == RetryCause.STALE)).select("corr")
    done = events.filter(pl.col("kind") == Kind.FAULT_DONE).join(stale, on="corr")
    assert done.height >= 10
    assert (done["sub"] == FaultOutcome.RESUME_GUEST).all()


@pytest.mark.parametrize(("scenario", "reason"), [("zap-under-load", ZapReason.CONVERSION),
                                                  ("demo", ZapReason.TRUNCATION)])
def test_conversion_and_truncation_zaps_report_the_range_whatever_the_policy(
        scenario: str, reason: ZapReason) -> None:
    events, _ = run(scenario, "run.duration_us=3000", "policy.zap_scope=everything")
    zaps = events.filter(pl.col("kind") == Kind.ZAP)
    ranged = zaps.filter(pl.col("sub") == reason)
    assert ranged.height >= 3
    assert (ranged["arg1"] == ZapScope.RANGE_LEAFS).all()
    teardown = zaps.filter(pl.col("sub") == ZapReason.TEARDOWN)
    assert teardown.height >= 1 and (teardown["arg1"] == ZapScope.EVERYTHING).all()


def test_a_conversion_for_a_vcpu_exit_runs_in_that_vcpus_thread() -> None:
    # QEMU converts for a MapGPA exit in the vCPU's thread: the zap's rows and SEAMCALLs are
    # on that vCPU's LP, never on the VMM's (LP 5 of mapgpa-convert's 6).
    events, _ = run("mapgpa-convert", "run.duration_us=6000")
    zaps = events.filter((pl.col("kind") == Kind.ZAP) & (pl.col("sub") == ZapReason.CONVERSION))
    assert zaps.height >= 3 and (zaps["lp"] != 5).all()
    calls = events.filter(pl.col("kind") == Kind.SEAMCALL).join(
        zaps.select("corr", zap_lp="lp"), on="corr")
    assert calls.height >= 10 and (calls["lp"] == calls["zap_lp"]).all()
    # The VMM's own conversions (zap-under-load) stay on the VMM's LP (9 of 10).
    vmm, _ = run("zap-under-load", "run.duration_us=2000")
    own = vmm.filter((pl.col("kind") == Kind.ZAP) & (pl.col("sub") == ZapReason.CONVERSION))
    assert own.height >= 3 and (own["lp"] == 9).all()
