"""busy_retry names a VP.ENTER as the S-EPT tree's holder only under the zero-step mitigation.

The module takes the S-EPT tree lock in TDH.VP.ENTER only while the vCPU's zero-step GPA list
is non-empty (tdx-reference §5.1): from the 7th private EPT violation at one RIP until the
vCPU makes progress. A vCPU merely in the guest holds nothing there, so a TDH.MEM.* BUSY|SEPT
with no other candidate running stays unresolved (as an injected BUSY must).
"""

from __future__ import annotations

from typing import Any

from busy_retry_helpers import call

from tdxtrace.codes import Leaf, OperandId, Status
from tdxtrace.events import Flow, Kind
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace_plugins.busy_retry import BusyRetry

BUSY_SEPT = Status.OPERAND_BUSY | OperandId.SEPT_TREE
EPT_VIOLATION = 48
RIP = 0xFFFF_8000_0000_1000
STUCK_GPA = 0x7000


def guest_run(ts: int, *, rip: int = RIP, reason: int = EPT_VIOLATION,
              gpa: int | None = STUCK_GPA, until: int | None = None) -> list[dict[str, Any]]:
    """One VP.ENTER of vCPU 1 (TD 0): its TD_ENTRY at ``ts`` and its TD_EXIT at ``until``."""
    common = {"td": 0, "vcpu": 1, "lp": 1, "leaf": 0, "corr": 9, "flow": Flow.RUN, "rip": rip}
    return [{"kind": Kind.TD_ENTRY, "ts_ns": ts, **common},
            {"kind": Kind.TD_EXIT, "ts_ns": until if until is not None else ts + 10,
             "status": reason, "exit_reason": reason, "gpa": gpa, **common}]


def faults_at_one_rip(count: int) -> list[dict[str, Any]]:
    return [row for k in range(count) for row in guest_run(100 * k)]


def aug_busy_while_vcpu1_runs(before: list[dict[str, Any]]) -> str:
    """The holder busy_retry names for an AUG BUSY|SEPT on vCPU 0 while vCPU 1 is entered."""
    start = 100 * len(before)
    rows = [*before, *guest_run(start, until=start + 1000)[:1],
            call(start + 50, Leaf.TDH_MEM_PAGE_AUG, BUSY_SEPT),
            guest_run(start, until=start + 1000)[1]]
    holders = run_analyzer(BusyRetry(), make_trace(rows)).tables["holders"]
    assert holders.height == 1
    return str(holders["holder"][0])


def test_a_vcpu_in_the_guest_without_a_listed_gpa_holds_no_sept_tree() -> None:
    assert aug_busy_while_vcpu1_runs([]) == "unresolved"


def test_six_faults_arm_the_counter_but_list_nothing_so_entry_takes_no_lock() -> None:
    assert aug_busy_while_vcpu1_runs(faults_at_one_rip(6)) == "unresolved"


def test_from_the_seventh_fault_at_one_rip_vp_enter_holds_the_sept_tree() -> None:
    assert aug_busy_while_vcpu1_runs(faults_at_one_rip(7)) == "TDH.VP.ENTER"


def test_progress_empties_the_list_and_entry_holds_nothing_again() -> None:
    moved_on = guest_run(700, rip=RIP + 4, reason=1, gpa=None)  # an exit at another RIP
    assert aug_busy_while_vcpu1_runs([*faults_at_one_rip(7), *moved_on]) == "unresolved"


def test_a_non_ept_exit_at_the_same_rip_keeps_the_list() -> None:
    same_rip = guest_run(700, reason=1, gpa=None)  # e.g. an interrupt: neither counts nor resets
    assert aug_busy_while_vcpu1_runs([*faults_at_one_rip(7), *same_rip]) == "TDH.VP.ENTER"
