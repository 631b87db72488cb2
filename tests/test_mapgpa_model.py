"""The emulator's MapGPA: the guest's retry rules, KVM's validation and chunking, VMM variants.

Each test drives one conversion on a one-vCPU TD whose timer never fires during the run, so
every RETRY in it has the cause the test sets up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from tdxtrace.codes import (
    EAGAIN,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    ExitReason,
    TdvmcallStatus,
)
from tdxtrace.events import GuestMapGpa, Kind, ZapReason
from tdxtrace.sim.mapgpa import MAP_GPA, validate
from tdxtrace.sim.roots_guest import SHARED_BIT
from tdxtrace.sim.scenario import Scenario, resolve
from tdxtrace.sim.world import PRIVATE_BASE_GFN, World

MIB = 1 << 20
BASE = PRIVATE_BASE_GFN << 12
SUCCESS, RETRY = int(TdvmcallStatus.SUCCESS), int(TdvmcallStatus.RETRY)
INVALID, ALIGN = int(TdvmcallStatus.INVALID_OPERAND), int(TdvmcallStatus.ALIGN_ERROR)


class Run:
    """A one-vCPU TD whose timer never fires during the run, and the batches it writes."""

    def __init__(self, faults: dict[str, Any] | None = None, **mapgpa: Any) -> None:
        raw = {
            "run": {"duration_us": 4000},
            "host": {"lps": 2, "packages": 1},
            "td": {"vcpus": 1, "memory_mb": 16},
            "guest": {"timer_hz": 1},
            # Conversions come from the test only: the first periodic one is due at 1 s.
            "mapgpa": {"interval_us": 1_000_000, **mapgpa},
            "faults": faults or {},
            "teardown": {"enabled": False},
        }
        self.batches: list[pa.RecordBatch] = []
        self.world = World(Scenario(resolve(raw, "test")), 1, self.batches.append)


def world(faults: dict[str, Any] | None = None, **mapgpa: Any) -> Run:
    return Run(faults, **mapgpa)


def convert(run: Run, start: int, end: int, to_private: bool = False,
            prepare: Callable[[World], None] | None = None) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Run with one guest conversion of [start, end); all rows and the truth counters."""
    w = run.world
    assert w.mapgpa is not None
    w.sim.after(200_000, w.mapgpa.request, w.tds[0].vcpus[0], start, end, to_private)
    if prepare is not None:
        prepare(w)
    w.run()
    frame = pl.from_arrow(pa.Table.from_batches(run.batches))
    assert isinstance(frame, pl.DataFrame)
    return frame, w.log.truth()


def rows_of(frame: pl.DataFrame, kind: Kind) -> pl.DataFrame:
    start = frame.filter((pl.col("kind") == Kind.GUEST_MAPGPA)
                         & (pl.col("sub") == GuestMapGpa.START))
    assert start.height == 1
    corr = start["corr"][0]
    return frame.filter((pl.col("corr") == corr) & (pl.col("kind") == kind)).sort("seq")


def guest_steps(frame: pl.DataFrame) -> list[GuestMapGpa]:
    return [GuestMapGpa(s) for s in rows_of(frame, Kind.GUEST_MAPGPA)["sub"]]


def answers(frame: pl.DataFrame) -> list[tuple[int, int]]:
    done = rows_of(frame, Kind.TDVMCALL_DONE)
    return list(zip(done["status"].to_list(), done["arg0"].to_list(), strict=True))


def scripted_vmm(w: World, script: list[int]) -> None:
    """Replace the VMM's answers: 0 converts the chunk, EAGAIN refuses it (one per exit)."""
    assert w.mapgpa is not None
    vmm = w.mapgpa.vmm
    real = vmm.handle
    left = list(script)

    def handle(v: Any, conv: Any, gpa: int, pages: int, attrs: int,
               answer: Callable[[int], None]) -> None:
        if left.pop(0) == EAGAIN:
            answer(EAGAIN)
        else:
            real(v, conv, gpa, pages, attrs, answer)

    vmm.handle = handle  # type: ignore[method-assign]


# --- KVM's validation of R12 / R13 ---------------------------------------------------------

