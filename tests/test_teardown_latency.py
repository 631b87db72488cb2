"""teardown_latency on hand-built teardown traces whose timings are known exactly."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from teardown_helpers import Teardown

from tdxtrace.codes import Leaf, Status
from tdxtrace.events import Flow, Kind, Phase
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace_plugins._teardown_fit import EXTRAPOLATION_GB, GIB
from tdxtrace_plugins.teardown_latency import TeardownLatency

ANALYZER = TeardownLatency()


def one_td(**kwargs: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    Teardown(rows, td=0, start_ns=10_000).full(**kwargs)
    return rows


def test_late_release_phases_waterfall_and_per_page_cost() -> None:
    result = run_analyzer(ANALYZER, make_trace(one_td(pages=4, per_page_ns=8000, wb_resumes=2)))

    # 4 pages x 8000 ns; VP_FLUSH 40 (IPI) + 300 + 200; CACHE.WB 3 calls on lp 0 + 1 on lp 2.
    expected = pl.DataFrame(
        {
            "td": [0] * 8,
            "phase": ["private_pages", "vp_flush", "vpflushdone", "cache_wb", "key_freeid",
                      "reclaim_sept", "reclaim_vcpu", "reclaim_td"],
            "start_ns": [10_000, 42_000, 42_540, 42_640, 46_640, 46_690, 46_990, 47_190],
            "dur_ns": [32_000, 540, 100, 4000, 50, 300, 200, 260],
            "work": [4, 2, None, 2, None, 3, 2, 2],
            "calls": [16, 2, 1, 4, 1, 3, 2, 3],
            "retries": [0, 0, 0, 2, 0, 0, 0, 0],
            "finished": [True] * 8,
            "status": ["TDX_SUCCESS"] * 8,
        },
        schema_overrides={"td": pl.Int32},
    )
    assert_frame_equal(result.tables["phases"], expected)

    per_td = result.tables["per_td"].row(0, named=True)
    assert per_td["teardown_ns"] == 47_450 - 10_000
    assert (per_td["start_ns"], per_td["end_ns"]) == (10_000, 47_450)
    assert per_td["private_pages"] == 4
    assert per_td["per_page_ns"] == 8000.0
    assert (per_td["vcpus"], per_td["packages"]) == (2, 2)
    assert per_td["policy"] == "late"
    assert per_td["finished"] and not per_td["hkid_leaked"] and per_td["pages_leaked"] == 0

    m = result.metrics
    assert (m["teardowns"], m["finished"], m["hkid_leaks"]) == (1, 1, 0)
    assert m["max_teardown_ns"] == 37_450
    assert m["per_page_ns"] == 8000.0
    assert m["cache_wb_resumes"] == 2
    assert m["vpflushdone_retries"] == 0

    vp_flush = result.tables["vp_flush"]
    assert vp_flush.select("vcpu", "lp", "ipi_ns", "dur_ns").rows() == [(0, 1, 40, 300),
                                                                        (1, 0, 0, 200)]


def test_single_td_seconds_per_gb_splits_per_page_cost_from_fixed_part() -> None:
    result = run_analyzer(ANALYZER, make_trace(one_td(pages=4, per_page_ns=8000)))
    fixed_ns = 37_450 - 32_000 - 2 * 1000  # no resumes: CACHE.WB takes 2000 ns less
    slope = 8000 / 4096  # ns per byte
    assert result.metrics["seconds_per_gb"] == pytest.approx(slope * GIB / 1e9)
    extrapolation = result.tables["extrapolation"]
    assert extrapolation["gb"].to_list() == list(EXTRAPOLATION_GB)
    assert set(extrapolation["policy"]) == {"late"}
    assert extrapolation["seconds"].to_list() == pytest.approx(
        [(fixed_ns + slope * gb * GIB) / 1e9 for gb in EXTRAPOLATION_GB])
    assert any("vCPU" in note for note in result.notes)  # the model's limit is stated


def test_batched_rows_count_as_their_arg1_pages_when_phase_gives_no_count() -> None:
    rows: list[dict[str, Any]] = []
    td = Teardown(rows, td=0, start_ns=0)
    td.phase(Phase.TEARDOWN)
    td.zap_pages(6, 4000, announce=False, batch=3)  # 2 rows of each leaf, arg1 = 3
    result = run_analyzer(ANALYZER, make_trace(rows))
    per_td = result.tables["per_td"].row(0, named=True)
    assert per_td["private_pages"] == 6
    assert per_td["per_page_ns"] == 4000.0
    assert result.tables["phases"]["calls"].to_list() == [24]
    assert not per_td["finished"]  # the trace ends before PHASE_DONE(TEARDOWN)


def test_trace_ending_mid_zap_prices_only_the_pages_zapped_so_far() -> None:
    rows: list[dict[str, Any]] = []
    td = Teardown(rows, td=0, start_ns=0)
    td.phase(Phase.TEARDOWN)
    td.zap_pages(2, 3000)
    del rows[-1]  # PHASE_DONE(PRIVATE_PAGES) never written: the trace ends here
    rows[1]["arg0"] = 8  # the phase announced 8 pages
    result = run_analyzer(ANALYZER, make_trace(rows))
    per_td = result.tables["per_td"].row(0, named=True)
    assert (per_td["private_pages"], per_td["per_page_ns"]) == (8, 3000.0)
    assert (per_td["finished"], per_td["teardown_ns"]) == (False, 6000)
    assert result.tables["phases"].select("dur_ns", "finished", "status").row(0) == (
        6000, False, None)
    assert any("lower bound" in note for note in result.notes)


def test_flushvp_not_done_leaks_the_hkid_and_teardown_never_finishes() -> None:
    rows: list[dict[str, Any]] = []
    td = Teardown(rows, td=0, start_ns=0)
    td.phase(Phase.TEARDOWN)
    td.zap_pages(2, 1000)
    td.release_hkid(flushvp_not_done=True)
    # KVM gives up on the HKID: no FREEID, no reclaim; the phases that started are all done.
    result = run_analyzer(ANALYZER, make_trace(rows))
    per_td = result.tables["per_td"].row(0, named=True)
    assert per_td["hkid_leaked"] and not per_td["finished"]
    assert per_td["packages"] is None  # CACHE.WB never ran: unknown, not 0
    assert per_td["pages_leaked"] == 0  # the private pages were removed before the leak
    phases = result.tables["phases"]
    assert phases.filter(phase="vpflushdone")["status"].to_list() == ["TDX_FLUSHVP_NOT_DONE"]
    assert phases.filter(phase="private_pages")["status"].to_list() == ["TDX_SUCCESS"]
    m = result.metrics
    assert (m["teardowns"], m["finished"], m["hkid_leaks"]) == (1, 0, 1)
    assert m["max_teardown_ns"] == 0  # unfinished teardowns are lower bounds, not maxima
    assert result.tables["fit"].is_empty()
    assert ANALYZER.thresholds["hkid_leaks"] == (1, 1)


def test_vpflushdone_retried_until_it_succeeds_is_no_leak() -> None:
    rows: list[dict[str, Any]] = []
    td = Teardown(rows, td=0, start_ns=0)
    td.phase(Phase.TEARDOWN)
    td.phase(Phase.VPFLUSHDONE)
    td.call(Leaf.TDH_MNG_VPFLUSHDONE, 100, Status.FLUSHVP_NOT_DONE)
    td.call(Leaf.TDH_MNG_VPFLUSHDONE, 100, Status.FLUSHVP_NOT_DONE)
    td.call(Leaf.TDH_MNG_VPFLUSHDONE, 100)
    td.done(Phase.VPFLUSHDONE)
    td.phase(Phase.KEY_FREEID)
    td.call(Leaf.TDH_MNG_KEY_FREEID, 50)
    td.done(Phase.KEY_FREEID)
    td.done(Phase.TEARDOWN)
    result = run_analyzer(ANALYZER, make_trace(rows))
    assert result.metrics["vpflushdone_retries"] == 2
    assert result.metrics["hkid_leaks"] == 0
    assert result.tables["phases"].filter(phase="vpflushdone")["retries"].to_list() == [2]


def test_vpflushdone_that_fails_then_succeeds_after_flushing_again_is_no_leak() -> None:
    # resend_flush (seed 001): a VPFLUSHDONE phase ends in FLUSHVP_NOT_DONE, every vCPU is
    # flushed again, and the next VPFLUSHDONE succeeds; the teardown finishes.
    result = run_analyzer(ANALYZER, make_trace(one_td(pages=2, per_page_ns=1000, resends=2)))
    per_td = result.tables["per_td"].row(0, named=True)
    assert not per_td["hkid_leaked"] and per_td["finished"]
    m = result.metrics
    assert (m["teardowns"], m["finished"], m["hkid_leaks"]) == (1, 1, 0)
    assert m["max_teardown_ns"] == per_td["teardown_ns"] > 0


def test_trace_ending_between_vpflushdone_attempts_is_no_leak_yet() -> None:
    rows: list[dict[str, Any]] = []
    td = Teardown(rows, td=0, start_ns=0)
    td.phase(Phase.TEARDOWN)
    td.release_hkid(resends=1)
    cut = next(i for i, r in enumerate(rows) if r["kind"] == Kind.PHASE_DONE
               and r.get("status") == Status.FLUSHVP_NOT_DONE)
    result = run_analyzer(ANALYZER, make_trace(rows[:cut + 1]))
    per_td = result.tables["per_td"].row(0, named=True)
    assert not per_td["hkid_leaked"] and not per_td["finished"]
    assert result.metrics["hkid_leaks"] == 0


def test_failed_key_freeid_leaks_the_pages_that_were_not_reclaimed() -> None:
    rows: list[dict[str, Any]] = []
    td = Teardown(rows, td=3, start_ns=0)
    td.phase(Phase.TEARDOWN)
    td.phase(Phase.KEY_FREEID)
    td.call(Leaf.TDH_MNG_KEY_FREEID, 50, Status.WBCACHE_NOT_COMPLETE)
    td.done(Phase.KEY_FREEID, Status.WBCACHE_NOT_COMPLETE)
    td.phase(Phase.RECLAIM_SEPT, 5)
    td.call(Leaf.TDH_PHYMEM_PAGE_RECLAIM, 100, Status.LIFECYCLE_STATE_INCORRECT)
    td.done(Phase.RECLAIM_SEPT, Status.LIFECYCLE_STATE_INCORRECT)
    td.done(Phase.TEARDOWN)
    result = run_analyzer(ANALYZER, make_trace(rows))
    per_td = result.tables["per_td"].row(0, named=True)
    assert (per_td["td"], per_td["hkid_leaked"], per_td["finished"]) == (3, True, False)
    assert per_td["pages_leaked"] == 5
    assert result.metrics["pages_leaked"] == 5


def test_two_tds_fit_a_line_exactly() -> None:
    # Synthetic linear data: teardown = 3450 ns fixed + 2000 ns per page (both TDs alike).
    rows: list[dict[str, Any]] = []
    Teardown(rows, td=0, start_ns=0).full(pages=4, per_page_ns=2000)
    Teardown(rows, td=1, start_ns=100_000).full(pages=12, per_page_ns=2000)
    result = run_analyzer(ANALYZER, make_trace(rows))
    per_td = result.tables["per_td"]
    assert per_td["teardown_ns"].to_list() == [8000 + 3450, 24_000 + 3450]
    fit = result.tables["fit"].row(0, named=True)
    assert (fit["policy"], fit["tds"], fit["method"]) == ("late", 2, "least_squares")
    assert fit["fixed_ns"] == pytest.approx(3450)
    assert fit["ns_per_page"] == pytest.approx(2000)
    assert result.metrics["seconds_per_gb"] == pytest.approx(2000 / 4096 * GIB / 1e9)
    assert result.metrics["seconds_per_gb_late"] == result.metrics["seconds_per_gb"]
    assert result.metrics["max_teardown_ns"] == 27_450


def test_early_release_is_told_apart_and_fitted_on_its_own() -> None:
    rows: list[dict[str, Any]] = []
    Teardown(rows, td=0, start_ns=0).full(pages=8, per_page_ns=8000)
    Teardown(rows, td=1, start_ns=200_000).full(pages=8, per_page_ns=500, early=True)
    result = run_analyzer(ANALYZER, make_trace(rows))
    per_td = result.tables["per_td"]
    assert per_td.select("td", "policy", "private_pages", "per_page_ns").rows() == [
        (0, "late", 8, 8000.0), (1, "early", 8, 500.0)]
    early = result.tables["phases"].filter(td=1)
    assert early["phase"].to_list()[:2] == ["vp_flush", "vpflushdone"]
    assert early.filter(phase="private_pages")["calls"].to_list() == [8]  # 2 rows x arg1 4
    m = result.metrics
    assert m["seconds_per_gb_early"] == pytest.approx(500 / 4096 * GIB / 1e9)
    assert m["seconds_per_gb_late"] == pytest.approx(8000 / 4096 * GIB / 1e9)
    assert m["seconds_per_gb"] == m["seconds_per_gb_late"]  # the worse policy
    assert m["per_page_ns"] == pytest.approx(4250.0)
    assert result.tables["extrapolation"]["policy"].unique(maintain_order=True).to_list() == [
        "early", "late"]


def test_td_that_never_tears_down_counts_no_teardown() -> None:
    rows = [
        {"kind": Kind.PHASE, "ts_ns": 0, "flow": Flow.CREATE, "sub": Phase.CREATE, "td": 0},
        {"kind": Kind.SEAMCALL, "ts_ns": 5, "dur_ns": 900, "flow": Flow.FAULT, "td": 0,
         "leaf": Leaf.TDH_MEM_PAGE_AUG, "status": 0, "gpa": 0x1000, "level": 0},
        {"kind": Kind.PHASE_DONE, "ts_ns": 10, "flow": Flow.CREATE, "sub": Phase.CREATE,
         "td": 0},
    ]
    result = run_analyzer(ANALYZER, make_trace(rows))
    assert result.metrics["teardowns"] == 0
    assert result.tables["per_td"].is_empty()
    assert result.tables["phases"].is_empty()


def test_empty_trace_gives_zero_metrics_and_empty_tables_with_columns() -> None:
    result = run_analyzer("teardown_latency", make_trace([]))
    assert set(result.metrics.values()) == {0}
    for name in ("teardowns", "hkid_leaks", "max_teardown_ns"):
        assert result.metrics[name] == 0
    assert result.tables["phases"].columns == [
        "td", "phase", "start_ns", "dur_ns", "work", "calls", "retries", "finished", "status"]
    assert "teardown_ns" in result.tables["per_td"].columns
    assert result.tables["extrapolation"].columns == ["policy", "gb", "seconds"]
    assert all(t.is_empty() for t in result.tables.values())


def test_per_batch_form_matches_the_whole_trace() -> None:
    rows: list[dict[str, Any]] = []
    Teardown(rows, td=0, start_ns=0).full(pages=4, per_page_ns=2000, wb_resumes=1)
    Teardown(rows, td=1, start_ns=100_000).full(pages=8, per_page_ns=500, early=True)
    trace = make_trace(rows)
    state = ANALYZER.start(trace.metadata)
    frame = trace.events().collect()
    for offset in range(0, frame.height, 16):
        ANALYZER.feed(state, frame.slice(offset, 16))
    streamed, whole = ANALYZER.finish(state), ANALYZER.analyze(trace)
    assert streamed.metrics == whole.metrics
    for name, table in whole.tables.items():
        assert_frame_equal(streamed.tables[name], table)
