"""Injected faults: a spurious OPERAND_BUSY on a chosen leaf names a resource that leaf really
contends on, KVM handles it as it would a real one, and busy_retry counts exactly what was
injected."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from emulator_helpers import run

from tdxtrace.codes import Leaf, OperandId, Status, with_operand
from tdxtrace.errors import ScenarioError
from tdxtrace.events import Kind
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace_plugins.busy_retry import BusyRetry

SHORT = ("run.duration_us=4000",)


def _busy_calls(events: pl.DataFrame, leaf: Leaf) -> pl.DataFrame:
    busy_class = int(Status.OPERAND_BUSY) >> 32
    return events.filter((pl.col("kind") == int(Kind.SEAMCALL)) & (pl.col("leaf") == int(leaf))
                         & (pl.col("status").floordiv(1 << 32) == busy_class))


@pytest.mark.parametrize("scenario, name, leaf, operand", [
    ("fault-storm", "mem.page.aug", Leaf.TDH_MEM_PAGE_AUG, OperandId.SEPT_TREE),
    ("fault-storm", "TDH.MEM.PAGE.AUG", Leaf.TDH_MEM_PAGE_AUG, OperandId.SEPT_TREE),
    ("zap-under-load", "mem.track", Leaf.TDH_MEM_TRACK, OperandId.TD_EPOCH),
])
def test_spurious_busy_names_the_resource_the_leaf_contends_on(
        scenario: str, name: str, leaf: Leaf, operand: OperandId) -> None:
    events, truth = run(scenario, *SHORT, f"faults.spurious_busy_leaf='{name}'",
                        "faults.spurious_busy_p=0.3", seed=2)
    busy = _busy_calls(events.filter(pl.col("truth") == False), leaf)  # noqa: E712
    assert busy.height > 0
    assert set(busy["status"].to_list()) == {with_operand(int(Status.OPERAND_BUSY), operand)}
    # KVM handled them as real BUSYs: a VM is bugged only by a retry that was BUSY again
    # (kick_retry_once on the zap path), and then for this leaf and status.
    bugged = events.filter(pl.col("kind") == int(Kind.VM_BUGGED))
    assert bugged.height == truth.get("vms_bugged", 0)
    assert set(bugged["leaf"].to_list()) <= {int(leaf)}
    result = run_analyzer(BusyRetry(), make_trace(events.to_dicts()))
    assert result.metrics["busy_total"] == truth["busy_total"]


def test_no_injection_without_a_probability() -> None:
    events, _ = run("fault-storm", *SHORT, "faults.spurious_busy_leaf='mem.page.aug'", seed=2)
    assert _busy_calls(events, Leaf.TDH_MEM_PAGE_AUG).is_empty()


def test_unknown_leaf_is_refused_naming_the_key() -> None:
    with pytest.raises(ScenarioError, match=r"faults\.spurious_busy_leaf: 'mem\.aug' is not "
                                            r"allowed \(allowed: \"\", mem\.page\.aug, "):
        run("fault-storm", *SHORT, "faults.spurious_busy_leaf='mem.aug'",
            "faults.spurious_busy_p=0.5")


@pytest.mark.parametrize("name, leaf", [("mng.create", Leaf.TDH_MNG_CREATE),
                                        ("mng.key.config", Leaf.TDH_MNG_KEY_CONFIG),
                                        ("vp.create", Leaf.TDH_VP_CREATE)])
def test_a_failed_td_creation_bugs_the_vm_naming_the_call_that_failed(name: str,
                                                                      leaf: Leaf) -> None:
    events, truth = run("zero-step", "run.duration_us=500", f"faults.spurious_busy_leaf='{name}'",
                        "faults.spurious_busy_p=1.0")
    bugged = events.filter(pl.col("kind") == int(Kind.VM_BUGGED))
    assert bugged["leaf"].to_list() == [int(leaf)] and truth["vms_bugged"] == 1
    assert (bugged["status"].to_list()[0] >> 32) == int(Status.OPERAND_BUSY) >> 32
    assert not truth.get("tds_created")


def test_the_leaf_is_stored_one_way_however_it_was_spelled(tmp_path: Path) -> None:
    # The scenario is stored in the trace: two spellings of one leaf must give one file.
    paths = []
    for spelling in ("mem.range.block", " TDH.MEM.RANGE.BLOCK"):
        path = tmp_path / f"{len(paths)}.arrow"
        record(load_scenario("zap-under-load", [*SHORT, f"faults.spurious_busy_leaf='{spelling}'",
                                                "faults.spurious_busy_p=0.2"]), 3, path)
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
