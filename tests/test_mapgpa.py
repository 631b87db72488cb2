"""mapgpa on hand-built conversions: the guest's retry rules against each kind of host answer."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tdxtrace.codes import (
    EAGAIN,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    TdvmcallLeaf,
    TdvmcallStatus,
)
from tdxtrace.events import Flow, GuestMapGpa, Kind
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace_plugins.mapgpa import MapGpa

ANALYZER = MapGpa()
MIB = 1 << 20
BASE = 0x8000_0000
CHUNK_PAGES = 512  # 2 MiB per userspace exit


class Conversion:
    """Writes one guest conversion: the guest's rows and the host's answers, 100 ns apart."""

    def __init__(self, rows: list[dict[str, Any]], corr: int, start: int, size: int, *,
                 to_private: bool = True, vcpu: int = 0, guest: bool = True) -> None:
        self.rows, self.corr, self.vcpu, self.guest_rows = rows, corr, vcpu, guest
        self.attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if to_private else 0
        self.start, self.end = start, start + size
        self.guest(GuestMapGpa.START, gpa=start, arg0=self.end, arg1=int(to_private))

    def row(self, kind: Kind, **cols: Any) -> None:
        now = self.rows[-1]["ts_ns"] + 100 if self.rows else 0
        self.rows.append({"kind": kind, "ts_ns": now, "flow": Flow.MAPGPA, "corr": self.corr,
                          "td": 0, "vcpu": self.vcpu, **cols})

    def guest(self, step: GuestMapGpa, **cols: Any) -> None:
        if self.guest_rows:
            self.row(Kind.GUEST_MAPGPA, sub=step, **cols)

    def call(self) -> None:
        self.row(Kind.TDVMCALL, arg0=TdvmcallLeaf.MAP_GPA, gpa=self.start,
                 arg1=self.end - self.start)

    def chunk(self, ret: int = 0) -> None:
        """One userspace exit of up to 2 MiB; on success the VMM changes the attributes."""
        pages = min(CHUNK_PAGES, (self.end - self.start) // 4096)
        self.row(Kind.USERSPACE_EXIT, gpa=self.start, arg0=pages, arg1=self.attrs)
        self.row(Kind.USERSPACE_RETURN, status=ret)
        if ret == 0:
            self.row(Kind.MEM_ATTR, gpa=self.start, arg0=pages, arg1=8)
            self.start += pages * 4096

    def answer(self, status: TdvmcallStatus, r11: int) -> None:
        self.row(Kind.TDVMCALL_DONE, status=status, arg0=r11, arg1=TdvmcallLeaf.MAP_GPA)

    def retry(self, r11: int | None = None) -> None:
        """Host answers RETRY (R11 = where it got to); the guest reacts as Linux does."""
        r11 = self.start if r11 is None else r11
        self.answer(TdvmcallStatus.RETRY, r11)
        if not self.start <= r11 < self.end:
            self.guest(GuestMapGpa.BAD_R11, arg0=r11)
        elif r11 == self.start:
            self.guest(GuestMapGpa.RETRY_NO_PROGRESS, arg0=r11)
        else:
            self.guest(GuestMapGpa.RETRY_PROGRESS, arg0=r11)

    def success(self) -> None:
        self.answer(TdvmcallStatus.SUCCESS, self.start)
        self.guest(GuestMapGpa.DONE)


def one_go(rows: list[dict[str, Any]], corr: int = 1) -> Conversion:
    conv = Conversion(rows, corr, BASE, 4 * MIB)
    conv.call()
    conv.chunk()
    conv.chunk()
    conv.success()
    return conv


def no_progress_give_up(rows: list[dict[str, Any]], corr: int, guest: bool = True) -> None:
    conv = Conversion(rows, corr, BASE + 64 * MIB, 2 * MIB, to_private=False, vcpu=1,
                      guest=guest)
    for _ in range(3):
        conv.call()
        conv.chunk(ret=EAGAIN)
        conv.retry()
    conv.guest(GuestMapGpa.GIVE_UP)


def test_conversion_completed_in_one_go() -> None:
    rows: list[dict[str, Any]] = []
    one_go(rows)
    result = run_analyzer(ANALYZER, make_trace(rows))
    expected = pl.DataFrame(
        {
            "corr": [1], "td": [0], "vcpu": [0], "start_gpa": [BASE], "end_gpa": [BASE + 4 * MIB],
            "bytes": [4 * MIB], "direction": ["to_private"], "tdvmcalls": [1], "chunks": [2],
            "retries": [0], "retries_progress": [0], "retries_no_progress": [0],
            "retries_bad": [0], "retries_interrupt": [0], "eagain": [0],
            "longest_no_progress": [0], "last_status": ["SUCCESS"], "outcome": ["done"],
            "start_ns": [0], "dur_ns": [900],
        },
        schema_overrides={"td": pl.Int32, "vcpu": pl.Int32, "start_gpa": pl.UInt64,
                          "end_gpa": pl.UInt64},
    )
    assert_frame_equal(result.tables["conversions"], expected)
    m = result.metrics
    assert (m["conversions"], m["bytes"], m["chunks"], m["tdvmcalls"]) == (1, 4 * MIB, 2, 1)
    assert (m["retries"], m["giveups"], m["bad_r11"], m["failed"]) == (0, 0, 0, 0)
    assert result.notes == ()


def test_progress_resets_the_retry_budget() -> None:
    rows: list[dict[str, Any]] = []
    conv = Conversion(rows, 7, BASE, 6 * MIB)
    conv.call()
    conv.chunk(ret=EAGAIN)
    conv.retry()  # no progress (1)
    conv.call()
    conv.chunk(ret=EAGAIN)
    conv.retry()  # no progress (2)
    conv.call()
    conv.chunk()
    conv.retry()  # an interrupt is pending after the first 2 MiB: progress, budget reset
    for _ in range(2):
        conv.call()
        conv.chunk(ret=EAGAIN)
        conv.retry()  # no progress (1, 2): still within the budget of 3
    conv.call()
    conv.chunk()
    conv.chunk()
    conv.success()
    result = run_analyzer(ANALYZER, make_trace(rows))
    row = result.tables["conversions"].row(0, named=True)
    assert row["outcome"] == "done"
    assert (row["tdvmcalls"], row["chunks"], row["eagain"]) == (6, 7, 4)
    assert (row["retries"], row["retries_progress"], row["retries_no_progress"]) == (5, 1, 4)
    assert row["retries_interrupt"] == 1
    assert row["longest_no_progress"] == 2
    m = result.metrics
    assert (m["retries"], m["retries_progress"], m["retries_no_progress"]) == (5, 1, 4)
    assert (m["giveups"], m["eagain"], m["retries_interrupt"]) == (0, 4, 1)


def test_three_no_progress_retries_make_the_guest_give_up() -> None:
    rows: list[dict[str, Any]] = []
    no_progress_give_up(rows, corr=3)
    result = run_analyzer(ANALYZER, make_trace(rows))
    row = result.tables["conversions"].row(0, named=True)
    assert (row["outcome"], row["direction"], row["vcpu"]) == ("gave_up", "to_shared", 1)
    assert (row["retries_no_progress"], row["longest_no_progress"], row["chunks"]) == (3, 3, 3)
    assert result.metrics["giveups"] == 1
    assert result.metrics["eagain"] == 3
    assert ANALYZER.thresholds["giveups"] == (1, 1)


def test_out_of_range_r11_is_a_bad_r11() -> None:
    rows: list[dict[str, Any]] = []
    conv = Conversion(rows, 5, BASE, 4 * MIB)
    conv.call()
    conv.chunk()
    conv.retry(r11=BASE + 4 * MIB)  # R11 == end: outside [R12, R12 + R13)
    result = run_analyzer(ANALYZER, make_trace(rows))
    row = result.tables["conversions"].row(0, named=True)
    assert (row["outcome"], row["retries"], row["retries_bad"]) == ("bad_r11", 1, 1)
    assert (row["retries_progress"], row["retries_no_progress"]) == (0, 0)
    assert result.metrics["bad_r11"] == result.metrics["bad_r11_endings"] == 1
    assert any("R11" in note for note in result.notes)


def test_a_bad_r11_the_trace_ends_on_is_the_hosts_not_yet_the_guests() -> None:
    rows: list[dict[str, Any]] = []
    ended = Conversion(rows, 5, BASE, 4 * MIB)
    ended.call()
    ended.chunk()
    ended.retry(r11=BASE + 4 * MIB)
    cut = Conversion(rows, 7, BASE + 8 * MIB, 4 * MIB)
    cut.call()
    cut.chunk()
    cut.answer(TdvmcallStatus.RETRY, BASE)  # the trace ends before the guest reads it
    result = run_analyzer(ANALYZER, make_trace(rows))
    outcomes = result.tables["conversions"]["outcome"].to_list()
    assert outcomes == ["bad_r11", "unfinished"]
    assert (result.metrics["bad_r11"], result.metrics["bad_r11_endings"]) == (2, 1)


def test_align_error_fails_the_conversion() -> None:
    rows: list[dict[str, Any]] = []
    conv = Conversion(rows, 9, BASE + 0x10, 4096)
    conv.call()
    conv.answer(TdvmcallStatus.ALIGN_ERROR, BASE + 0x10)
    conv.guest(GuestMapGpa.FAILED)
    result = run_analyzer(ANALYZER, make_trace(rows))
    row = result.tables["conversions"].row(0, named=True)
    assert (row["outcome"], row["last_status"], row["chunks"]) == ("failed", "ALIGN_ERROR", 0)
    assert (result.metrics["failed"], result.metrics["retries"]) == (1, 0)


def test_outcome_and_retry_run_summaries_over_several_conversions() -> None:
    rows: list[dict[str, Any]] = []
    one_go(rows, corr=1)
    no_progress_give_up(rows, corr=2)
    one_go(rows, corr=4)
    unfinished = Conversion(rows, 6, BASE, 2 * MIB)
    unfinished.call()  # the trace ends while userspace handles the exit
    unfinished.row(Kind.USERSPACE_EXIT, gpa=BASE, arg0=512, arg1=unfinished.attrs)
    result = run_analyzer(ANALYZER, make_trace(rows))
    assert result.tables["conversions"]["corr"].to_list() == [1, 2, 4, 6]
    expected_outcomes = pl.DataFrame({
        "outcome": ["done", "gave_up", "unfinished"], "conversions": [2, 1, 1],
        "bytes": [8 * MIB, 2 * MIB, 2 * MIB], "tdvmcalls": [2, 3, 1], "retries": [0, 3, 0],
    })
    assert_frame_equal(result.tables["by_outcome"], expected_outcomes)
    expected_runs = pl.DataFrame({"longest_no_progress": [0, 3], "conversions": [3, 1]})
    assert_frame_equal(result.tables["retry_runs"], expected_runs)
    assert result.metrics["unfinished"] == 1


def test_host_only_trace_falls_back_to_tdvmcall_sequences() -> None:
    rows: list[dict[str, Any]] = []
    no_progress_give_up(rows, corr=2, guest=False)
    result = run_analyzer(ANALYZER, make_trace(rows))
    row = result.tables["conversions"].row(0, named=True)
    assert (row["start_gpa"], row["bytes"], row["direction"]) == (BASE + 64 * MIB, 2 * MIB,
                                                                   "to_shared")
    assert row["outcome"] == "gave_up"  # inferred: three no-progress RETRYs, then silence
    assert result.metrics["giveups"] == 1
    assert any("No guest rows" in note for note in result.notes)


def test_per_batch_form_matches_the_whole_trace() -> None:
    rows: list[dict[str, Any]] = []
    one_go(rows, corr=1)
    no_progress_give_up(rows, corr=2)
    trace = make_trace(rows)
    state = ANALYZER.start(trace.metadata)
    frame = trace.events().collect()
    for offset in range(0, frame.height, 7):
        ANALYZER.feed(state, frame.slice(offset, 7))
    streamed = ANALYZER.finish(state)
    whole = ANALYZER.analyze(trace)
    assert streamed.metrics == whole.metrics
    assert_frame_equal(streamed.tables["conversions"], whole.tables["conversions"])


@pytest.mark.parametrize("rows", [[], [{"kind": Kind.SEAMCALL, "ts_ns": 0, "leaf": 6}]])
def test_trace_without_mapgpa_gives_zero_metrics_and_empty_tables(
        rows: list[dict[str, Any]]) -> None:
    result = run_analyzer("mapgpa", make_trace(rows))
    assert set(result.metrics.values()) == {0}
    assert {"conversions", "retries", "giveups"} <= result.metrics.keys()
    assert "outcome" in result.tables["conversions"].columns
    assert result.tables["by_outcome"].columns[0] == "outcome"
    assert all(t.is_empty() for t in result.tables.values())
