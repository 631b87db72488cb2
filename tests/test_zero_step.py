"""zero_step: runs of private EPT violations at one RIP, incidents, their windows and causes."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tdxtrace.codes import EXIT_REASON_INVALID, ExitReason, Leaf, OperandId, Status
from tdxtrace.events import FaultOutcome, Flow, Kind, RetryCause
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace_plugins.zero_step import INCIDENT_SCHEMA, ZeroStep, register_analyzers

BUSY_SEPT = int(Status.OPERAND_BUSY) | int(OperandId.SEPT_TREE)
EPT = int(ExitReason.EPT_VIOLATION)
SHARED = 1 << 47
RIP = 0xFFFFFFFF81000007
OTHER_RIP = 0xFFFFFFFF8100000E


class Rows:
    """A tiny trace, one vCPU event after another; every row 100 ns after the previous one."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.ts = 0
        self.corr = 1000

    def add(self, kind: Kind, *, gap: int = 100, **cols: Any) -> int:
        self.ts += gap
        self.rows.append({"kind": kind, "ts_ns": self.ts, "flow": 0, "sub": 0, **cols})
        return self.ts

    def exit(self, vcpu: int, rip: int = RIP, gpa: int | None = 0x5000, reason: int = EPT,
             td: int = 0) -> int:
        return self.add(Kind.TD_EXIT, flow=Flow.RUN, td=td, vcpu=vcpu, leaf=0, rip=rip,
                        gpa=gpa if reason == EPT else None, exit_reason=reason, status=reason)

    def busy_exit(self, vcpu: int, status: int = BUSY_SEPT, td: int = 0,
                  rip: int | None = RIP) -> int:
        return self.add(Kind.TD_EXIT, flow=Flow.RUN, td=td, vcpu=vcpu, leaf=0, rip=rip,
                        status=status, exit_reason=EXIT_REASON_INVALID)

    def faults(self, vcpu: int, count: int, rip: int = RIP, gpa: int = 0x5000,
               td: int = 0) -> list[int]:
        return [self.exit(vcpu, rip, gpa, td=td) for _ in range(count)]

    def handle(self, vcpu: int, gpa: int, outcome: FaultOutcome,
               retries: tuple[RetryCause, ...] = (), took: int = 1_000, td: int = 0) -> int:
        """One fault-handler invocation: PAGE_FAULT, FAULT_RETRY per cause, FAULT_DONE."""
        self.corr += 1
        common = {"flow": Flow.FAULT, "corr": self.corr, "td": td, "vcpu": vcpu, "gpa": gpa}
        start = self.add(Kind.PAGE_FAULT, rip=RIP, arg0=2, **common)
        for cause in retries:
            self.add(Kind.FAULT_RETRY, gap=1, **{**common, "sub": cause})
        self.add(Kind.FAULT_DONE, gap=start + took - self.ts, arg0=len(retries),
                 **{**common, "sub": outcome})
        return start

    def fault_handled(self, vcpu: int, count: int, gpa: int = 0x5000, **kw: Any) -> None:
        for _ in range(count):
            self.exit(vcpu, RIP, gpa)
            self.handle(vcpu, gpa, **kw)

    def seamcall(self, leaf: Leaf, status: int, vcpu: int | None, td: int = 0) -> int:
        return self.add(Kind.SEAMCALL, td=td, vcpu=vcpu, leaf=leaf, status=status, gpa=0x9000,
                        level=0, dur_ns=500)

    def analyze(self) -> Any:
        return run_analyzer(ZeroStep(), make_trace(self.rows))


def incidents(result: Any) -> pl.DataFrame:
    table: pl.DataFrame = result.tables["incidents"]
    return table


@pytest.mark.parametrize(("faults", "expected"), [(5, 0), (6, 1), (7, 1)])
def test_the_sixth_fault_at_one_rip_arms_the_module(faults: int, expected: int) -> None:
    rows = Rows()
    times = rows.faults(0, faults)
    result = rows.analyze()
    assert result.metrics["incidents"] == expected
    assert result.metrics["max_run"] == faults
    if expected:
        row = incidents(result).row(0, named=True)
        assert row["armed_ns"] == times[5]
        assert row["start_ns"] == times[0]
        # The module lists GPAs from the 7th fault on: none with exactly six.
        assert row["listed_gpas"] == (1 if faults == 7 else 0)


