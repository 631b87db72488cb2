"""The emulator's TDP MMU roots: shared faults, root reloads, and what each zap_scope zaps."""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from tdxtrace.codes import FROZEN_SPTE, SHADOW_NONPRESENT_VALUE, Leaf
from tdxtrace.events import FaultOutcome, Flow, KickReason, Kind, RootEvent, RootKind, ZapReason
from tdxtrace.sim.roots_guest import SHARED_BIT
from tdxtrace.sim.scenario import Scenario, load_scenario, resolve
from tdxtrace.sim.world import World

SHARED = pl.col("gpa").is_not_null() & ((pl.col("gpa") & SHARED_BIT) != 0)
ZAP_LEAVES = [int(Leaf.TDH_MEM_RANGE_BLOCK), int(Leaf.TDH_MEM_TRACK),
              int(Leaf.TDH_MEM_PAGE_REMOVE), int(Leaf.TDH_PHYMEM_PAGE_WBINVD)]


def run(scope: str = "range_leafs", seed: int = 1, **vmm: Any
        ) -> tuple[pl.DataFrame, dict[str, Any], World]:
    """Two vCPUs touching private and shared memory; the VMM changes what ``vmm`` says."""
    raw = {
        "run": {"duration_us": 3000},
        "host": {"lps": 3, "packages": 1},
        "td": {"vcpus": 2, "memory_mb": 4},
        "policy": {"zap_scope": scope},
        "guest": {"workload": "hot", "hot_pages": 64, "hot_fraction": 0.9,
                  "shared_fraction": 0.3, "shared_pages": 32},
        "vmm": vmm,
        "teardown": {"enabled": False},  # only the run's own zaps
    }
    batches: list[pa.RecordBatch] = []
    world = World(Scenario(resolve(raw, "test")), seed, batches.append)
    world.run()
    frame = pl.from_arrow(pa.Table.from_batches(batches))
    assert isinstance(frame, pl.DataFrame)
    return frame, world.log.truth(), world


def zapped(frame: pl.DataFrame) -> pl.DataFrame:
    """SPTE_CHANGED rows that zap a present SPTE (not a fault freezing one)."""
    return frame.filter((pl.col("kind") == Kind.SPTE_CHANGED)
                        & ((pl.col("arg0") & SHADOW_NONPRESENT_VALUE) == 0)
                        & (pl.col("arg1") != FROZEN_SPTE)
                        & ((pl.col("arg1") & SHADOW_NONPRESENT_VALUE) != 0))


def zaps_for(frame: pl.DataFrame, reason: ZapReason, finished: bool = False) -> pl.DataFrame:
    """Every row that shares a corr with a ZAP of ``reason`` (that ended, if ``finished``)."""
    kind = Kind.ZAP_DONE if finished else Kind.ZAP
    corrs = frame.filter((pl.col("kind") == kind) & (pl.col("sub") == reason))["corr"]
    assert corrs.len() > 0
    return frame.filter(pl.col("corr").is_in(corrs.implode()))


def test_shared_accesses_fault_in_the_direct_root_without_seamcalls() -> None:
    frame, truth, _ = run()
    faults = frame.filter((pl.col("kind") == Kind.PAGE_FAULT) & SHARED)
    assert truth["shared_faults"] == faults.height > 0
    rows = frame.filter(pl.col("corr").is_in(faults["corr"].implode()))
    assert rows.filter(pl.col("kind") == Kind.SEAMCALL).height == 0
    assert set(rows.filter(pl.col("kind") == Kind.SPTE_CHANGED)["sub"]) == {RootKind.DIRECT}
    done = rows.filter(pl.col("kind") == Kind.FAULT_DONE)
    assert done.height == faults.height and set(done["sub"]) == {FaultOutcome.SHARED}
    # Without zaps each shared page is mapped once: one leaf per distinct page.
    leaves = rows.filter((pl.col("kind") == Kind.SPTE_CHANGED) & (pl.col("level") == 0))
    assert leaves.height == leaves["gpa"].n_unique() == faults["gpa"].n_unique()
    roots = frame.filter(pl.col("kind") == Kind.ROOT)
    assert roots.select("sub", "arg0", "arg2").rows() == [
        (RootEvent.CREATED, RootKind.MIRROR, 1), (RootEvent.CREATED, RootKind.DIRECT, 2)]
    assert truth["refaults"] == 0 and truth["zero_step_incidents"] == 0


