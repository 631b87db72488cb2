"""vCPU migration between logical processors (tdx-reference.md §4(d); issue 4, item 3)."""

from __future__ import annotations

import polars as pl
from emulator_helpers import run

from tdxtrace.codes import EXIT_REASON_INVALID, Leaf, Status
from tdxtrace.events import Flow, Kind
from tdxtrace.sim.module import TdxModule
from tdxtrace.sim.module_state import ModuleTd, ModuleVcpu, TdLifecycle
from tdxtrace.sim.module_teardown import LifecycleLeaves

QUICK = ("run.duration_us=4000", "td.memory_mb=8")
ME = (0, 0, 1)
HOST_LP = 9  # the scenario's 10th LP runs the VMM: creation, zaps, teardown


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


def test_vp_init_associates_the_vcpu_with_the_lp_it_runs_on() -> None:
    module = TdxModule()
    td = ModuleTd(td=0, hkid=1, lifecycle=TdLifecycle.INITIALIZED, vcpus=[ModuleVcpu()])
    module.tds.append(td)
    leaves = LifecycleLeaves(module, 1, 1)
    assert leaves.vp_create(td, 0, 0, 10, ME) == Status.SUCCESS
    for t in range(5):
        assert leaves.vp_addcx(td, 0, 20 + 20 * t, 30 + 20 * t, ME) == Status.SUCCESS
    assert leaves.vp_init(td, 0, 9, 200, 210, ME) == Status.SUCCESS
    assert (td.vcpus[0].assoc_lp, td.num_assoc) == (9, 1)
    td.lifecycle = TdLifecycle.RUNNABLE
    # associate_vcpu_initial(): entering on another LP before a flush of LP 9 is refused.
    assert module.vp_enter(td, 0, 2, 0x1000, 300, 310, ME)[0] == Status.VCPU_ASSOCIATED
    assert leaves.vp_flush(td, 0, 9, 320, 330, ME) == Status.SUCCESS
    assert module.vp_enter(td, 0, 2, 0x1000, 340, 350, ME)[0] == Status.SUCCESS


def teardown_seq(events: pl.DataFrame) -> int:
    return int(events.filter(pl.col("flow") == Flow.TEARDOWN)["seq"].min())  # type: ignore


def _run_rows(events: pl.DataFrame) -> pl.DataFrame:
    """VCPU_LOAD, VP.FLUSH and TD_ENTRY rows before the teardown, in order."""
    return events.filter(
        (pl.col("seq") < teardown_seq(events))
        & (pl.col("kind").is_in([Kind.VCPU_LOAD, Kind.TD_ENTRY])
           | ((pl.col("kind") == Kind.SEAMCALL) & (pl.col("leaf") == Leaf.TDH_VP_FLUSH)))
    ).sort("seq")


def test_vp_flush_on_the_old_lp_precedes_the_first_entry_on_the_new_one() -> None:
    events, truth = run("migration", *QUICK)
    rows = _run_rows(events)
    moves = rows.filter((pl.col("kind") == Kind.VCPU_LOAD) & pl.col("arg0").is_not_null())
    # Every vCPU's first run moves it off the VMM's LP, where KVM_TDX_INIT_VCPU loaded it.
    assert truth["first_run_flushes"] == (moves["arg0"] == HOST_LP).sum() == 8
    assert truth["migrations"] + 8 == moves.height >= 18
    assert (moves["flow"] == Flow.MIGRATION).all()
    loads_of = events.filter(pl.col("kind") == Kind.VCPU_LOAD).sort("seq")
    for move in moves.iter_rows(named=True):
        mine = rows.filter(pl.col("vcpu") == move["vcpu"])
        next_load = loads_of.filter((pl.col("vcpu") == move["vcpu"])
                                    & (pl.col("seq") > move["seq"]))["seq"].min()
        later = mine.filter((pl.col("seq") > move["seq"])
                            & (pl.col("seq") < (next_load or teardown_seq(events))))
        flush = later.filter(pl.col("kind") == Kind.SEAMCALL).row(0, named=True)
        assert flush["corr"] == move["corr"] and flush["lp"] == move["arg0"]
        # Associated with the old LP: it entered there, or it was never run (VP.INIT's LP).
        before = loads_of.filter((pl.col("vcpu") == move["vcpu"])
                                 & (pl.col("seq") < move["seq"])).row(-1, named=True)
        entered = mine.filter((pl.col("kind") == Kind.TD_ENTRY)
                              & pl.col("seq").is_between(before["seq"], move["seq"]))
        associated = entered.height > 0 or before["flow"] == Flow.CREATE
        assert flush["status"] == (Status.SUCCESS if associated else
                                   Status.VCPU_NOT_ASSOCIATED)
        entries = later.filter(pl.col("kind") == Kind.TD_ENTRY)
        if entries.height:  # else its thread moved on again before entering
            entry = entries.row(0, named=True)
            assert flush["seq"] < entry["seq"] and entry["lp"] == move["lp"]
            assert entry["ts_ns"] >= flush["ts_ns"] + flush["dur_ns"]
    # Every entry is on the LP of the vCPU's latest load.
    loads = rows.filter(pl.col("kind") == Kind.VCPU_LOAD).select("seq", "vcpu", load_lp="lp")
    entries = rows.filter(pl.col("kind") == Kind.TD_ENTRY).select("seq", "vcpu", "lp")
    joined = entries.join_asof(loads, on="seq", by="vcpu")
    assert (joined["lp"] == joined["load_lp"]).all()
    assert events.filter(pl.col("status") == Status.VCPU_ASSOCIATED).height == 0


