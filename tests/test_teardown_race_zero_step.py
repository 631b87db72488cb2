"""The vCPU that enters in the teardown race (seed 001) with zero-step still armed.

Its TDH.VP.ENTER finds a listed GPA unmapped (teardown zapped every private page), so the
module synthesizes exit 48 without entering: KVM sees an EPT violation, not an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl
import pyarrow as pa

from tdxtrace.codes import ExitReason, Status
from tdxtrace.events import Kind, Phase
from tdxtrace.sim.kvm_state import Vcpu
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.sim.world import World

LISTED_GPA = 0x1234000  # private; the zap of the teardown leaves nothing mapped


def _run_with_zero_step_armed_at_teardown() -> tuple[pl.DataFrame, dict[str, Any]]:
    scenario = load_scenario("teardown", ["td.count=1", "td.memory_mb=2", "run.duration_us=300",
                                          "faults.vcpu_load_during_teardown_p=1.0"])
    batches: list[pa.RecordBatch] = []
    world = World(scenario, 1, batches.append)
    placement = world.lifecycle.placement
    reload_and_enter = placement.reload_and_enter

    def armed_reload(v: Vcpu, then: Callable[[None], None]) -> None:
        # The vCPU stopped in the middle of a zero-step incident: its GPA list is not empty.
        mv = v.td.module.vcpus[v.index]
        mv.zs_count, mv.zs_gpas = 6, [LISTED_GPA]
        reload_and_enter(v, then)

    placement.reload_and_enter = armed_reload  # type: ignore[method-assign]
    world.run()
    events = pl.from_arrow(pa.Table.from_batches(batches))
    assert isinstance(events, pl.DataFrame)
    return events, world.log.truth()


def test_the_racing_entry_is_a_synthesized_ept_violation() -> None:
    events, truth = _run_with_zero_step_armed_at_teardown()
    flush_round = events.filter((pl.col("kind") == Kind.PHASE)
                                & (pl.col("sub") == Phase.VP_FLUSH))["seq"].min()
    exits = events.filter((pl.col("kind") == Kind.TD_EXIT) & (pl.col("seq") > flush_round))
    assert exits.height == 1
    row = exits.row(0, named=True)
    assert row["exit_reason"] == ExitReason.EPT_VIOLATION
    assert row["status"] == Status.SUCCESS | ExitReason.EPT_VIOLATION
    assert row["gpa"] == LISTED_GPA
    synthesized = events.filter((pl.col("kind") == Kind.T_SYNTHESIZED_EXIT)
                                & (pl.col("seq") > flush_round))
    assert synthesized.select("vcpu", "gpa").rows() == [(row["vcpu"], LISTED_GPA)]
    assert truth["synthesized_exits"] == 1