def test_incident_row_with_listed_gpas_synthesized_exits_and_progress() -> None:
    rows = Rows()
    times = rows.faults(0, 6, gpa=0x5000)
    rows.faults(0, 1, gpa=0x7123)  # 7th: the real fault that lists page 0x7000
    rows.faults(0, 2, gpa=0x7000)  # exits on a listed page: synthesized
    rows.faults(0, 1, gpa=0x8000)  # a second listed page
    progress = rows.exit(0, OTHER_RIP, reason=int(ExitReason.HLT))
    expected = pl.DataFrame(
        [{"td": 0, "vcpu": 0, "rip": RIP, "start_ns": times[0], "armed_ns": times[5],
          "end_ns": progress, "faults": 10, "listed_gpas": 2, "first_listed_gpa": 0x7000,
          "synthesized_exits": 2, "vp_enter_busy_sept": 0, "other_vcpu_mem_busy_sept": 0,
          "cause": "other"}],
        schema=INCIDENT_SCHEMA,
    )
    result = rows.analyze()
    assert_frame_equal(incidents(result), expected)
    assert result.metrics["synthesized_exits"] == 2


def test_an_exit_at_another_rip_resets_the_run() -> None:
    rows = Rows()
    rows.faults(0, 4)
    rows.exit(0, OTHER_RIP, reason=int(ExitReason.EXTERNAL_INTERRUPT))
    rows.faults(0, 4)
    result = rows.analyze()
    assert result.metrics["incidents"] == 0
    assert result.metrics["max_run"] == 4
    assert_frame_equal(result.tables["runs_hist"],
                       pl.DataFrame({"run_length": [4], "runs": [2]}))


def test_a_fault_at_another_rip_also_resets() -> None:
    rows = Rows()
    rows.faults(0, 5)
    rows.faults(0, 1, rip=OTHER_RIP)
    rows.faults(0, 5)
    result = rows.analyze()
    assert result.metrics["incidents"] == 0
    assert result.metrics["runs"] == 2


def test_two_vcpus_alternating_at_the_same_rip_do_not_merge() -> None:
    rows = Rows()
    for _ in range(4):
        rows.faults(0, 1)
        rows.faults(1, 1)
    result = rows.analyze()
    assert result.metrics["incidents"] == 0
    assert_frame_equal(result.tables["runs_hist"],
                       pl.DataFrame({"run_length": [4], "runs": [2]}))
    for _ in range(2):
        rows.faults(0, 1)
        rows.faults(1, 1)
    last_0 = rows.exit(0, RIP, reason=int(ExitReason.EXTERNAL_INTERRUPT))
    last_1 = rows.busy_exit(1)
    result = rows.analyze()
    assert result.metrics["incidents"] == 2
    assert result.metrics["vcpus_affected"] == 2
    # No progress before the trace ends: each run ends at its own vCPU's last exit.
    assert incidents(result).select("vcpu", "end_ns").rows() == [(0, last_0), (1, last_1)]


def test_progress_of_one_vcpu_does_not_reset_another() -> None:
    rows = Rows()
    for i in range(6):
        rows.faults(0, 1)
        rows.exit(1, OTHER_RIP + 16 * i, reason=int(ExitReason.HLT))
    result = rows.analyze()
    assert result.metrics["incidents"] == 1
    assert incidents(result).get_column("vcpu").to_list() == [0]


def test_same_rip_on_another_td_does_not_merge() -> None:
    rows = Rows()
    for _ in range(3):
        rows.faults(0, 1, td=0)
        rows.faults(0, 1, td=1)
    assert rows.analyze().metrics["max_run"] == 3


def test_non_ept_shared_and_busy_exits_neither_count_nor_reset() -> None:
    rows = Rows()
    for _ in range(5):
        rows.faults(0, 1)
        rows.exit(0, RIP, reason=int(ExitReason.EXTERNAL_INTERRUPT))
        rows.exit(0, RIP, gpa=0x6000 | SHARED)  # shared GPA: not counted by the module
        # kvm_exit of a VP.ENTER that failed: its RIP is not the guest's; it must not reset.
        rows.busy_exit(0, status=int(Status.OPERAND_BUSY) | int(OperandId.TD_EPOCH), rip=0)
    result = rows.analyze()
    assert result.metrics["incidents"] == 0
    assert result.metrics["max_run"] == 5
    rows.faults(0, 1)
    result = rows.analyze()
    assert result.metrics["incidents"] == 1
    assert incidents(result).get_column("faults").to_list() == [6]


def test_empty_trace() -> None:
    result = run_analyzer(ZeroStep(), make_trace([]))
    assert result.metrics == {
        "incidents": 0, "vcpus_affected": 0, "synthesized_exits": 0, "vp_enter_busy_sept": 0,
        "other_vcpu_busy_sept": 0, "max_run": 0, "runs": 0,
    }
    assert incidents(result).schema == pl.Schema(INCIDENT_SCHEMA)
    for name in ("runs_hist", "timeline", "by_vcpu"):
        assert result.tables[name].is_empty()
    assert result.tables["timeline"].columns[:5] == ["td", "vcpu", "start_ns", "end_ns", "state"]