def test_scenarios_without_these_features_have_no_roots() -> None:
    batches: list[pa.RecordBatch] = []
    world = World(load_scenario("fault-storm", ["run.duration_us=1000"]), 1, batches.append)
    world.run()
    kinds = set(pa.Table.from_batches(batches).column("kind").to_pylist())
    assert world.roots is None and world.mapgpa is None
    assert not kinds & {Kind.ROOT, Kind.GUEST_MAPGPA, Kind.TDVMCALL, Kind.USERSPACE_EXIT}


@pytest.mark.parametrize("scope", ["range_leafs", "all_roots", "everything"])
def test_notifier_zaps_private_leaves_only_under_a_too_wide_scope(scope: str) -> None:
    # Each invalidation covers all of guest memory: private pages and the shared window.
    frame, truth, _ = run(scope, notifier_interval_us=400, notifier_pages=4096)
    rows = zaps_for(frame, ZapReason.NOTIFIER)
    gone = zapped(rows)
    private = gone.filter(pl.col("sub") == RootKind.MIRROR)
    unexpected = frame.filter(pl.col("kind") == Kind.T_PRIVATE_ZAP_UNEXPECTED)
    assert truth["private_zaps_unexpected"] == unexpected.height == private.height
    assert gone.filter(pl.col("sub") == RootKind.DIRECT).height > 0
    if scope == "range_leafs":
        assert private.height == 0
        assert rows.filter(pl.col("kind") == Kind.SEAMCALL).height == 0
    else:
        assert private.height > 0
        assert (unexpected["sub"] == ZapReason.NOTIFIER).all()
    # Zaps that ended (the run may stop in the middle of one): BLOCK, TRACK, REMOVE and WBINVD
    # for each private leaf, and ZAP_DONE counts what went.
    ended = zaps_for(frame, ZapReason.NOTIFIER, finished=True)
    ended_private = zapped(ended).filter(pl.col("sub") == RootKind.MIRROR).height
    calls = ended.filter(pl.col("kind") == Kind.SEAMCALL)
    for leaf in ZAP_LEAVES:
        assert calls.filter(pl.col("leaf") == leaf).height >= ended_private
    done = ended.filter(pl.col("kind") == Kind.ZAP_DONE)
    assert done["arg0"].sum() == zapped(ended).height and done["arg1"].sum() == ended_private


@pytest.mark.parametrize("scope", ["range_leafs", "all_roots", "everything"])
def test_memslot_change_of_the_shared_slot(scope: str) -> None:
    frame, truth, _ = run(scope, memslot_interval_us=700)
    rows = zaps_for(frame, ZapReason.MEMSLOT)
    gone = zapped(rows)
    if scope == "everything":  # the big hammer: every private leaf, every SPTE of the root
        assert gone.filter(pl.col("sub") == RootKind.MIRROR).height > 0
        assert truth["private_zaps_unexpected"] > 0
        assert gone.filter((pl.col("sub") == RootKind.DIRECT) & (pl.col("level") > 0)).height
    else:  # the slot holds shared memory only: nothing private may go
        assert gone.height > 0 and gone.select(SHARED.all()).item()
        assert truth["private_zaps_unexpected"] == 0
        assert frame.filter(pl.col("kind") == Kind.T_PRIVATE_ZAP_UNEXPECTED).height == 0