@pytest.mark.parametrize(("gpa", "size", "status"), [
    (BASE, 2 * MIB, None),
    (BASE | SHARED_BIT, 4096, None),
    (BASE, 0, INVALID),  # zero size
    ((1 << 64) - 4096, 8192, INVALID),  # gpa + size wraps
    (1 << 48, 4096, INVALID),  # not a legal GPA with GPAW 48
    ((1 << 48) - 4096, 8192, INVALID),  # the end is not legal
    (SHARED_BIT - 4096, 8192, INVALID),  # private start, shared end
    (BASE + 0x10, 4096, ALIGN),
    (BASE, 6144, ALIGN),
    (SHARED_BIT - 0x800, 0x1000, INVALID),  # both wrong: INVALID_OPERAND is checked first
])
def test_validation(gpa: int, size: int, status: int | None) -> None:
    assert validate(gpa, size) == status


@pytest.mark.parametrize(("start", "end", "status"), [
    (BASE + 0x10, BASE + 0x10 + 4096, ALIGN),
    (SHARED_BIT - 4096, SHARED_BIT + 4096, INVALID),
])
def test_a_rejected_range_fails_at_once_with_r11_equal_to_r12(start: int, end: int,
                                                               status: int) -> None:
    frame, truth = convert(world(), start, end)
    assert answers(frame) == [(status, start)]
    assert rows_of(frame, Kind.USERSPACE_EXIT).height == 0
    assert guest_steps(frame) == [GuestMapGpa.START, GuestMapGpa.FAILED]
    assert truth["mapgpa_failed"] == 1


# --- chunking and the well-behaved VMM -----------------------------------------------------

def test_five_mib_to_shared_is_three_userspace_exits_then_success() -> None:
    start, end = BASE | SHARED_BIT, (BASE + 5 * MIB) | SHARED_BIT
    frame, truth = convert(world(), start, end)
    exits = rows_of(frame, Kind.USERSPACE_EXIT)
    assert exits["gpa"].to_list() == [BASE, BASE + 2 * MIB, BASE + 4 * MIB]  # no shared bit
    assert exits["arg0"].to_list() == [512, 512, 256]
    assert set(exits["arg1"]) == {KVM_MAP_GPA_RANGE_DECRYPTED}
    calls = rows_of(frame, Kind.TDVMCALL)
    assert (calls["gpa"].to_list(), calls["arg1"].to_list()) == ([start], [5 * MIB])
    # On success KVM writes no R11: it keeps the guest's sub-function (TDG.VP.VMCALL<MapGPA>).
    assert answers(frame) == [(SUCCESS, MAP_GPA)]
    assert guest_steps(frame) == [GuestMapGpa.START, GuestMapGpa.DONE]
    attrs = rows_of(frame, Kind.MEM_ATTR)
    assert attrs["arg0"].to_list() == [512, 512, 256] and set(attrs["arg1"]) == {0}
    # The guest's TDVMCALL is a TD exit with reason TDCALL.
    assert frame.filter((pl.col("kind") == Kind.TD_EXIT)
                        & (pl.col("exit_reason") == ExitReason.TDCALL)).height == 1
    assert truth["mapgpa_userspace_exits"] == 3 and truth["mapgpa_done"] == 1


def test_the_vmm_answers_after_the_conversion_zap_finished() -> None:
    frame, _ = convert(world(), BASE | SHARED_BIT, (BASE + 2 * MIB) | SHARED_BIT)
    zap = frame.filter((pl.col("kind") == Kind.ZAP) & (pl.col("sub") == ZapReason.CONVERSION))
    assert zap.height == 1 and zap["gpa"][0] == BASE and zap["arg0"][0] == 512
    done = frame.filter((pl.col("kind") == Kind.ZAP_DONE) & (pl.col("corr") == zap["corr"][0]))
    attr_seq = rows_of(frame, Kind.MEM_ATTR)["seq"][0]
    ret_seq = rows_of(frame, Kind.USERSPACE_RETURN)["seq"][0]
    assert attr_seq < zap["seq"][0] < done["seq"][0] < ret_seq
    assert zap["corr"][0] != rows_of(frame, Kind.MEM_ATTR)["corr"][0]  # the zap's own corr


