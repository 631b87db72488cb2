"""kvm.preempt_model = full: a conversion zap yields mmu_lock to waiting faults between leaves.

On a preemptible host tdp_mmu_iter_cond_resched() drops mmu_lock when rwlock_needbreak() says
someone waits (after a remote TLB flush of what it zapped), then takes it again. A fault that
gets the lock in between maps its page unless the GFN is in the range being invalidated
(mmu_invalidate_retry_gfn()), so faults elsewhere no longer go stale behind the whole zap.
On a voluntary or non-preemptible host (the default) the zap holds the lock to its end.
"""

from __future__ import annotations

import polars as pl
import pytest
from emulator_helpers import run

from tdxtrace.codes import FROZEN_SPTE, SHADOW_NONPRESENT_VALUE
from tdxtrace.events import KickReason, Kind, Phase, RetryCause, RootKind, ZapReason

SHORT = "run.duration_us=8000"
FULL = "kvm.preempt_model='full'"


def _zap_windows(events: pl.DataFrame) -> pl.DataFrame:
    """Per zap that removed a private page: from its first mirror SPTE change (mmu_lock
    held) to its ZAP_DONE, with the GFN range it invalidates. Not the teardown's (no vCPU
    is left to fault then; its zaps share one corr)."""
    runtime = (pl.col("kind") == Kind.ZAP) & (pl.col("sub") != ZapReason.TEARDOWN)
    zaps = events.filter(runtime).select(
        "corr", (pl.col("gpa") // 4096).alias("first_gfn"), pl.col("arg0").alias("pages"))
    first = events.filter((pl.col("kind") == Kind.SPTE_CHANGED) & pl.col("vcpu").is_null()
                          & (pl.col("sub") == RootKind.MIRROR)) \
        .group_by("corr").agg(pl.col("seq").min().alias("from_seq"))
    done = events.filter(pl.col("kind") == Kind.ZAP_DONE).select(
        "corr", pl.col("seq").alias("to_seq"))
    return zaps.join(first, on="corr").join(done, on="corr")


def _maps_inside(events: pl.DataFrame, windows: pl.DataFrame) -> pl.DataFrame:
    """Faults that mapped a page (their leaf SPTE turned present, under mmu_lock for read)
    while a zap of their TD was under way."""
    mapped = events.filter((pl.col("kind") == Kind.SPTE_CHANGED) & pl.col("vcpu").is_not_null()
                           & (pl.col("level") == 0)
                           & ~pl.col("arg1").is_in([FROZEN_SPTE, SHADOW_NONPRESENT_VALUE])).select(
        "seq", (pl.col("gpa") // 4096).alias("gfn"))
    return mapped.join(windows, how="cross").filter(
        (pl.col("seq") > pl.col("from_seq")) & (pl.col("seq") < pl.col("to_seq")))


IN_RANGE = (pl.col("gfn") >= pl.col("first_gfn")) & (
    pl.col("gfn") < pl.col("first_gfn") + pl.col("pages"))
# Hole punches over all of a small TD whose vCPUs keep touching a few hot pages: during a
# yield the waiting faults are on GFNs being invalidated (they stay private: no attribute
# change turns them away first).
PUNCH_HOT = ("td.memory_mb=4", "vmm.zap_pages=1024", "vmm.zap_interval_us=300",
             "guest.workload='hot'")


@pytest.mark.parametrize("seed", [1, 2])
def test_faults_elsewhere_map_inside_a_yielding_conversion_zap(seed: int) -> None:
    events, truth = run("zap-under-load", SHORT, FULL, seed=seed)
    assert truth["zap_yields"] > 0
    inside = _maps_inside(events, _zap_windows(events))
    assert inside.height > 0  # the zap let them in
    assert inside.filter(IN_RANGE).height == 0


@pytest.mark.parametrize("scenario", ["fault-storm", "zero-step"])
def test_a_fault_on_a_gfn_being_invalidated_retries_without_taking_mmu_lock(
        scenario: str) -> None:
    # mmu_invalidate_retry_gfn_unsafe() before mmu_lock, mmu_invalidate_retry_gfn() under
    # it: a fault on a GFN of an invalidation in progress never maps it, and does not queue
    # for the lock, so the zap does not yield to it. Only a fault that queued before the
    # invalidation began can make it yield: at most once per vCPU and zap (here every GFN is
    # in every punch). Without the lockless check, 340 and 272 yields.
    events, truth = run(scenario, SHORT, FULL, *PUNCH_HOT)
    stale = events.filter((pl.col("kind") == Kind.FAULT_RETRY)
                          & (pl.col("sub") == RetryCause.STALE))
    assert stale.height > 0
    assert _maps_inside(events, _zap_windows(events)).filter(IN_RANGE).height == 0
    zaps = events.filter((pl.col("kind") == Kind.ZAP) & (pl.col("sub") != ZapReason.TEARDOWN))
    vcpus = events.get_column("vcpu").drop_nulls().n_unique()
    assert truth["zap_yields"] <= vcpus * zaps.height


def test_by_default_a_zap_holds_mmu_lock_to_its_end() -> None:
    events, truth = run("zap-under-load", SHORT)
    assert truth.get("zap_yields", 0) == 0
    assert _maps_inside(events, _zap_windows(events)).height == 0


def test_a_yield_flushes_what_was_zapped_first() -> None:
    # kvm_flush_remote_tlbs() before the lock is dropped: a TLB_FLUSH kick per yield (a yield
    # needs a page zapped since the lock was taken), plus one at the end of each zap that
    # zapped a page after its last yield. Without yields: one per zap.
    for model, yields in (("voluntary", False), ("full", True)):
        events, truth = run("zap-under-load", SHORT, f"kvm.preempt_model='{model}'")
        zaps = _zap_windows(events).height
        flushes = events.filter((pl.col("kind") == Kind.KICK)
                                & (pl.col("sub") == KickReason.TLB_FLUSH)).height
        if yields:
            assert truth["zap_yields"] < flushes <= truth["zap_yields"] + zaps
            assert flushes > zaps
        else:
            assert flushes == zaps


def test_zap_under_load_zero_step_rests_on_both_defaults() -> None:
    # README: zap-under-load seed 1 arms zero-step 19 times under mainline local_retry with
    # the defaults (zaps that never yield mmu_lock, timer handlers that make no exit), and
    # never with either other choice: a preemptible host, or the Linux guest's handler.
    incidents = {}
    for name, overrides in (("defaults", ()), ("full", ("kvm.preempt_model='full'",)),
                            ("tdvmcall", ("guest.tick_exit='tdvmcall'",))):
        _, truth = run("zap-under-load", *overrides, seed=1)
        incidents[name] = truth["zero_step_incidents"]
    assert incidents == {"defaults": 19, "full": 0, "tdvmcall": 0}


@pytest.mark.parametrize("seed", [3, 4])
def test_a_teardown_waits_for_a_yielding_hole_punch_to_end(seed: int) -> None:
    # The guest_memfd file holds a reference to the VM: it is destroyed only after a hole
    # punch in flight ends. A teardown that took mmu_lock during the punch's yield zapped
    # pages the punch then removed too (TDX_EPT_ENTRY_FREE, KVM_BUG_ON, leaked pages).
    events, truth = run("fault-storm", FULL, seed=seed)
    assert truth["vms_bugged"] == 0 and truth["pages_leaked"] == 0
    runtime_done = events.filter((pl.col("kind") == Kind.ZAP_DONE)
                                 & (pl.col("sub") != ZapReason.TEARDOWN))["seq"].max()
    teardown = events.filter((pl.col("kind") == Kind.PHASE)
                             & (pl.col("sub") == Phase.TEARDOWN))["seq"].min()
    assert runtime_done is not None and teardown is not None and runtime_done < teardown


@pytest.mark.parametrize("model", ["voluntary", "full"])
def test_a_fault_spinning_on_an_invalidation_writes_one_row_per_invalidation(model: str) -> None:
    # KVM's local retry turns every ~300 ns while the GFN's invalidation is in progress: the
    # turns count in local_retries, but each wait is one FAULT_RETRY row, not one per turn
    # (that made the trace of this run 20x bigger).
    events, truth = run("fault-storm", SHORT, *PUNCH_HOT, f"kvm.preempt_model='{model}'")
    stale = events.filter((pl.col("kind") == Kind.FAULT_RETRY)
                          & (pl.col("sub") == RetryCause.STALE))
    zaps = events.filter((pl.col("kind") == Kind.ZAP) & (pl.col("sub") != ZapReason.TEARDOWN))
    per_fault = stale.group_by("corr").len()["len"]
    assert 0 < per_fault.max() <= zaps.height  # type: ignore[operator]
    assert truth["local_retries"] > 100 * stale.height  # the turns of the spins
