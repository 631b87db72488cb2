"""Two calls holding the S-EPT tree shared at once: busy_retry names the one that ends last.

SEPT.ADD, PAGE.AUG, PAGE.REMOVE and PAGE.ADD take the tree shared and can hold it together;
an exclusive taker (RANGE.BLOCK) that gets BUSY|SEPT_TREE then waits for the last of them,
which is also the holder the TDX module model reports. Other holders keep their fixed order.
"""

from __future__ import annotations

from typing import Any

from busy_retry_helpers import call

from tdxtrace.codes import Leaf, OperandId, Status
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace_plugins.busy_retry import BusyRetry

BUSY_SEPT = Status.OPERAND_BUSY | OperandId.SEPT_TREE
SEPT_ADD, AUG, BLOCK = Leaf.TDH_MEM_SEPT_ADD, Leaf.TDH_MEM_PAGE_AUG, Leaf.TDH_MEM_RANGE_BLOCK


def holder_of_block_busy(*holding: dict[str, Any]) -> str:
    busy = call(200, BLOCK, BUSY_SEPT, dur=50, gpa=0x9000, vcpu=None, corr=9, lp=9)
    rows = sorted([*holding, busy], key=lambda row: row["ts_ns"])
    holders = run_analyzer(BusyRetry(), make_trace(rows)).tables["holders"]
    assert holders.height == 1
    return str(holders["holder"][0])


def test_of_two_shared_holders_the_one_ending_last_is_named() -> None:
    assert holder_of_block_busy(call(0, SEPT_ADD, dur=300, corr=1, lp=1),
                                call(100, AUG, dur=400, gpa=0x2000, vcpu=1, corr=2, lp=2)) \
        == "TDH.MEM.PAGE.AUG"
    assert holder_of_block_busy(call(0, AUG, dur=300, corr=1, lp=1),
                                call(100, SEPT_ADD, dur=400, gpa=0x2000, vcpu=1, corr=2, lp=2)) \
        == "TDH.MEM.SEPT.ADD"


def test_a_holder_that_ended_before_the_busy_does_not_count_however_late_it_started() -> None:
    # The AUG ended at 150, before the BUSY at 200: only the SEPT.ADD still held the tree.
    assert holder_of_block_busy(call(0, SEPT_ADD, dur=300, corr=1, lp=1),
                                call(100, AUG, dur=50, gpa=0x2000, vcpu=1, corr=2, lp=2)) \
        == "TDH.MEM.SEPT.ADD"
