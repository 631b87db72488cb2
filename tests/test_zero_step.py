"""zero_step: runs of private EPT violations at one RIP, incidents and their windows (causes:
test_zero_step_causes.py)."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from zero_step_helpers import BUSY_SEPT, OTHER_RIP, RIP, SHARED, Rows, incidents

from tdxtrace.codes import (
    EXIT_QUAL_GUEST_WRITE,
    EXIT_QUAL_ZERO_STEP,
    ExitReason,
    Leaf,
    OperandId,
    Status,
)
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace_plugins.zero_step import INCIDENT_SCHEMA, ZeroStep, register_analyzers


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
          "cause": "other", "kvm_caused": False}],
        schema=INCIDENT_SCHEMA,
    )
    result = rows.analyze()
    assert_frame_equal(incidents(result), expected)
    assert result.metrics["synthesized_exits"] == 2


@pytest.mark.parametrize(("quals", "synthesized"), [
    # Recorded: the zero-step exit's qualification (write alone) names each synthesized exit,
    # so a real refault on a listed page (the hardware's 0x182) is not counted.
    ((EXIT_QUAL_GUEST_WRITE, EXIT_QUAL_ZERO_STEP, EXIT_QUAL_GUEST_WRITE, EXIT_QUAL_ZERO_STEP),
     2),
    # Not recorded: every exit on a listed page after the first is taken for synthesized.
    ((None, None, None, None), 3),
])
def test_synthesized_exits_are_told_by_their_exit_qualification(
        quals: tuple[int | None, ...], synthesized: int) -> None:
    rows = Rows()
    first = quals[0]
    for _ in range(6):
        rows.exit(0, gpa=0x5000, qual=first)
    for qual in quals:  # the 7th lists page 0x7000; three more exits on it
        rows.exit(0, gpa=0x7000, qual=qual)
    rows.exit(0, OTHER_RIP, reason=int(ExitReason.HLT))
    result = rows.analyze()
    assert result.metrics["incidents"] == 1
    assert result.metrics["synthesized_exits"] == synthesized


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
        "incidents": 0, "kvm_caused_incidents": 0, "vcpus_affected": 0, "synthesized_exits": 0,
        "vp_enter_busy_sept": 0, "other_vcpu_busy_sept": 0, "max_run": 0, "runs": 0,
        "accept_faults": 0,
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
    assert analyzer.thresholds == {"kvm_caused_incidents": (1, 1)}
