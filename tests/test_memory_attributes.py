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
# (scenario, overrides): VMM conversions the guest did not ask for, and the guest's own.
RUNS = {
    "zap-under-load": ("zap-under-load", (SHORT,)),
    "mapgpa-convert": ("mapgpa-convert", ("mapgpa.vmm=complete",)),
    "mapgpa-to-shared": ("mapgpa-convert", ("mapgpa.vmm=complete", "mapgpa.direction=to_shared")),
    "demo": ("demo", ()),
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def recorded(request: pytest.FixtureRequest) -> tuple[str, pl.DataFrame, dict[str, Any]]:
    name, overrides = RUNS[request.param]
    events, truth = run(name, *overrides)
    return request.param, events, truth


def _shared_at_each_fault(events: pl.DataFrame) -> list[tuple[int, bool]]:
    """(corr, was the GFN shared) for every private fault, replaying MEM_ATTR rows in order."""
    rows = events.filter(
        (pl.col("kind") == Kind.MEM_ATTR)
        | ((pl.col("kind") == Kind.PAGE_FAULT) & (pl.col("flow") == Flow.FAULT))
    ).sort("seq").select("kind", "td", "gpa", "arg0", "arg1", "corr").rows()
    shared: set[tuple[int, int]] = set()
    seen = []
    for kind, td, gpa, pages, attrs, corr in rows:
        gfn = gpa >> 12
        if kind == Kind.MEM_ATTR:
            change = {(td, g) for g in range(gfn, gfn + pages)}
            if attrs == KVM_MEMORY_ATTRIBUTE_PRIVATE:
                shared -= change
            else:
                shared |= change
        else:
            seen.append((corr, (td, gfn) in shared))
    return seen


def test_a_fault_exits_to_userspace_exactly_when_its_gfn_is_shared(
        recorded: tuple[str, pl.DataFrame, dict[str, Any]]) -> None:
    _, events, truth = recorded
    exited = set(events.filter(
        (pl.col("kind") == Kind.FAULT_DONE) & (pl.col("sub") == FaultOutcome.MEMORY_FAULT_EXIT)
    )["corr"].to_list())
    faults = _shared_at_each_fault(events)
    assert {corr for corr, shared in faults if shared} == exited
    assert truth["memory_fault_exits"] == len(exited)


def test_the_vmm_converting_behind_the_guests_back_causes_memory_fault_exits(
        recorded: tuple[str, pl.DataFrame, dict[str, Any]]) -> None:
    name, _, truth = recorded
    if name == "zap-under-load":
        assert truth["memory_fault_exits"] > 0


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
    events, _ = run(*RUNS["zap-under-load"][:1], *RUNS["zap-under-load"][1])
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
    # now on a private page, and it is resolved.
    again = events.filter((pl.col("seq") > back["seq"]) & (pl.col("vcpu") == vcpu)
                          & (pl.col("td") == fault["td"])
                          & (pl.col("kind") == Kind.PAGE_FAULT)).row(0, named=True)
    assert (again["gpa"], again["rip"]) == (gpa, fault["rip"])
    outcome = events.filter((pl.col("corr") == again["corr"])
                            & (pl.col("kind") == Kind.FAULT_DONE))["sub"].to_list()
    assert outcome[-1] in (FaultOutcome.MAPPED, FaultOutcome.ALREADY_MAPPED)


def test_mapgpa_exits_say_they_are_hypercalls() -> None:
    events, _ = run(*RUNS["mapgpa-convert"][:1], *RUNS["mapgpa-convert"][1])
    exits = events.filter((pl.col("kind") == Kind.USERSPACE_EXIT)
                          & (pl.col("flow") == Flow.MAPGPA))
    assert exits.height > 0
    assert exits["exit_reason"].unique().to_list() == [KVM_EXIT_HYPERCALL]
