"""vCPU migration between logical processors (tdx-reference.md §4(d); issue 4, item 3)."""

from __future__ import annotations

import polars as pl
from emulator_helpers import run

from tdxtrace.codes import EXIT_REASON_INVALID, Leaf, Status
from tdxtrace.events import Flow, Kind
from tdxtrace.sim.module import ModuleTd, ModuleVcpu, TdLifecycle, TdxModule
from tdxtrace.sim.module_teardown import LifecycleLeaves

QUICK = ("run.duration_us=4000", "td.memory_mb=8")
ME = (0, 0, 1)


def test_module_association_follows_vp_enter_and_vp_flush() -> None:
    module = TdxModule()
    td = ModuleTd(td=0, hkid=1, lifecycle=TdLifecycle.RUNNABLE, vcpus=[ModuleVcpu()])
    module.tds.append(td)
    leaves = LifecycleLeaves(module, 1, 1)
    assert module.vp_enter(td, 0, 2, 0x1000, 0, 10, ME)[0] == Status.SUCCESS
    module.td_exit(td, 0, 0x1000, None)
    assert (td.vcpus[0].assoc_lp, td.num_assoc) == (2, 1)
    # Entered elsewhere before a flush: the module refuses.
    assert module.vp_enter(td, 0, 3, 0x1000, 20, 30, ME)[0] == Status.VCPU_ASSOCIATED
    assert leaves.vp_flush(td, 0, 3, 40, 50, ME) == Status.VCPU_NOT_ASSOCIATED
    assert leaves.vp_flush(td, 0, 2, 60, 70, ME) == Status.SUCCESS
    assert module.vp_enter(td, 0, 3, 0x1000, 80, 90, ME)[0] == Status.SUCCESS
    assert (td.vcpus[0].assoc_lp, td.num_assoc) == (3, 1)


def _run_rows(events: pl.DataFrame) -> pl.DataFrame:
    """VCPU_LOAD, VP.FLUSH and TD_ENTRY rows before the teardown, in order."""
    teardown = events.filter(pl.col("flow") == Flow.TEARDOWN)["seq"].min()
    return events.filter(
        (pl.col("seq") < teardown)
        & (pl.col("kind").is_in([Kind.VCPU_LOAD, Kind.TD_ENTRY])
           | ((pl.col("kind") == Kind.SEAMCALL) & (pl.col("leaf") == Leaf.TDH_VP_FLUSH)))
    ).sort("seq")


def test_vp_flush_on_the_old_lp_precedes_the_first_entry_on_the_new_one() -> None:
    events, truth = run("migration", *QUICK)
    rows = _run_rows(events)
    moves = rows.filter((pl.col("kind") == Kind.VCPU_LOAD) & pl.col("arg0").is_not_null())
    assert truth["migrations"] == moves.height >= 10
    assert (moves["flow"] == Flow.MIGRATION).all()
    for move in moves.iter_rows(named=True):
        later = rows.filter((pl.col("seq") > move["seq"]) & (pl.col("vcpu") == move["vcpu"]))
        flush = later.filter(pl.col("kind") == Kind.SEAMCALL).row(0, named=True)
        entry = later.filter(pl.col("kind") == Kind.TD_ENTRY).row(0, named=True)
        assert flush["corr"] == move["corr"] and flush["lp"] == move["arg0"]
        assert flush["status"] == Status.SUCCESS
        assert flush["seq"] < entry["seq"] and entry["lp"] == move["lp"]
        assert entry["ts_ns"] >= flush["ts_ns"] + flush["dur_ns"]
    # Every entry is on the LP of the vCPU's latest load.
    loads = rows.filter(pl.col("kind") == Kind.VCPU_LOAD).select("seq", "vcpu", load_lp="lp")
    entries = rows.filter(pl.col("kind") == Kind.TD_ENTRY).select("seq", "vcpu", "lp")
    joined = entries.join_asof(loads, on="seq", by="vcpu")
    assert (joined["lp"] == joined["load_lp"]).all()
    assert events.filter(pl.col("status") == Status.VCPU_ASSOCIATED).height == 0


def test_without_migration_each_vcpu_is_loaded_once() -> None:
    events, truth = run("migration", *QUICK, "migration.rate_hz=0")
    loads = events.filter(pl.col("kind") == Kind.VCPU_LOAD)
    assert truth["migrations"] == 0
    assert sorted(loads["vcpu"].to_list()) == list(range(8))
    assert loads["arg0"].null_count() == 8
    assert events.filter(pl.col("flow") == Flow.MIGRATION).height == 0


def test_skipping_the_flush_makes_vp_enter_return_vcpu_associated() -> None:
    events, truth = run("migration", *QUICK, "faults.skip_flush_on_migrate_p=1.0")
    refused = events.filter((pl.col("kind") == Kind.TD_EXIT)
                            & (pl.col("status") == Status.VCPU_ASSOCIATED))
    assert refused.height == truth["vcpus_stopped_unexpected"] >= 1
    assert (refused["exit_reason"] == EXIT_REASON_INVALID).all()
    teardown = events.filter(pl.col("flow") == Flow.TEARDOWN)["seq"].min()
    for row in refused.iter_rows(named=True):
        move = events.filter((pl.col("kind") == Kind.VCPU_LOAD) & (pl.col("vcpu") == row["vcpu"])
                             & (pl.col("seq") < row["seq"])).row(-1, named=True)
        assert move["lp"] == row["lp"] and move["arg0"] != row["lp"]
        # KVM treats the exit as unexpected: the vCPU never enters again.
        again = events.filter((pl.col("kind") == Kind.TD_ENTRY) & (pl.col("vcpu") == row["vcpu"])
                              & pl.col("seq").is_between(row["seq"], teardown))
        assert again.height == 0
    assert events.filter((pl.col("kind") == Kind.SEAMCALL) & (pl.col("leaf") == Leaf.TDH_VP_FLUSH)
                         & (pl.col("flow") == Flow.MIGRATION)).height == 0
    # The stale association outlives the vCPU: teardown's VP.FLUSH (on the LP KVM believes
    # the vCPU last ran on) cannot clear it, so VPFLUSHDONE fails and the HKID leaks.
    assert truth["hkid_leaks"] == 1


def test_teardown_flushes_every_vcpu_on_the_lp_it_last_ran_on() -> None:
    events, _ = run("migration", *QUICK)
    teardown = events.filter(pl.col("flow") == Flow.TEARDOWN)
    flushes = teardown.filter((pl.col("kind") == Kind.SEAMCALL)
                              & (pl.col("leaf") == Leaf.TDH_VP_FLUSH))
    last_lp = events.filter(pl.col("kind") == Kind.VCPU_LOAD).group_by("vcpu").agg(
        pl.col("lp").sort_by("seq").last())
    got = flushes.select("vcpu", "lp").sort("vcpu")
    assert got.rows() == last_lp.sort("vcpu").rows()
    assert (flushes["status"] == Status.SUCCESS).all()