def test_vp_enter_busy_sept_inside_the_incident_is_counted() -> None:
    rows = Rows()
    rows.busy_exit(0)  # before the run: not in the incident window
    rows.faults(0, 7)
    rows.busy_exit(0)
    rows.busy_exit(0)
    rows.busy_exit(0, status=int(Status.OPERAND_BUSY) | int(OperandId.TD_EPOCH))  # not SEPT
    rows.busy_exit(1)  # another vCPU's own BUSY
    rows.faults(0, 1)
    rows.exit(0, OTHER_RIP, reason=int(ExitReason.HLT))
    result = rows.analyze()
    assert incidents(result).get_column("vp_enter_busy_sept").to_list() == [2]
    assert result.metrics["vp_enter_busy_sept"] == 2
    assert_frame_equal(
        result.tables["by_vcpu"],
        pl.DataFrame({"td": [0, 0], "vcpu": [0, 1], "incidents": [1, 0],
                      "faults_in_incidents": [8, 0], "busy_sept": [3, 1]},
                     schema_overrides={"td": pl.Int32, "vcpu": pl.Int32}),
    )


def test_mem_busy_sept_on_other_vcpus_inside_the_window_is_counted() -> None:
    rows = Rows()
    rows.seamcall(Leaf.TDH_MEM_PAGE_AUG, BUSY_SEPT, vcpu=1)  # before: not counted
    rows.faults(0, 3)
    rows.faults(2, 6)  # a second incident, on vCPU 2, overlapping vCPU 0's
    rows.faults(0, 3)
    rows.seamcall(Leaf.TDH_MEM_PAGE_AUG, BUSY_SEPT, vcpu=1)  # in both windows
    rows.seamcall(Leaf.TDH_MEM_RANGE_BLOCK, BUSY_SEPT, vcpu=None)  # zap path, both
    rows.seamcall(Leaf.TDH_MEM_SEPT_ADD, BUSY_SEPT, vcpu=0)  # vCPU 0: only for vCPU 2
    rows.seamcall(Leaf.TDH_MEM_PAGE_AUG, BUSY_SEPT, vcpu=1, td=1)  # another TD
    rows.seamcall(Leaf.TDH_MEM_PAGE_AUG, int(Status.OPERAND_BUSY) | 0x1, vcpu=1)  # not SEPT
    rows.seamcall(Leaf.TDH_PHYMEM_PAGE_WBINVD, BUSY_SEPT, vcpu=1)  # not a TDH.MEM.* leaf
    rows.exit(0, OTHER_RIP, reason=int(ExitReason.HLT))
    rows.exit(2, OTHER_RIP, reason=int(ExitReason.HLT))
    rows.seamcall(Leaf.TDH_MEM_PAGE_AUG, BUSY_SEPT, vcpu=1)  # after both: not counted
    result = rows.analyze()
    table = incidents(result).select("vcpu", "other_vcpu_mem_busy_sept")
    assert table.rows() == [(0, 2), (2, 3)]
    assert result.metrics["other_vcpu_busy_sept"] == 3  # distinct calls


def test_cause_frozen_spte_retry() -> None:
    rows = Rows()
    rows.fault_handled(0, 6, outcome=FaultOutcome.RESUME_GUEST,
                       retries=(RetryCause.FROZEN_SPTE,))
    assert incidents(rows.analyze()).get_column("cause").to_list() == ["frozen_spte_contention"]


def test_cause_frozen_spte_from_resume_guest_while_another_vcpu_is_in_flight() -> None:
    rows = Rows()
    rows.exit(1, OTHER_RIP, 0x5000)
    rows.corr += 1
    winner = {"flow": Flow.FAULT, "corr": rows.corr, "td": 0, "vcpu": 1, "gpa": 0x5000}
    rows.add(Kind.PAGE_FAULT, rip=OTHER_RIP, **winner)
    rows.fault_handled(0, 6, outcome=FaultOutcome.RESUME_GUEST)
    rows.add(Kind.FAULT_DONE, **{**winner, "sub": FaultOutcome.MAPPED})
    assert incidents(rows.analyze()).get_column("cause").to_list() == ["frozen_spte_contention"]


def test_cause_frozen_spte_when_the_winner_starts_during_the_fault() -> None:
    rows = Rows()
    rows.fault_handled(0, 5, outcome=FaultOutcome.RESUME_GUEST)
    rows.exit(0, RIP, 0x5000)
    rows.corr += 2
    loser = {"flow": Flow.FAULT, "corr": rows.corr - 1, "td": 0, "vcpu": 0, "gpa": 0x5000}
    winner = {"flow": Flow.FAULT, "corr": rows.corr, "td": 0, "vcpu": 1, "gpa": 0x5000}
    rows.add(Kind.PAGE_FAULT, rip=RIP, **loser)
    rows.add(Kind.PAGE_FAULT, rip=OTHER_RIP, **winner)
    rows.add(Kind.FAULT_DONE, **{**loser, "sub": FaultOutcome.RESUME_GUEST})
    rows.add(Kind.FAULT_DONE, **{**winner, "sub": FaultOutcome.MAPPED})
    assert incidents(rows.analyze()).get_column("cause").to_list() == ["frozen_spte_contention"]