def test_without_migration_a_vcpu_is_loaded_at_init_and_once_on_its_lp() -> None:
    events, truth = run("migration", *QUICK, "migration.rate_hz=0")
    loads = events.filter(pl.col("kind") == Kind.VCPU_LOAD).sort("seq")
    assert truth["migrations"] == 0 and truth["first_run_flushes"] == 8
    for vcpu in range(8):
        init, run_load = loads.filter(pl.col("vcpu") == vcpu).iter_rows(named=True)
        # KVM_TDX_INIT_VCPU on the VMM's LP: loaded there before VP.CREATE, no previous LP.
        assert (init["flow"], init["lp"], init["arg0"]) == (Flow.CREATE, HOST_LP, None)
        vp_create = events.filter((pl.col("leaf") == Leaf.TDH_VP_CREATE)
                                  & (pl.col("vcpu") == vcpu)).row(0, named=True)
        assert init["seq"] < vp_create["seq"] and vp_create["lp"] == HOST_LP
        # The first run on the vCPU's own LP flushes it off the VMM's LP first.
        assert (run_load["flow"], run_load["lp"], run_load["arg0"]) == (
            Flow.MIGRATION, vcpu, HOST_LP)
        flush = events.filter((pl.col("leaf") == Leaf.TDH_VP_FLUSH)
                              & (pl.col("corr") == run_load["corr"])).row(0, named=True)
        assert (flush["lp"], flush["status"]) == (HOST_LP, Status.SUCCESS)
    assert events.filter(pl.col("status") == Status.VCPU_ASSOCIATED).height == 0
    # The eight flush IPIs reach the VMM's LP together; its CPU runs them one at a time.
    flushes = events.filter((pl.col("leaf") == Leaf.TDH_VP_FLUSH)
                            & (pl.col("flow") == Flow.MIGRATION)).sort("ts_ns")
    ends = flushes["ts_ns"] + flushes["dur_ns"]
    assert flushes.height == 8 and (flushes["ts_ns"][1:] >= ends[:-1]).all()


def _guest_intervals(events: pl.DataFrame) -> pl.DataFrame:
    """Per vCPU, each stretch from TD_ENTRY to its TD_EXIT: (lp, vcpu, start, end)."""
    rows = events.filter(pl.col("kind").is_in([Kind.TD_ENTRY, Kind.TD_EXIT])).sort("seq")
    rows = rows.with_columns(nth=pl.int_range(pl.len()).over("vcpu"))
    entries = rows.filter(pl.col("kind") == Kind.TD_ENTRY).select("vcpu", "nth", "lp",
                                                                  start="ts_ns")
    exits = rows.filter(pl.col("kind") == Kind.TD_EXIT).select(
        "vcpu", end="ts_ns", nth=pl.col("nth") - 1)
    return entries.join(exits, on=["vcpu", "nth"], how="left").with_columns(
        pl.col("end").fill_null(pl.col("start").max() + 1))


def test_one_vcpu_at_a_time_in_the_guest_on_each_lp() -> None:
    events, truth = run("migration", "run.duration_us=8000", "td.memory_mb=8",
                        "migration.rate_hz=5000")
    assert truth["migrations"] >= 40
    spans = _guest_intervals(events).sort("lp", "start")
    overlap = spans.with_columns(before=pl.col("end").cum_max().shift(1).over("lp")).filter(
        pl.col("start") < pl.col("before"))
    assert overlap.height == 0, overlap
    # A flush IPI lands on an LP no vCPU is running on: it never needs to interrupt a guest.
    flushes = events.filter((pl.col("leaf") == Leaf.TDH_VP_FLUSH)
                            & (pl.col("flow") == Flow.MIGRATION)).select(
        "lp", f_vcpu="vcpu", f_start="ts_ns", f_end=pl.col("ts_ns") + pl.col("dur_ns"))
    met = flushes.join(spans, on="lp").filter(
        (pl.col("vcpu") != pl.col("f_vcpu")) & (pl.col("start") < pl.col("f_end"))
        & (pl.col("f_start") < pl.col("end")))
    assert flushes.height >= 48 and met.height == 0, met


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


def test_the_first_run_counts_as_a_first_run_flush_even_with_a_migration_pending() -> None:
    # At 50 kHz some vCPUs are bound for another LP before they ever run: their first load
    # still flushes the VMM's LP, where KVM_TDX_INIT_VCPU loaded them.
    events, truth = run("migration", *QUICK, "migration.rate_hz=50000")
    flushes = events.filter((pl.col("leaf") == Leaf.TDH_VP_FLUSH)
                            & (pl.col("flow") == Flow.MIGRATION))
    off_vmm_lp = flushes.filter(pl.col("lp") == HOST_LP)
    assert truth["first_run_flushes"] == off_vmm_lp.height == 8
    assert truth["migrations"] == flushes.height - 8
