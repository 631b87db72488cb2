"""busy_retry keeps INTERRUPTED_RESUMABLE (the CACHE.WB resume protocol) out of contention.

A CACHE.WB flush returns INTERRUPTED_RESUMABLE after each sub-block and KVM calls again with
resume = 1 (tdx-reference.md 4(c)): that is a *resume chain*, not a retry chain, so it must not
feed chains, max_chain, lost_ns or livelock_candidates; it has its own figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from cli_helpers import run_cli
from emulator_helpers import run
from polars.testing import assert_frame_equal

from tdxtrace.codes import Leaf, OperandId, Status
from tdxtrace.events import Flow, Kind
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace_plugins.busy_retry import RESUME_SCHEMA, BusyRetry

WB = Leaf.TDH_PHYMEM_CACHE_WB
AUG = Leaf.TDH_MEM_PAGE_AUG
RESUMABLE = Status.INTERRUPTED_RESUMABLE
BUSY_SEPT = Status.OPERAND_BUSY | OperandId.SEPT_TREE
BUSY_KOT = Status.OPERAND_BUSY | OperandId.KOT
BUSY_WBCACHE = Status.OPERAND_BUSY | OperandId.WBCACHE
STEP = 100_000  # ns between two CACHE.WB calls of a flush
DUR = 90_000
CONTENTION = ("chains", "max_chain", "gave_up", "lost_ns", "livelock_candidates")


def wb(ts: int, status: int, *, corr: int = 5, lp: int = 4, resume: int = 1,
       td: int = 0) -> dict[str, Any]:
    return {"kind": Kind.SEAMCALL, "ts_ns": ts, "dur_ns": DUR, "leaf": WB, "status": status,
            "corr": corr, "td": td, "lp": lp, "flow": Flow.TEARDOWN, "arg0": resume}


def flush(start: int, statuses: list[int], **kw: Any) -> list[dict[str, Any]]:
    """One CACHE.WB operation: a call per status, STEP apart, resume = 1 from the second."""
    return [wb(start + i * STEP, status, resume=min(i, 1), **kw)
            for i, status in enumerate(statuses)]


def aug(ts: int, status: int, corr: int = 1) -> dict[str, Any]:
    return {"kind": Kind.SEAMCALL, "ts_ns": ts, "dur_ns": 100, "leaf": AUG, "status": status,
            "corr": corr, "td": 0, "vcpu": 0, "lp": 0, "gpa": 0x1000, "flow": Flow.FAULT}


def analyze(rows: list[dict[str, Any]]) -> Any:
    return run_analyzer(BusyRetry(), make_trace(rows))


def resume_rows(*rows: tuple[Any, ...]) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=RESUME_SCHEMA, orient="row")


def contention(result: Any) -> dict[str, Any]:
    return {k: result.metrics[k] for k in CONTENTION}


def test_a_flush_alone_is_a_resume_chain_and_no_contention() -> None:
    # 20 sub-blocks over 1.9 ms: long and slow enough to have been a livelock candidate twice.
    result = analyze(flush(1000, [RESUMABLE] * 19 + [0]))
    assert contention(result) == dict.fromkeys(CONTENTION, 0)
    assert all(result.tables[t].is_empty() for t in ("chains", "chain_length_hist", "livelock"))
    assert {k: result.metrics[k] for k in ("interrupted_resumable", "resume_chains",
                                           "max_resume_chain", "resume_gave_up",
                                           "resume_ns")} == {
        "interrupted_resumable": 19, "resume_chains": 1, "max_resume_chain": 20,
        "resume_gave_up": 0, "resume_ns": 19 * STEP + DUR}
    assert_frame_equal(result.tables["resume_chains"], resume_rows(
        (5, 0, None, "TDH.PHYMEM.CACHE.WB", 4, "teardown", 20, 0, "success", "TDX_SUCCESS",
         1000, 19 * STEP + DUR)))
    # Still counted by leaf and status, as the issue asks.
    assert result.tables["by_leaf_operand"].rows() == [
        ("TDH.PHYMEM.CACHE.WB", "-", "teardown", "TDX_INTERRUPTED_RESUMABLE", 19)]


def test_a_busy_chain_beside_flushes_is_the_only_contention() -> None:
    rows = [aug(0, BUSY_SEPT), aug(500, BUSY_SEPT), aug(2000, 0)]
    rows += flush(10_000, [RESUMABLE] * 3 + [0], lp=4)
    rows += flush(10_050, [RESUMABLE] * 3 + [0], lp=6)
    result = analyze(rows)
    assert contention(result) == {
        "chains": 1, "max_chain": 3, "gave_up": 0, "lost_ns": 2000, "livelock_candidates": 0}
    assert result.tables["chains"].select("leaf", "length", "lost_ns").rows() == [
        ("TDH.MEM.PAGE.AUG", 3, 2000)]
    assert result.tables["chain_length_hist"].rows() == [(3, 1)]
    assert (result.metrics["resume_chains"], result.metrics["max_resume_chain"]) == (2, 4)
    assert result.tables["resume_chains"]["target"].to_list() == [4, 6]
    assert result.metrics["resume_ns"] == 2 * (3 * STEP + DUR)


def test_busy_calls_in_a_flush_are_contention_and_the_resumes_are_not() -> None:
    # Package 1: two BUSYs before the flush starts, then 3 sub-blocks. Package 2: a BUSY
    # between two resumes.
    before = flush(0, [BUSY_WBCACHE, BUSY_WBCACHE, RESUMABLE, RESUMABLE, 0], lp=4)
    between = flush(0, [RESUMABLE, BUSY_KOT, RESUMABLE, 0], lp=6, corr=6)
    result = analyze(before + between)
    chains = result.tables["chains"].select("corr", "operand", "length", "outcome", "lost_ns")
    # The BUSYs end, as a success, at the call that got the lock and resumed.
    assert chains.rows() == [(5, "WBCACHE", 3, "success", 2 * STEP),
                             (6, "KOT", 2, "success", STEP)]
    assert (result.metrics["max_chain"], result.metrics["lost_ns"]) == (3, 3 * STEP)
    # The resume chain starts at the first resume; a BUSY inside it stays in it.
    resumes = result.tables["resume_chains"].select("corr", "length", "busy_calls", "outcome",
                                                    "start_ns", "resume_ns")
    assert resumes.rows() == [(6, 4, 1, "success", 0, 3 * STEP + DUR),
                              (5, 3, 0, "success", 2 * STEP, 2 * STEP + DUR)]
    assert (result.metrics["busy_total"], result.metrics["interrupted_resumable"]) == (3, 4)


def test_a_flush_that_runs_out_or_fails_is_a_resume_chain_that_gave_up() -> None:
    rows = flush(0, [RESUMABLE] * 30, corr=1)  # the budget ran out: still resumable
    rows += flush(0, [RESUMABLE, RESUMABLE, Status.WBCACHE_RESUME_ERROR], corr=2)
    rows += flush(0, [RESUMABLE, BUSY_KOT], corr=3)  # KVM does not retry a BUSY CACHE.WB
    rows += flush(0, [RESUMABLE] * 39 + [0], corr=4)  # longest, but fine
    result = analyze(rows)
    assert result.tables["resume_chains"].select(
        "corr", "length", "busy_calls", "outcome", "last_status").rows() == [
        (1, 30, 0, "gave_up", "TDX_INTERRUPTED_RESUMABLE"),
        (2, 3, 0, "gave_up", "TDX_WBCACHE_RESUME_ERROR"),
        (3, 2, 1, "gave_up", "TDX_OPERAND_BUSY|KOT"),
        (4, 40, 0, "success", "TDX_SUCCESS")]
    assert (result.metrics["resume_gave_up"], result.metrics["resume_chains"]) == (3, 4)
    assert contention(result) == dict.fromkeys(CONTENTION, 0)
    assert BusyRetry.thresholds["resume_gave_up"] == (1, 1)  # the report marks it failed
    # A VM_BUGGED for the leaf after the flush started: it gave up too.
    bugged = analyze([*flush(0, [RESUMABLE, RESUMABLE, 0], corr=7),
                      {"kind": Kind.VM_BUGGED, "ts_ns": 10 * STEP, "leaf": WB, "corr": 7}])
    assert bugged.tables["resume_chains"]["outcome"].to_list() == ["gave_up"]


def test_a_resumable_cache_wb_holds_the_kot() -> None:
    # The CACHE.WB call that returned INTERRUPTED_RESUMABLE did take the KOT (shared).
    freeid = {"kind": Kind.SEAMCALL, "ts_ns": STEP + 10, "dur_ns": 100,
              "leaf": Leaf.TDH_MNG_KEY_FREEID, "status": BUSY_KOT, "corr": 9, "td": 1,
              "flow": Flow.TEARDOWN}
    result = analyze([*flush(0, [RESUMABLE, RESUMABLE, 0]), freeid])
    assert result.tables["holders"].select("leaf", "holder", "count").rows() == [
        ("TDH.MNG.KEY.FREEID", "TDH.PHYMEM.CACHE.WB", 1)]


@pytest.mark.parametrize("overrides", [
    ("teardown.cache_wb_blocks=20", "td.memory_mb=8"),
    ("teardown.cache_wb_blocks=20", "td.memory_mb=8", "faults.spurious_busy_leaf='phymem.cache.wb'",
     "faults.spurious_busy_p=0.1"),
])
def test_resume_figures_match_the_emulator(overrides: tuple[str, ...]) -> None:
    events, truth = run("teardown", *overrides)
    result = run_analyzer(BusyRetry(), make_trace(events.to_dicts()))
    assert result.metrics["interrupted_resumable"] == truth.get("cache_wb_resumes", 0) > 0
    assert result.metrics["busy_total"] == truth["busy_total"]
    # One resume chain per package flush that resumed; it gave up unless its last call
    # succeeded (a BUSY ends KVM's loop).
    wb_calls = events.filter((pl.col("kind") == int(Kind.SEAMCALL)) & (pl.col("leaf") == WB))
    loops = wb_calls.group_by("corr", "lp").agg(
        (pl.col("status") == int(RESUMABLE)).sum().alias("resumes"),
        pl.col("status").last().alias("last"))
    resumed = loops.filter(pl.col("resumes") > 0)
    assert result.metrics["resume_chains"] == resumed.height
    assert result.metrics["resume_gave_up"] == resumed.filter(pl.col("last") != 0).height
    assert contention(result) == dict.fromkeys(CONTENTION, 0)  # a lone BUSY is no chain


def _analyze_cli(path: Path) -> dict[str, Any]:
    result = run_cli("analyze", path, "-a", "busy_retry", "--format", "json")
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)["busy_retry"]
    return doc


def _record_cli(path: Path, scenario: str, seed: int, *settings: str) -> None:
    args = [a for s in settings for a in ("--set", s)]
    result = run_cli("record", scenario, "--seed", str(seed), *args, "-o", path)
    assert result.exit_code == 0, result.output


def test_cli_policy_comparison_shows_the_contention_difference(tmp_path: Path) -> None:
    """README's A/B: the ~640 µs CACHE.WB flush no longer hides ~26 µs vs ~7 µs of BUSY."""
    docs = {}
    for policy in ("resume_guest", "local_retry"):
        path = tmp_path / f"{policy}.arrow"
        _record_cli(path, "zero-step", 2, f"policy.frozen_spte={policy}")
        docs[policy] = doc = _analyze_cli(path)
        metrics, tables = doc["metrics"], doc["tables"]
        assert all(c["leaf"] != "TDH.PHYMEM.CACHE.WB" for c in tables["chains"])
        assert metrics["lost_ns"] == sum(c["lost_ns"] for c in tables["chains"]) < 100_000
        assert metrics["max_chain"] == max((c["length"] for c in tables["chains"]), default=0)
        # The teardown's flush is a resume chain with every INTERRUPTED_RESUMABLE in it.
        assert metrics["resume_chains"] >= 1
        assert {(c["leaf"], c["outcome"]) for c in tables["resume_chains"]} == {
            ("TDH.PHYMEM.CACHE.WB", "success")}
        assert metrics["interrupted_resumable"] == sum(
            c["length"] - 1 for c in tables["resume_chains"])
        assert metrics["resume_ns"] > 100_000
    resume, local = docs["resume_guest"]["metrics"], docs["local_retry"]["metrics"]
    assert resume["lost_ns"] > 2 * local["lost_ns"] > 0
    assert resume["busy_total"] > local["busy_total"]


def test_cli_healthy_teardown_flush_is_no_livelock(tmp_path: Path) -> None:
    path = tmp_path / "t.arrow"
    _record_cli(path, "teardown", 1, "teardown.cache_wb_blocks=20", "td.memory_mb=8")
    metrics = _analyze_cli(path)["metrics"]
    assert {k: metrics[k] for k in ("busy_total", *CONTENTION)} == {
        "busy_total": 0, **dict.fromkeys(CONTENTION, 0)}
    info = run_cli("info", "--json", path)
    assert info.exit_code == 0, info.output
    resumes = json.loads(info.stdout)["truth"]["cache_wb_resumes"]
    # Each package flush of 20 sub-blocks: 19 resumes, one resume chain of 20 calls.
    assert metrics["interrupted_resumable"] == resumes == 19 * metrics["resume_chains"] > 0
    assert (metrics["max_resume_chain"], metrics["resume_gave_up"]) == (20, 0)
