"""teardown_latency's ``retries``: a call again after an error, for the same thing.

TDH.MEM.TRACK names no GPA: the page it serves is the one the last BLOCK blocked. A page's
first TRACK is therefore not a retry of the previous page's TRACK, even when KVM gave up on
that one (kick_retry_once: BUSY twice, then REMOVE fails on the page that was not tracked).
"""

from __future__ import annotations

from typing import Any

from teardown_helpers import Teardown

from tdxtrace.codes import Leaf, OperandId, Status
from tdxtrace.events import KickReason, Kind, Phase
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace_plugins.teardown_latency import TeardownLatency

TRACK_BUSY = int(Status.OPERAND_BUSY) | int(OperandId.TD_EPOCH)
BLOCK_BUSY = int(Status.OPERAND_BUSY) | int(OperandId.SEPT_TREE)


def zap(pages: int, track_statuses: list[int], *, remove_status: int = 0,
        block_busy: bool = False) -> list[dict[str, Any]]:
    """One PRIVATE_PAGES phase: per page BLOCK (after one BUSY if ``block_busy``), one TRACK
    per status in ``track_statuses`` with a kick after each, then REMOVE."""
    rows: list[dict[str, Any]] = []
    td = Teardown(rows, td=0, start_ns=1000)
    td.phase(Phase.PRIVATE_PAGES, pages)
    for page in range(pages):
        gpa = 0x1000 * page
        if block_busy:
            td.call(Leaf.TDH_MEM_RANGE_BLOCK, 100, BLOCK_BUSY, gpa=gpa, level=0)
        td.call(Leaf.TDH_MEM_RANGE_BLOCK, 100, gpa=gpa, level=0)
        for status in track_statuses:
            td.call(Leaf.TDH_MEM_TRACK, 100, status)
            td.row(Kind.KICK, sub=KickReason.TRACK, arg0=2)
        td.call(Leaf.TDH_MEM_PAGE_REMOVE, 100, remove_status, gpa=gpa, level=0)
    td.done(Phase.PRIVATE_PAGES)
    return rows


def retries(rows: list[dict[str, Any]]) -> int:
    phases = run_analyzer(TeardownLatency(), make_trace(rows)).tables["phases"]
    return int(phases.filter(phase="private_pages")["retries"].item())


def test_a_track_kvm_gave_up_on_does_not_make_the_next_pages_track_a_retry() -> None:
    # Each page: TRACK BUSY, TRACK BUSY again (the one retry), then the REMOVE fails.
    rows = zap(5, [TRACK_BUSY, TRACK_BUSY], remove_status=int(Status.TLB_TRACKING_NOT_DONE))
    assert retries(rows) == 5  # before: 9, every later page's first TRACK counted too


def test_tracks_retried_until_they_succeed_count_each_retry() -> None:
    assert retries(zap(4, [TRACK_BUSY, TRACK_BUSY, 0])) == 8
    assert retries(zap(4, [0])) == 0


def test_a_retried_block_still_counts_and_does_not_split_its_pages_tracks() -> None:
    # BLOCK BUSY then BLOCK: one retry per page; the TRACK after it is the page's first.
    assert retries(zap(3, [TRACK_BUSY, 0], block_busy=True)) == 6
