"""kvm->slots_lock: one KVM_SET_MEMORY_ATTRIBUTES (or memslot update) at a time, whole.

``kvm_vm_set_mem_attributes()`` holds slots_lock for the whole ioctl, zap included, and
returns 0 without calling the invalidation handlers when the whole range already has the
attributes asked for. A zap there would bump mmu_invalidate_seq too and turn faults in flight
stale for nothing.
"""

from __future__ import annotations

from functools import partial

import polars as pl
import pyarrow as pa
import pytest
from emulator_helpers import run
from test_mapgpa_model import world

from tdxtrace.codes import KVM_MEMORY_ATTRIBUTE_PRIVATE
from tdxtrace.events import Flow, Kind, Phase, RetryCause, ZapReason
from tdxtrace.sim.scenario import Scenario, resolve
from tdxtrace.sim.world import PRIVATE_BASE_GFN, World

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


def test_a_memslot_update_waits_for_the_conversion_in_flight() -> None:
    # KVM_SET_USER_MEMORY_REGION takes slots_lock too: while a conversion waits for mmu_lock
    # (a writer holds it), the memslot update waits for the conversion, zap included.
    batches: list[pa.RecordBatch] = []
    raw = {"run": {"duration_us": 4000}, "host": {"lps": 2, "packages": 1},
           "td": {"vcpus": 1, "memory_mb": 16}, "guest": {"timer_hz": 1},
           "vmm": {"memslot_interval_us": 1_000_000}, "teardown": {"enabled": False}}
    w = World(Scenario(resolve(raw, "test")), 1, batches.append)
    td = w.tds[0]
    assert w.roots is not None

    def asks() -> None:
        td.mmu.acquire_write(lambda: w.sim.after(50_000, td.mmu.release_write))
        w.attrs.make_shared(td, PRIVATE_BASE_GFN, 8)
        w.roots._memslot(td)  # the VMM's next memslot change, due now

    w.sim.after(100_000, asks)
    w.run()
    zaps = pl.from_arrow(pa.Table.from_batches(batches)).filter(  # type: ignore[union-attr]
        pl.col("kind").is_in([Kind.ZAP, Kind.ZAP_DONE])).sort("seq")
    assert zaps.select("kind", "sub").rows() == [
        (Kind.ZAP, ZapReason.CONVERSION), (Kind.ZAP_DONE, ZapReason.CONVERSION),
        (Kind.ZAP, ZapReason.MEMSLOT), (Kind.ZAP_DONE, ZapReason.MEMSLOT)]


@pytest.mark.parametrize(("scenario", "reason", "interval_ns"), [
    ("zap-under-load", ZapReason.CONVERSION, 150_000),  # vmm.zap_interval_us
    ("fault-storm", ZapReason.TRUNCATION, 400_000),
])
def test_the_vmm_makes_one_change_at_a_time(scenario: str, reason: ZapReason,
                                            interval_ns: int) -> None:
    # One VMM thread: a syscall returns once its zap is done, so the next change is due an
    # interval after this one began, or when it returned if it took longer. (Its timer used
    # to fire regardless, and changes piled up on the locks.)
    events, _ = run(scenario, seed=2)
    zaps = events.filter(pl.col("kind").is_in([Kind.ZAP, Kind.ZAP_DONE])
                         & (pl.col("sub") == reason)).sort("seq")
    assert zaps.height > 20
    assert zaps["kind"].to_list() == [Kind.ZAP, Kind.ZAP_DONE] * (zaps.height // 2)
    done = zaps.filter(pl.col("kind") == Kind.ZAP_DONE)["ts_ns"].to_list()
    # When the VMM asked: a conversion's MEM_ATTR row (its zap waits for slots_lock), or
    # the hole punch's ZAP row.
    asked = (events.filter((pl.col("kind") == Kind.MEM_ATTR) & (pl.col("flow") == Flow.ZAP))
             if reason == ZapReason.CONVERSION else zaps.filter(pl.col("kind") == Kind.ZAP))
    asks = asked.sort("seq")["ts_ns"].to_list()[:len(done)]
    due = [max(ask + interval_ns, end) for ask, end in zip(asks, done, strict=True)]
    assert asks[1:] == due[:-1]
    assert any(end > ask + interval_ns for ask, end in zip(asks, done, strict=True))


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
