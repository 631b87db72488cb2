"""An LP runs one SEAMCALL at a time.

VP.FLUSH (smp_call_function_single), CACHE.WB (on_each_cpu_mask, its whole resume loop in the
IPI handler, interrupts off) and KEY.CONFIG (smp_call_on_cpu) each run on a target LP; a CPU
runs such functions one after another. With two TDs torn down at once, one TD's VP.FLUSH IPI
to a package's first LP lands while the other TD's CACHE.WB loop runs there, and waits for it.
And each TD's VMM (a QEMU process of its own) runs on an LP of its own, where no vCPU runs.
"""

from __future__ import annotations

import polars as pl
import pytest
from emulator_helpers import run

from tdxtrace.codes import Leaf
from tdxtrace.events import Flow, Kind
from tdxtrace.sim.world import lp_layout

SENT_TO_AN_LP = [int(Leaf.TDH_VP_FLUSH), int(Leaf.TDH_PHYMEM_CACHE_WB),
                 int(Leaf.TDH_MNG_KEY_CONFIG)]


def _calls_on_lps(events: pl.DataFrame) -> pl.DataFrame:
    """The calls sent to an LP, in time order per LP, with the previous one's end there."""
    return events.filter(
        (pl.col("kind") == Kind.SEAMCALL) & pl.col("leaf").is_in(SENT_TO_AN_LP)
    ).sort("lp", "ts_ns", "seq").with_columns(
        (pl.col("ts_ns") + pl.col("dur_ns")).shift(1).over("lp").alias("previous_end"),
        pl.col("leaf").shift(1).over("lp").alias("previous_leaf"),
        pl.col("td").shift(1).over("lp").alias("previous_td"))


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_functions_sent_to_one_lp_never_overlap(seed: int) -> None:
    events, truth = run("teardown", seed=seed)
    calls = _calls_on_lps(events)
    assert calls.filter(pl.col("leaf") == Leaf.TDH_PHYMEM_CACHE_WB).height >= 4
    assert calls.filter(pl.col("ts_ns") < pl.col("previous_end")).height == 0
    assert truth["teardowns_finished"] == 2


@pytest.mark.parametrize("tds", [2, 3])
@pytest.mark.parametrize("release", ["late", "early"])
@pytest.mark.parametrize("host", [
    ("host.lps=10", "host.packages=2"),
    # Package 4's first LP is LP 8, where TD 1's VMM ran: its RECLAIMs met TD 0's CACHE.WB.
    ("host.lps=10", "host.packages=5"),
    ("host.lps=6", "host.packages=3", "td.vcpus=1"),
])
def test_no_two_seamcalls_overlap_on_an_lp_when_tds_are_torn_down_at_once(
        tds: int, release: str, host: tuple[str, ...]) -> None:
    events, truth = run("teardown", f"td.count={tds}", f"policy.hkid_release={release}", *host)
    calls = events.filter(pl.col("kind") == Kind.SEAMCALL).sort("lp", "ts_ns", "seq")
    previous_end = (pl.col("ts_ns") + pl.col("dur_ns")).shift(1).over("lp")
    assert calls.filter(pl.col("ts_ns") < previous_end).height == 0
    assert truth["teardowns_finished"] == tds


def test_each_tds_vmm_runs_on_an_lp_of_its_own() -> None:
    # teardown: 10 LPs, two TDs of 4 vCPUs: the VMMs on LPs 9 and 8, the vCPUs on 0-7.
    events, _ = run("teardown")
    vmm = events.filter((pl.col("kind") == Kind.SEAMCALL) & (pl.col("flow") == Flow.TEARDOWN)
                        & (pl.col("leaf") == Leaf.TDH_PHYMEM_PAGE_RECLAIM))
    assert vmm.group_by("td").agg(pl.col("lp").unique()).sort("td").rows() == [
        (0, [9]), (1, [8])]
    entries = events.filter(pl.col("kind") == Kind.TD_ENTRY)
    assert entries.height > 0 and entries["lp"].max() <= 7


@pytest.mark.parametrize(("lps", "packages", "tds", "layout"), [
    (10, 2, 2, ([0, 5], [9, 8], [0, 1, 2, 3, 4, 5, 6, 7])),
    (10, 5, 2, ([0, 2, 4, 6, 8], [9, 7], [0, 1, 2, 3, 4, 5, 6, 8])),
    (4, 4, 2, ([0, 1, 2, 3], [3, 2], [0, 1])),  # every LP a first one: no way around them
    (1, 2, 3, ([0], [0], [0])),  # one LP does everything
])
def test_vmm_lps_keep_off_the_packages_first_lps_while_others_are_left(
        lps: int, packages: int, tds: int,
        layout: tuple[list[int], list[int], list[int]]) -> None:
    assert lp_layout(lps, packages, tds) == layout


def test_a_vp_flush_waits_for_another_tds_cache_wb() -> None:
    # A TD's vCPU last ran on a package's first LP while the other TD flushes the caches
    # there: its VP.FLUSH starts the moment the other TD's last CACHE.WB call ends.
    waited = 0
    for seed in (1, 2, 3, 4):
        events, _ = run("teardown", seed=seed)
        waited += _calls_on_lps(events).filter(
            (pl.col("leaf") == Leaf.TDH_VP_FLUSH)
            & (pl.col("previous_leaf") == Leaf.TDH_PHYMEM_CACHE_WB)
            & (pl.col("previous_td") != pl.col("td"))
            & (pl.col("ts_ns") == pl.col("previous_end"))).height
    assert waited >= 1
