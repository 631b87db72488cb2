"""kvm->slots_lock: one KVM_SET_MEMORY_ATTRIBUTES (or memslot update) at a time, whole.

``kvm_vm_set_mem_attributes()`` holds slots_lock for the whole ioctl, zap included, and
returns 0 without calling the invalidation handlers when the whole range already has the
attributes asked for. A zap there would bump mmu_invalidate_seq too and turn faults in flight
stale for nothing.
"""

from __future__ import annotations

from functools import partial

import polars as pl
import pytest
from emulator_helpers import run
from test_mapgpa_model import world

from tdxtrace.codes import KVM_MEMORY_ATTRIBUTE_PRIVATE
from tdxtrace.events import Flow, Kind, Phase, RetryCause, ZapReason
from tdxtrace.sim.world import PRIVATE_BASE_GFN

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


def test_an_ask_returns_once_the_range_has_the_attribute() -> None:
    # The VMM converts a page to shared while a writer holds mmu_lock, then two vCPU threads
    # ask for it back. slots_lock holds each ask for its whole ioctl: the second waits for
    # the first, then finds the page private (it changes nothing); neither returns before.
    run = world()
    w, td = run.world, run.world.tds[0]
    gfn = PRIVATE_BASE_GFN + 5
    returned: list[tuple[str, bool]] = []

    def answer(name: str) -> None:
        returned.append((name, w.attrs.is_shared(td, gfn)))

    def asks() -> None:
        w.attrs.make_shared(td, gfn, 1, partial(answer, "shared"))
        td.mmu.acquire_write(lambda: w.sim.after(50_000, td.mmu.release_write))
        for name in ("first", "second"):
            w.attrs.make_private(td, gfn, 1, partial(answer, name))

    w.sim.after(100_000, asks)
    w.run()
    assert returned == [("shared", True), ("first", False), ("second", False)]
    assert w.log.truth()["mem_attr_unchanged"] == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_teardown_waits_for_the_conversion_in_flight(seed: int) -> None:
    # A VM is destroyed when its last file reference goes: an ioctl the VMM had started (a
    # conversion waiting for slots_lock) ends first, so no conversion zap starts once the
    # teardown has, and none races its zap of the private pages (seed 1 once ended in a
    # BLOCK of a page the conversion had removed: EPT_ENTRY_FREE, VM bugged).
    events, truth = run("zap-under-load", seed=seed)
    teardown = events.filter(pl.col("kind") == Kind.PHASE).filter(
        pl.col("sub") == Phase.TEARDOWN)["seq"].min()
    conversions = events.filter((pl.col("kind") == Kind.ZAP)
                                & (pl.col("sub") == ZapReason.CONVERSION))
    assert teardown is not None and conversions.height > 0
    assert conversions["seq"].max() < teardown
    assert truth.get("vms_bugged", 0) == 0