def test_faults_handled_before_a_vcpus_first_exit_belong_to_no_run() -> None:
    rows = Rows()
    rows.fault_handled(0, 6, outcome=FaultOutcome.MAPPED, gpa=0x5000)
    # vCPU 1's trace starts inside a fault handler (e.g. an import started mid-run).
    rows.handle(1, 0x9000, FaultOutcome.PENDING_EVENT, retries=(RetryCause.FROZEN_SPTE,))
    for gpa in range(0x10000, 0x16000, 0x1000):
        rows.exit(1, RIP, gpa)
        rows.handle(1, gpa, FaultOutcome.MAPPED)
    causes = incidents(rows.analyze()).get_column("cause").to_list()
    assert causes == ["slow_fault_handling", "other"]


def test_resume_guest_without_contention_is_other() -> None:
    rows = Rows()
    rows.exit(1, OTHER_RIP, 0x5000)
    rows.handle(1, 0x5000, FaultOutcome.MAPPED)  # done before vCPU 0 faults: no overlap
    rows.fault_handled(0, 6, outcome=FaultOutcome.RESUME_GUEST)
    assert incidents(rows.analyze()).get_column("cause").to_list() == ["other"]


def test_cause_busy_on_fault_path_and_frozen_wins_over_busy() -> None:
    rows = Rows()
    rows.fault_handled(0, 6, outcome=FaultOutcome.PENDING_EVENT,
                       retries=(RetryCause.SEAMCALL_BUSY,))
    rows.fault_handled(1, 5, outcome=FaultOutcome.PENDING_EVENT,
                       retries=(RetryCause.SEAMCALL_BUSY,))
    rows.fault_handled(1, 1, outcome=FaultOutcome.PENDING_EVENT,
                       retries=(RetryCause.FROZEN_SPTE,))
    causes = incidents(rows.analyze()).get_column("cause").to_list()
    assert causes == ["busy_on_fault_path", "frozen_spte_contention"]


def test_cause_memory_fault_exit_before_slow_handling() -> None:
    # A VMM that keeps making the page shared: each fault exits to userspace (the VMM converts
    # it back), the guest re-enters on the unresolved fault, and the GFN keeps coming back.
    rows = Rows()
    for _ in range(3):
        rows.fault_handled(0, 1, outcome=FaultOutcome.MEMORY_FAULT_EXIT)
        rows.fault_handled(0, 1, outcome=FaultOutcome.MAPPED)
    causes = incidents(rows.analyze()).get_column("cause").to_list()
    assert causes == ["memory_fault_exit"]


def test_cause_slow_fault_handling() -> None:
    rows = Rows()
    # vCPU 0: the page is mapped, yet the same RIP faults on it again and again.
    rows.fault_handled(0, 6, outcome=FaultOutcome.MAPPED)
    # vCPU 1: distinct pages, but one fault took 200 µs.
    for gpa in range(0x10000, 0x16000, 0x1000):
        rows.exit(1, RIP, gpa)
        rows.handle(1, gpa, FaultOutcome.MAPPED, took=200_000 if gpa == 0x12000 else 1_000)
    # vCPU 2: six distinct pages, all mapped quickly: one instruction touching many pages.
    for gpa in range(0x20000, 0x26000, 0x1000):
        rows.exit(2, RIP, gpa)
        rows.handle(2, gpa, FaultOutcome.MAPPED)
    causes = incidents(rows.analyze()).get_column("cause").to_list()
    assert causes == ["slow_fault_handling", "slow_fault_handling", "other"]


def test_timeline_is_downsampled_per_vcpu() -> None:
    rows = Rows()
    for i in range(600):
        rows.faults(0, 2, rip=RIP + 16 * i)
    rows.faults(1, 6)
    result = rows.analyze()
    timeline = result.tables["timeline"]
    per_vcpu = timeline.group_by("vcpu").agg(pl.len(), pl.col("runs").sum()).sort("vcpu")
    assert per_vcpu.get_column("len").max() <= 200
    assert per_vcpu.get_column("runs").to_list() == [600, 1]
    assert timeline.filter(pl.col("vcpu") == 1).get_column("state").to_list() == ["incident"]
    assert result.metrics["runs"] == 601


def test_registered_through_the_hook() -> None:
    (analyzer,) = register_analyzers()
    assert analyzer.name == "zero_step"
    assert analyzer.thresholds["incidents"] == (1, 1)
