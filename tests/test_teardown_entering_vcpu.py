"""At teardown a vCPU still inside TDH.VP.ENTER leaves the guest once its entry is done.

Interrupts are off inside VP.ENTER: the kick of the vCPUs being stopped lands when the entry
completes, as any kick does (tests/test_kick_waits_for_entry.py). Leaving at once made a
zap's BUSY at that instant name a VP.ENTER whose interval had already ended (zap-under-load
seed 18, once). Here the run ends while one vCPU is entering: seed 1, 3 ms: vCPU 2 entered
0.28 µs before the end; seed 2: vCPU 7, 0.83 µs before.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

from tdxtrace.codes import ExitReason
from tdxtrace.events import Kind
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.sim.world import World

DURATION_US = 3000


def _alive_at_the_end(seed: int) -> tuple[int, pl.DataFrame]:
    """The run's end, and each vCPU entry before it whose exit came at or after it."""
    batches: list[pa.RecordBatch] = []
    world = World(load_scenario("zap-under-load", [f"run.duration_us={DURATION_US}"]), seed,
                  batches.append)
    end = world.sim.now + DURATION_US * 1000  # creation is done: the run starts now
    world.run()
    events = pl.from_arrow(pa.Table.from_batches(batches))
    assert isinstance(events, pl.DataFrame)
    pairs = events.filter(pl.col("kind").is_in([Kind.TD_ENTRY, Kind.TD_EXIT])).sort(
        "seq").with_columns(pl.col("ts_ns").shift(1).over("td", "vcpu").alias("entry_ns"),
                            pl.col("kind").shift(1).over("td", "vcpu").alias("before"))
    alive = pairs.filter((pl.col("kind") == Kind.TD_EXIT) & (pl.col("before") == Kind.TD_ENTRY)
                         & (pl.col("entry_ns") < end) & (pl.col("ts_ns") >= end))
    return end, alive


@pytest.mark.parametrize(("seed", "entering"), [(1, 2), (2, 7)])
def test_a_vcpu_entering_when_the_run_ends_exits_once_its_entry_is_done(
        seed: int, entering: int) -> None:
    end, alive = _alive_at_the_end(seed)
    assert (alive["exit_reason"] == ExitReason.EXTERNAL_INTERRUPT).all()
    late = alive.filter(pl.col("ts_ns") > end)
    assert late["vcpu"].to_list() == [entering]
    # Its VP.ENTER began just before the end and ran its course (a few µs at most).
    row = late.row(0, named=True)
    assert row["entry_ns"] > end - 5_000 and row["ts_ns"] - row["entry_ns"] < 10_000
    # The others, in the guest at the end, were kicked out at once.
    assert (alive.filter(pl.col("vcpu") != entering)["ts_ns"] == end).all()