def test_to_private_sets_the_private_attribute_and_zaps_only_shared_leaves() -> None:
    def shared_first(w: World) -> None:  # else the range is private already: KVM does nothing
        w.sim.after(100_000, w.attrs.make_shared, w.tds[0], BASE >> 12, 512)

    frame, _ = convert(world(), BASE, BASE + 2 * MIB, to_private=True, prepare=shared_first)
    assert rows_of(frame, Kind.USERSPACE_EXIT)["arg1"].to_list() == [KVM_MAP_GPA_RANGE_ENCRYPTED]
    attr = rows_of(frame, Kind.MEM_ATTR)
    assert attr["arg1"].to_list() == [KVM_MEMORY_ATTRIBUTE_PRIVATE]
    zap = frame.filter((pl.col("kind") == Kind.ZAP) & (pl.col("sub") == ZapReason.CONVERSION)
                       & (pl.col("seq") > attr["seq"][0]))
    assert zap.height == 1
    in_zap = frame.filter(pl.col("corr") == zap["corr"][0])
    assert in_zap.filter(pl.col("kind") == Kind.SEAMCALL).height == 0  # direct root only
    assert guest_steps(frame)[-1] == GuestMapGpa.DONE


# --- the guest's retry budget ----------------------------------------------------------------

def test_three_no_progress_retries_make_the_guest_give_up() -> None:
    frame, truth = convert(world(vmm="no_progress", no_progress_calls=3),
                           BASE | SHARED_BIT, (BASE + 4 * MIB) | SHARED_BIT)
    start = BASE | SHARED_BIT
    assert answers(frame) == [(RETRY, start)] * 3  # EAGAIN: R11 = map_gpa_next = R12
    assert guest_steps(frame) == [GuestMapGpa.START, *[GuestMapGpa.RETRY_NO_PROGRESS] * 3,
                                  GuestMapGpa.GIVE_UP]
    assert rows_of(frame, Kind.USERSPACE_RETURN)["status"].to_list() == [EAGAIN] * 3
    assert rows_of(frame, Kind.MEM_ATTR).height == 0
    assert rows_of(frame, Kind.GUEST_MAPGPA)["arg1"].to_list() == [0, 1, 2, 3, 3]
    assert (truth["mapgpa_giveups"], truth["mapgpa_retries"]) == (1, 3)


def test_two_no_progress_retries_are_within_the_budget() -> None:
    frame, truth = convert(world(vmm="no_progress", no_progress_calls=2),
                           BASE | SHARED_BIT, (BASE + 2 * MIB) | SHARED_BIT)
    assert guest_steps(frame) == [GuestMapGpa.START, GuestMapGpa.RETRY_NO_PROGRESS,
                                  GuestMapGpa.RETRY_NO_PROGRESS, GuestMapGpa.DONE]
    assert rows_of(frame, Kind.TDVMCALL).height == 3
    assert truth["mapgpa_giveups"] == 0 and truth["mapgpa_done"] == 1


def test_partial_progress_is_not_counted_against_the_budget() -> None:
    start, end = BASE | SHARED_BIT, (BASE + 8 * MIB) | SHARED_BIT
    frame, truth = convert(world(vmm="partial", partial_pages=512), start, end)
    assert answers(frame) == [(RETRY, start + 2 * MIB), (RETRY, start + 4 * MIB),
                              (RETRY, start + 6 * MIB), (SUCCESS, MAP_GPA)]
    assert guest_steps(frame) == [GuestMapGpa.START, *[GuestMapGpa.RETRY_PROGRESS] * 3,
                                  GuestMapGpa.DONE]
    assert rows_of(frame, Kind.TDVMCALL)["gpa"].to_list() == [
        start, start + 2 * MIB, start + 4 * MIB, start + 6 * MIB]
    assert truth["mapgpa_giveups"] == 0 and truth["mapgpa_retries"] == 3


def test_progress_resets_the_no_progress_count() -> None:
    start = BASE | SHARED_BIT
    # Per userspace exit: refuse, refuse, convert + refuse (progress), refuse, refuse, convert x2.
    frame, truth = convert(world(), start, start + 4 * MIB,
                           prepare=lambda w: scripted_vmm(w, [EAGAIN, EAGAIN, 0, EAGAIN, EAGAIN,
                                                              EAGAIN, 0]))
    no, yes = GuestMapGpa.RETRY_NO_PROGRESS, GuestMapGpa.RETRY_PROGRESS
    assert guest_steps(frame) == [GuestMapGpa.START, no, no, yes, no, no, GuestMapGpa.DONE]
    assert [r11 for _, r11 in answers(frame)][:3] == [start, start, start + 2 * MIB]
    assert truth["mapgpa_giveups"] == 0


