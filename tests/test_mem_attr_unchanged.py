"""KVM_SET_MEMORY_ATTRIBUTES that changes nothing returns at once: no zap, no invalidation.

``kvm_vm_set_mem_attributes()`` checks, under slots_lock, whether the whole range already has
the attributes asked for, and if so returns 0 without calling the invalidation handlers. A
zap there would bump mmu_invalidate_seq too and turn faults in flight stale for nothing.
"""

from __future__ import annotations

import polars as pl
import pytest
from emulator_helpers import run

from tdxtrace.codes import KVM_MEMORY_ATTRIBUTE_PRIVATE
from tdxtrace.events import Flow, Kind, RetryCause, ZapReason

SHORT = "run.duration_us=20000"


def _conversion_zaps(events: pl.DataFrame) -> int:
    return events.filter((pl.col("kind") == Kind.ZAP)
                         & (pl.col("sub") == ZapReason.CONVERSION)).height


def test_converting_private_memory_to_private_changes_nothing() -> None:
    # The guest's MapGPA asks for private pages, which they are from the start: every chunk
    # is answered, and KVM neither zaps nor makes a fault stale.
    events, truth = run("mapgpa-convert", SHORT, "mapgpa.direction=to_private",
                        "faults.mapgpa_interrupt_p=0")
    asks = events.filter((pl.col("kind") == Kind.MEM_ATTR) & (pl.col("flow") == Flow.MAPGPA))
    assert asks.height > 20
    assert (asks["arg1"] == KVM_MEMORY_ATTRIBUTE_PRIVATE).all()
    assert truth["mem_attr_unchanged"] == asks.height
    assert _conversion_zaps(events) == 0
    assert truth["mapgpa_done"] == truth["mapgpa_conversions"] > 0
    stale = events.filter((pl.col("kind") == Kind.FAULT_RETRY)
                          & (pl.col("sub") == RetryCause.STALE))
    assert stale.height == 0


def test_conversions_that_change_something_still_zap() -> None:
    # Shared and back again: every ask changes the range, so each has its zap.
    events, truth = run("mapgpa-convert", SHORT)
    asks = events.filter((pl.col("kind") == Kind.MEM_ATTR) & (pl.col("flow") == Flow.MAPGPA))
    assert asks.height > 20
    assert truth.get("mem_attr_unchanged", 0) == 0
    assert _conversion_zaps(events) == asks.height


def _expected_unchanged(events: pl.DataFrame) -> tuple[int, int]:
    """Replay the MEM_ATTR rows in order, as slots_lock serializes the ioctls: how many ask
    for what their whole range already is, (to private, to shared)."""
    shared: dict[int, set[int]] = {}
    unchanged = [0, 0]
    for td, gpa, pages, attrs in events.filter(pl.col("kind") == Kind.MEM_ATTR).sort(
            "seq").select("td", "gpa", "arg0", "arg1").rows():
        gfns = range(gpa >> 12, (gpa >> 12) + pages)
        now = shared.setdefault(td, set())
        if attrs == KVM_MEMORY_ATTRIBUTE_PRIVATE:
            unchanged[0] += now.isdisjoint(gfns)
            now.difference_update(gfns)
        else:
            unchanged[1] += now.issuperset(gfns)
            now.update(gfns)
    return unchanged[0], unchanged[1]


@pytest.mark.parametrize("seed", [2, 5, 6])  # one unchanged ask each, of either side
def test_only_the_asks_that_change_nothing_skip_the_zap(seed: int) -> None:
    # zap-under-load: the VMM converts random ranges to shared and converts back the pages
    # vCPUs fault on privately; two vCPUs faulting on one page both have it converted back,
    # and the second ask finds it private already. Every other ask to shared zaps once (to
    # private zaps nothing here: the scenario has no direct roots).
    events, truth = run("zap-under-load", SHORT, seed=seed)
    to_private, to_shared = _expected_unchanged(events)
    assert truth.get("mem_attr_unchanged", 0) == to_private + to_shared
    asks = events.filter((pl.col("kind") == Kind.MEM_ATTR)
                         & (pl.col("arg1") != KVM_MEMORY_ATTRIBUTE_PRIVATE)).height
    assert _conversion_zaps(events) == asks - to_shared