def test_sptes_zapped_counts_every_zapped_spte_of_both_roots() -> None:
    for scope in ("range_leafs", "everything"):
        frame, truth, _ = run(scope, memslot_interval_us=700, notifier_interval_us=500)
        assert truth["sptes_zapped"] == zapped(frame).height > 0


@pytest.mark.parametrize("scope", ["range_leafs", "everything"])
def test_refaults_are_faults_on_pages_zapped_since_their_last_fault(scope: str) -> None:
    frame, truth, _ = run(scope, memslot_interval_us=500)
    events = pl.concat([
        zapped(frame).filter(pl.col("level") == 0).select(
            "seq", "gpa", pl.lit(True).alias("zap")),
        frame.filter(pl.col("kind") == Kind.PAGE_FAULT).select(
            "seq", "gpa", pl.lit(False).alias("zap")),
    ]).sort("seq")
    previous = pl.col("zap").shift(1).over("gpa")
    refaults = events.filter(~pl.col("zap") & previous.fill_null(False))
    assert truth["refaults"] == refaults.height > 0
    private = refaults.filter(~SHARED)
    if scope == "range_leafs":
        assert private.height == 0  # only the shared window was zapped
    else:
        # The guest lost accepted pages: each comes back through PAGE.AUG (and an ACCEPT).
        assert private.height > 0
        faults = frame.filter(pl.col("seq").is_in(private["seq"].implode()))
        augs = frame.filter((pl.col("kind") == Kind.SEAMCALL)
                            & (pl.col("leaf") == Leaf.TDH_MEM_PAGE_AUG)
                            & pl.col("corr").is_in(faults["corr"].implode()))
        assert 0 < augs["gpa"].n_unique() <= private["gpa"].n_unique()


def test_an_invalidated_root_is_replaced_on_next_entry_and_freed_after_the_last_user() -> None:
    frame, _, world = run("everything", memslot_interval_us=1000)
    roots = frame.filter(pl.col("kind") == Kind.ROOT)
    invalidated = roots.filter(pl.col("sub") == RootEvent.INVALIDATED).row(0, named=True)
    old, at = invalidated["arg2"], invalidated["seq"]
    kicks = frame.filter((pl.col("corr") == invalidated["corr"]) & (pl.col("kind") == Kind.KICK))
    assert kicks["sub"][0] == KickReason.ROOT_RELOAD  # then TRACK kicks, one per private leaf
    created = roots.filter((pl.col("sub") == RootEvent.CREATED) & (pl.col("seq") > at)).row(
        0, named=True)
    assert created["arg0"] == RootKind.DIRECT and created["arg2"] != old
    freed = roots.filter((pl.col("sub") == RootEvent.FREED) & (pl.col("arg2") == old))
    assert freed.height == 1
    # Each vCPU drops its reference when it next enters (just before its VP.ENTER); the zap
    # drops the root's own once its SPTEs are gone. Whoever is last frees it.
    entries = frame.filter((pl.col("kind") == Kind.TD_ENTRY) & (pl.col("seq") > at))
    first_entries = entries.group_by("vcpu").agg(pl.col("seq").min())
    assert first_entries.height == 2
    last_entry = first_entries["seq"].max()
    if freed["corr"][0] == invalidated["corr"]:
        assert freed["seq"][0] > last_entry
    else:
        assert freed["seq"][0] == last_entry - 1
    assert created["seq"] < first_entries["seq"].min()
    assert roots.filter(pl.col("sub") == RootEvent.FREED)["flow"].is_in(
        [0, int(Flow.ZAP)]).all()
    assert world.roots is not None
    for v in world.tds[0].vcpus:
        loaded = world.roots.loaded_root(v)
        assert loaded is not None
        if not loaded.valid:  # invalidated since the vCPU last entered: it reloads next time
            at = roots.filter((pl.col("sub") == RootEvent.INVALIDATED)
                              & (pl.col("arg2") == loaded.root_id))["seq"].item()
            assert entries.filter(pl.col("vcpu") == v.index)["seq"].max() < at
