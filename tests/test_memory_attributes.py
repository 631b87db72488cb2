"""KVM's memory attributes: a private fault on a GFN userspace made shared never reaches AUG.

KVM compares each fault with its GFN's attribute before the S-EPT (``kvm_mmu_faultin_pfn``):
a mismatch is KVM_EXIT_MEMORY_FAULT, which the VMM answers by converting the page back. The
guest, for its part, never touches privately a page it converted to shared itself.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest
from emulator_helpers import run

from tdxtrace.codes import (
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_MEMORY_FAULT,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    Leaf,
)
from tdxtrace.events import FaultOutcome, Flow, Kind, ZapReason

SHORT = "run.duration_us=20000"
# Preempted fault handlers hold mmu_lock for read for 30 µs: conversion zaps wait for it, so
# attribute changes asked for meanwhile queue up behind each other.
CONTENDED = (SHORT, "kvm.preempt_p=0.3", "kvm.preempt_ns=30000")


def _exits_and_attributes(events: pl.DataFrame) -> list[tuple[Any, ...]]:
    """MEM_ATTR rows and memory-fault exits (FAULT_DONE MEMORY_FAULT_EXIT), in seq order."""
    return events.filter(
        (pl.col("kind") == Kind.MEM_ATTR)
        | ((pl.col("kind") == Kind.FAULT_DONE)
           & (pl.col("sub") == FaultOutcome.MEMORY_FAULT_EXIT))
    ).sort("seq").select("kind", "td", "vcpu", "gpa", "arg0", "arg1", "flow").rows()


@pytest.mark.parametrize("seed", [1, 6, 7, 8, 9, 14])  # 6, 7, 14: asks that change nothing
def test_attribute_changes_apply_in_the_order_they_were_asked_for(seed: int) -> None:
    # Every memory-fault exit is on a GFN a conversion to shared asked for; and after the VMM
    # converted a page back for a vCPU, that vCPU exits on it again only if a conversion to
    # shared was asked for after that. (A conversion asked for earlier, whose zap was still
    # waiting for mmu_lock, used to apply after the convert-back and undo it.)
    events, truth = run("zap-under-load", *CONTENDED, seed=seed)
    asked_shared: dict[tuple[int, int], int] = {}  # (td, gfn) -> position of the last ask
    converted_back: dict[tuple[int, int, int], int] = {}  # (td, vcpu, gfn) -> position
    exits = 0
    for position, (kind, td, vcpu, gpa, pages, attrs, flow) in enumerate(
            _exits_and_attributes(events)):
        gfn = gpa >> 12
        if kind == Kind.MEM_ATTR and attrs != KVM_MEMORY_ATTRIBUTE_PRIVATE:
            for g in range(gfn, gfn + pages):
                asked_shared[(td, g)] = position
        elif kind == Kind.MEM_ATTR and flow == Flow.FAULT:  # a VMM's answer to an exit
            converted_back[(td, vcpu, gfn)] = position
        elif kind == Kind.FAULT_DONE:
            exits += 1
            assert (td, gfn) in asked_shared, (seed, position)
            back = converted_back.get((td, vcpu, gfn))
            assert back is None or asked_shared[(td, gfn)] > back, (seed, position)
    assert exits == truth["memory_fault_exits"] > 0


def test_the_vmm_converting_behind_the_guests_back_causes_memory_fault_exits() -> None:
    _, truth = run("zap-under-load", SHORT)
    assert truth["memory_fault_exits"] > 0


def test_an_exit_after_local_retries_counts_them() -> None:
    # Hot pages and large conversions: faults retry locally (frozen SPTEs, or stale after a
    # zap ended while they waited for mmu_lock) while their pages are converted under them.
    # A slow guest timer: at the scenario's 50 kHz a tick is due after any wait for a zap,
    # and the retry loop leaves for it (PENDING_EVENT) before it can see the new attribute.
    events, _ = run("zap-under-load", *CONTENDED, "policy.frozen_spte=local_retry",
                    "guest.workload='hot'", "guest.hot_pages=16", "guest.hot_fraction=0.95",
                    "vmm.zap_pages=1024", "td.memory_mb=4", "guest.timer_hz=250", seed=1)
    exits = events.filter((pl.col("kind") == Kind.FAULT_DONE)
                          & (pl.col("sub") == FaultOutcome.MEMORY_FAULT_EXIT))
    retries = events.filter(pl.col("kind") == Kind.FAULT_RETRY).group_by("corr").len()
    joined = exits.join(retries, on="corr", how="left").with_columns(pl.col("len").fill_null(0))
    assert (joined["len"] > 0).any()  # the case this is about happens
    # Every FAULT_RETRY row is a turn of the loop; a spin on an invalidation in progress is
    # one row for many turns.
    assert (joined["arg0"].cast(pl.Int64) >= joined["len"].cast(pl.Int64)).all()


@pytest.mark.parametrize("seed", [1, 7, 19, 26])
@pytest.mark.parametrize("overrides", [
    (), ("mapgpa.vmm=complete",), ("mapgpa.vmm=complete", "mapgpa.direction=to_shared")],
    ids=["default", "complete", "to-shared"])
def test_the_guest_never_touches_privately_what_it_made_shared(
        overrides: tuple[str, ...], seed: int) -> None:
    # Several vCPUs convert at once: each owns its range (a new one never overlaps pages the
    # guest made shared), so one's conversion back to private cannot unmark another's pages.
    _, truth = run("mapgpa-convert", *overrides, seed=seed)
    assert truth["mapgpa_conversions"] > 0
    assert truth["memory_fault_exits"] == 0


def _adds_on_shared_gfns(events: pl.DataFrame) -> list[int]:
    """The seq of every successful AUG on a GFN that a conversion to shared had finished with
    (its zap's ZAP_DONE came first) and that no MEM_ATTR made private again since the
    conversion's own MEM_ATTR (a memory-fault exit converts single pages back meanwhile)."""
    rows = events.filter(
        pl.col("kind").is_in([Kind.MEM_ATTR, Kind.ZAP, Kind.ZAP_DONE])
        | ((pl.col("kind") == Kind.SEAMCALL) & (pl.col("leaf") == Leaf.TDH_MEM_PAGE_AUG)
           & (pl.col("status") == 0))
    ).sort("seq").select("seq", "kind", "td", "gpa", "arg0", "arg1", "corr", "sub").rows()
    asked: dict[tuple[int, int, int], int] = {}  # (td, gpa, pages) -> MEM_ATTR seq
    zaps: dict[int, tuple[int, int, int, int]] = {}  # zap corr -> (td, gpa, pages, attr seq)
    done: dict[tuple[int, int], int] = {}  # (td, gfn) -> MEM_ATTR seq of a finished conversion
    private_at: dict[tuple[int, int], int] = {}  # (td, gfn) -> last MEM_ATTR(private) seq
    wrong = []
    for seq, kind, td, gpa, pages, attrs, corr, sub in rows:
        if kind == Kind.MEM_ATTR and attrs == KVM_MEMORY_ATTRIBUTE_PRIVATE:
            for gfn in range((gpa >> 12), (gpa >> 12) + pages):
                private_at[(td, gfn)] = seq
        elif kind == Kind.MEM_ATTR:
            asked[(td, gpa, pages)] = seq
        elif kind == Kind.ZAP and sub == ZapReason.CONVERSION and (td, gpa, pages) in asked:
            zaps[corr] = (td, gpa, pages, asked.pop((td, gpa, pages)))
        elif kind == Kind.ZAP_DONE and corr in zaps:
            td, gpa, pages, attr_seq = zaps.pop(corr)
            for gfn in range(gpa >> 12, (gpa >> 12) + pages):
                done[(td, gfn)] = attr_seq
        elif kind == Kind.SEAMCALL:
            key = (td, gpa >> 12)
            if key in done and private_at.get(key, -1) < done[key]:
                wrong.append(seq)
    return wrong


@pytest.mark.parametrize("seed", range(1, 7))
def test_no_page_is_added_while_its_gfn_is_shared(seed: int) -> None:
    # A fault that waited for mmu_lock (or retried locally) while a conversion changed the
    # attribute must not AUG the page afterwards: it takes the memory-fault exit instead.
    events, truth = run("zap-under-load", SHORT, seed=seed)
    assert truth["memory_fault_exits"] > 0
    assert _adds_on_shared_gfns(events) == []


def test_the_vmm_converts_the_page_back_and_the_guest_faults_again_at_the_same_rip() -> None:
    events, _ = run("zap-under-load", SHORT)
    done = events.filter((pl.col("kind") == Kind.FAULT_DONE)
                         & (pl.col("sub") == FaultOutcome.MEMORY_FAULT_EXIT)).row(0, named=True)
    corr, vcpu, gpa = done["corr"], done["vcpu"], done["gpa"]
    rows = events.filter(pl.col("corr") == corr).sort("seq")
    assert rows["kind"].to_list() == [Kind.PAGE_FAULT, Kind.FAULT_DONE, Kind.USERSPACE_EXIT,
                                      Kind.MEM_ATTR, Kind.USERSPACE_RETURN]
    fault, _, exit_, attr, back = rows.rows(named=True)
    assert (exit_["exit_reason"], exit_["gpa"], exit_["arg0"], exit_["arg1"]) == (
        KVM_EXIT_MEMORY_FAULT, gpa, 1, KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert (attr["gpa"], attr["arg0"], attr["arg1"]) == (gpa, 1, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert back["status"] == 0
    # Re-entered, the guest repeats the access: the next fault of that vCPU is the same one,
    # now on a private page. It may go stale behind another zap and leave for the guest's
    # tick (PENDING_EVENT), but it never exits to userspace again: the page is private.
    later = events.filter((pl.col("seq") > back["seq"]) & (pl.col("vcpu") == vcpu)
                          & (pl.col("td") == fault["td"]))
    again = later.filter(pl.col("kind") == Kind.PAGE_FAULT).row(0, named=True)
    assert (again["gpa"], again["rip"]) == (gpa, fault["rip"])
    ends = later.filter((pl.col("kind") == Kind.FAULT_DONE) & (pl.col("gpa") == gpa))
    first_end = ends.filter(~pl.col("sub").is_in([FaultOutcome.PENDING_EVENT,
                                                  FaultOutcome.RESUME_GUEST]))["sub"][0]
    assert first_end in (FaultOutcome.MAPPED, FaultOutcome.ALREADY_MAPPED)


def test_mapgpa_exits_say_they_are_hypercalls() -> None:
    events, _ = run("mapgpa-convert", "mapgpa.vmm=complete")
    exits = events.filter((pl.col("kind") == Kind.USERSPACE_EXIT)
                          & (pl.col("flow") == Flow.MAPGPA))
    assert exits.height > 0
    assert exits["exit_reason"].unique().to_list() == [KVM_EXIT_HYPERCALL]
