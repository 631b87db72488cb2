"""busy_retry's inferred holders, BUSY by BUSY, against the module's (bench/holder_accuracy.py).

The tests compare each OPERAND_BUSY with its T_LOCK_HOLDER truth row, which the aggregate
check in test_busy_retry.py cannot: there, two wrong names could cancel out.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from bench_helpers import load_bench

from tdxtrace.codes import OperandId, Status
from tdxtrace.events import Kind
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.trace import open_trace


def _counts(tmp_path: Path, scenario: str, seed: int, *overrides: str) -> dict[str, int]:
    path = tmp_path / f"{scenario}-{seed}.arrow"
    record(load_scenario(scenario, list(overrides)), seed, path)
    counts: dict[str, int] = load_bench("holder_accuracy").holder_counts(path)
    return counts


def test_every_busy_gets_the_modules_holder(tmp_path: Path) -> None:
    for scenario, seed in (("zero-step", 1), ("zap-under-load", 2), ("demo", 3)):
        counts = _counts(tmp_path, scenario, seed)
        assert counts["busy"] > 0, scenario
        assert counts["right"] == counts["named"] == counts["true"] == counts["busy"], (
            scenario, counts)


def test_an_injected_sept_busy_is_put_on_no_call(tmp_path: Path) -> None:
    # No call held anything behind an injected BUSY. A vCPU merely in the guest does not hold
    # the S-EPT tree (only a stepping one does), so busy_retry must leave these unresolved.
    counts = _counts(tmp_path, "fault-storm", 1, "run.duration_us=3000",
                     "faults.spurious_busy_leaf=mem.page.aug", "faults.spurious_busy_p=0.05")
    # A real BUSY in the same run (a TRACK behind a VP.ENTER) must still get its holder.
    assert counts["unowned"] > 50 and counts["right"] == counts["true"], counts
    assert counts["unowned"] + counts["true"] == counts["busy"], counts
    assert counts["unowned_named"] == 0, counts


def test_injected_and_real_busys_in_one_corr_meet_their_own_truth_rows(tmp_path: Path) -> None:
    # A VP.ENTER chain shares one corr: injected BUSYs (no truth row) and real ones interleave
    # there. Matching by rank within the corr put real BUSYs on their neighbours' truth rows
    # (4 "wrong" holders on this seed that were right); each truth row now meets the latest
    # BUSY call of its corr that started before it.
    counts = _counts(tmp_path, "zero-step", 3, "faults.spurious_busy_leaf=vp.enter",
                     "faults.spurious_busy_p=0.05")
    assert counts["unowned"] > 0 and counts["true"] > 0
    assert counts["right"] == counts["true"], counts


def test_busys_as_the_vcpus_stop_get_the_modules_holder(tmp_path: Path) -> None:
    # These seeds end their run (30 ms) while a zap is under way: its TRACK finds the TD
    # epoch held by a vCPU's VP.ENTER as the vCPUs are being stopped. (Seed 18 once had a
    # vCPU still inside VP.ENTER at teardown that left the guest at once, and a BLOCK BUSY
    # named a VP.ENTER whose interval had ended; the timelines have moved since, and
    # tests/test_teardown_entering_vcpu.py now sets that case up directly.)
    for seed in (3, 4, 6):
        counts = _counts(tmp_path, "zap-under-load", seed)
        events = open_trace(tmp_path / f"zap-under-load-{seed}.arrow").events().collect()
        late_busy = events.filter(
            (pl.col("kind") == Kind.SEAMCALL) & (pl.col("ts_ns") >= 30_000_000)
            & (pl.col("status") == Status.OPERAND_BUSY | OperandId.TD_EPOCH))
        assert late_busy.height >= 1, seed
        assert counts["right"] == counts["named"] == counts["true"] == counts["busy"], counts
