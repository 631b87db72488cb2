"""The track-race scenario tells the story its description promises, under each zap_busy policy.

Seed 000's TDH.MEM.TRACK vs TDH.VP.ENTER contention on the TD epoch, without zero-step: if a
model change made the scenario's BUSYs come from elsewhere (or arm zero-step, as
zap-under-load's interrupt storm does), its description would be lying to users.
"""

from __future__ import annotations

import polars as pl
import pytest
from emulator_helpers import run

from tdxtrace.codes import Leaf, OperandId, Status
from tdxtrace.events import Flow, KickReason, Kind
from tdxtrace.testing import run_analyzer
from tdxtrace.trace import Trace

BUSY_EPOCH = int(Status.OPERAND_BUSY) | int(OperandId.TD_EPOCH)
SHORT = "run.duration_us=15000"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_busys_are_the_epoch_race_and_zero_step_never_arms(seed: int) -> None:
    events, truth = run("track-race", SHORT, seed=seed)
    trace = Trace.from_frame(events)  # analyzers read its observable rows
    busy = run_analyzer("busy_retry", trace)
    assert run_analyzer("zero_step", trace).metrics["incidents"] == 0
    assert truth["zero_step_incidents"] == 0
    holders = {(row["leaf"], row["operand"]): row["holder"]
               for row in busy.tables["holders"].to_dicts()}
    # Both sides of the race, each attributed to the other.
    assert holders[("TDH.MEM.TRACK", "TD_EPOCH")] == "TDH.VP.ENTER"
    assert holders[("TDH.VP.ENTER", "TD_EPOCH")] == "TDH.MEM.TRACK"
    epoch = sum(row["count"] for row in busy.tables["by_leaf_operand"].to_dicts()
                if row["operand"] == "TD_EPOCH")
    # Anything else (a rare BLOCK vs a guest ACCEPT) is the exception.
    assert epoch >= 0.9 * busy.metrics["busy_total"] > 0


def _track_busys(events: pl.DataFrame) -> pl.DataFrame:
    return events.filter((pl.col("kind") == Kind.SEAMCALL) & (pl.col("leaf") == Leaf.TDH_MEM_TRACK)
                         & (pl.col("status") == BUSY_EPOCH) & ~pl.col("truth"))


def _next_track_of_same_op(events: pl.DataFrame, busy_seq: int, corr: int) -> dict[str, object]:
    later = events.filter((pl.col("kind") == Kind.SEAMCALL) & (pl.col("seq") > busy_seq)
                          & (pl.col("leaf") == Leaf.TDH_MEM_TRACK) & (pl.col("corr") == corr))
    return later.sort("seq").row(0, named=True)


def _kicks_between(events: pl.DataFrame, first: int, last: int) -> pl.DataFrame:
    return events.filter((pl.col("kind") == Kind.KICK) & (pl.col("seq") > first)
                         & (pl.col("seq") < last) & (pl.col("sub") == KickReason.NO_VCPUS_RETRY))


def test_kick_retry_once_kicks_the_vcpus_before_retrying_a_busy_track() -> None:
    events, truth = run("track-race", SHORT, seed=1)
    busys = _track_busys(events)
    assert busys.height > 0 and truth.get("vms_bugged", 0) == 0
    for busy in busys.iter_rows(named=True):
        retry = _next_track_of_same_op(events, busy["seq"], busy["corr"])
        assert _kicks_between(events, busy["seq"], retry["seq"]).height == 1  # tdh_do_no_vcpus


def test_retry_loop_calls_again_without_kicking() -> None:
    events, truth = run("track-race", SHORT, "policy.zap_busy='retry_loop'", seed=1)
    busys = _track_busys(events)
    assert busys.height > 0 and truth.get("vms_bugged", 0) == 0
    for busy in busys.iter_rows(named=True):
        retry = _next_track_of_same_op(events, busy["seq"], busy["corr"])
        assert _kicks_between(events, busy["seq"], retry["seq"]).height == 0


@pytest.mark.parametrize("seed", [1, 2])
def test_under_the_2022_spinlock_the_first_busy_track_bugs_the_vm(seed: int) -> None:
    # VP.ENTER is not under the per-TD spinlock, so it still races TRACK for the epoch, and
    # the spinlock design treats the BUSY as impossible: KVM_BUG_ON.
    events, truth = run("track-race", "policy.zap_busy='seamcall_spinlock'", seed=seed)
    bugged = events.filter(pl.col("kind") == Kind.VM_BUGGED)
    assert truth["vms_bugged"] == 1 and bugged.height == 1
    first_track_busy = _track_busys(events).row(0, named=True)
    bug = bugged.row(0, named=True)
    assert bug["leaf"] == Leaf.TDH_MEM_TRACK and bug["status"] == BUSY_EPOCH
    assert bug["corr"] == first_track_busy["corr"] and bug["flow"] == Flow.ZAP


def test_readme_policy_comparison_figures() -> None:
    # README, "A typical session": track-race seed 2 under each zap_busy policy.
    figures = {}
    for policy in ("kick_retry_once", "retry_loop", "seamcall_spinlock"):
        events, _ = run("track-race", f"policy.zap_busy='{policy}'", seed=2)
        trace = Trace.from_frame(events)
        busy = run_analyzer("busy_retry", trace).metrics
        bugged = run_analyzer("zap_scope", trace).tables["bugged"].to_dicts()
        figures[policy] = (busy["busy_total"], round(busy["lost_ns"] / 1000),
                           [(row["leaf"], round(row["ts_ns"] / 1e5) / 10) for row in bugged])
    assert figures == {
        "kick_retry_once": (49, 169, []),
        "retry_loop": (69, 104, []),
        "seamcall_spinlock": (1, 14, [("TDH.MEM.TRACK", 10.7)]),
    }