def test_an_out_of_range_r11_fails_the_conversion_at_once() -> None:
    start, end = BASE | SHARED_BIT, (BASE + 4 * MIB) | SHARED_BIT
    frame, truth = convert(world(vmm="bad_r11"), start, end)
    assert answers(frame) == [(RETRY, end)]
    assert guest_steps(frame) == [GuestMapGpa.START, GuestMapGpa.BAD_R11]
    assert rows_of(frame, Kind.TDVMCALL).height == 1
    assert (truth["mapgpa_bad_r11"], truth["mapgpa_giveups"]) == (1, 0)


def test_einval_from_userspace_is_invalid_operand() -> None:
    start = BASE | SHARED_BIT
    frame, truth = convert(world(vmm="reject"), start, start + 2 * MIB)
    assert rows_of(frame, Kind.USERSPACE_RETURN)["status"].to_list() == [22]
    assert answers(frame) == [(INVALID, start)]
    assert guest_steps(frame) == [GuestMapGpa.START, GuestMapGpa.FAILED]
    assert truth["mapgpa_failed"] == 1


# --- interrupts pending between chunks -----------------------------------------------------

def test_an_injected_interrupt_after_each_chunk_makes_kvm_answer_retry_with_the_next_gpa() -> None:
    start = BASE | SHARED_BIT
    frame, truth = convert(world({"mapgpa_interrupt_p": 1.0}), start, start + 6 * MIB)
    assert answers(frame) == [(RETRY, start + 2 * MIB), (RETRY, start + 4 * MIB),
                              (SUCCESS, MAP_GPA)]
    assert rows_of(frame, Kind.USERSPACE_RETURN)["status"].to_list() == [0, 0, 0]
    assert truth["mapgpa_retries_interrupt"] == 2


def test_a_due_timer_is_a_pending_interrupt_too() -> None:
    start = BASE | SHARED_BIT

    def timer_due_after_first_exit(w: World) -> None:
        assert w.mapgpa is not None
        vmm = w.mapgpa.vmm
        real = vmm.handle

        def handle(v: Any, *args: Any) -> None:
            if not v.index and vmm.log.counters["mapgpa_userspace_exits"] == 1:
                v.next_timer = w.sim.now  # the guest's timer fires while userspace works
            real(v, *args)

        vmm.handle = handle  # type: ignore[method-assign,assignment]

    frame, _ = convert(world(), start, start + 4 * MIB, prepare=timer_due_after_first_exit)
    assert answers(frame) == [(RETRY, start + 2 * MIB), (SUCCESS, MAP_GPA)]
    # The guest takes the interrupt (an EXTERNAL_INTERRUPT exit) before it re-issues.
    retry_seq = rows_of(frame, Kind.TDVMCALL_DONE)["seq"][0]
    second_call = rows_of(frame, Kind.TDVMCALL)["seq"][1]
    between = frame.filter((pl.col("seq") > retry_seq) & (pl.col("seq") < second_call)
                           & (pl.col("kind") == Kind.TD_EXIT))
    assert ExitReason.EXTERNAL_INTERRUPT in between["exit_reason"].to_list()


def test_the_built_in_scenario_converts_and_retries() -> None:
    from tdxtrace.sim.scenario import load_scenario

    batches: list[pa.RecordBatch] = []
    w = World(load_scenario("mapgpa-convert", ["run.duration_us=5000"]), 2, batches.append)
    w.run()
    frame = pl.from_arrow(pa.Table.from_batches(batches))
    assert isinstance(frame, pl.DataFrame)
    truth = w.log.truth()
    starts = frame.filter((pl.col("kind") == Kind.GUEST_MAPGPA)
                          & (pl.col("sub") == GuestMapGpa.START))
    retries = frame.filter((pl.col("kind") == Kind.TDVMCALL_DONE) & (pl.col("status") == RETRY))
    assert truth["mapgpa_conversions"] == starts.height > 0
    assert truth["mapgpa_retries"] == retries.height > 0
    assert truth["mapgpa_userspace_exits"] == frame.filter(
        pl.col("kind") == Kind.USERSPACE_EXIT).height
