"""seamcall_latency: the per-leaf table in perf kvm stat's shape, VP.ENTER paired per vCPU."""

from __future__ import annotations

from typing import Any

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from tdxtrace.codes import Leaf, OperandId, Status
from tdxtrace.events import Kind
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace_plugins.seamcall_latency import BY_LEAF_SCHEMA, SeamcallLatency, values_at_ranks

BUSY_SEPT = Status.OPERAND_BUSY | OperandId.SEPT_TREE


def call(ts: int, leaf: int, dur: int, status: int = 0) -> dict[str, Any]:
    return {"kind": Kind.SEAMCALL, "ts_ns": ts, "dur_ns": dur, "leaf": leaf, "status": status,
            "td": 0, "lp": 0}


def run_row(kind: Kind, ts: int, vcpu: int, status: int | None = None) -> dict[str, Any]:
    return {"kind": kind, "ts_ns": ts, "td": 0, "vcpu": vcpu, "leaf": 0, "status": status}


def by_leaf(*rows: tuple[Any, ...]) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=BY_LEAF_SCHEMA, orient="row")


def test_per_leaf_table_with_vp_enter_paired_per_vcpu() -> None:
    rows = [
        run_row(Kind.TD_EXIT, 0, 2, 48),  # vCPU 2 was in the guest when the trace began
        run_row(Kind.TD_ENTRY, 0, 0),
        run_row(Kind.TD_ENTRY, 10, 1),
        call(20, Leaf.TDH_MEM_PAGE_AUG, 100, BUSY_SEPT),
        run_row(Kind.TD_EXIT, 100, 0, BUSY_SEPT),
        call(150, Leaf.TDH_MEM_PAGE_AUG, 600),
        call(200, Leaf.TDH_MEM_SEPT_ADD, 50),
        run_row(Kind.TD_EXIT, 310, 1, 48),
        call(400, Leaf.TDH_MEM_PAGE_AUG, 200),
        run_row(Kind.TD_ENTRY, 500, 0),  # the trace ends with vCPU 0 in the guest
        {"kind": Kind.T_LOCK_HOLDER, "ts_ns": 500, "truth": True, "leaf": 6},
    ]
    result = run_analyzer(SeamcallLatency(), make_trace(rows))
    expected = by_leaf(
        ("TDH.MEM.PAGE.AUG", 6, 3, 50.0, 100, 300.0, 200, 600, 600, 100 / 3),
        ("TDH.VP.ENTER", 0, 2, 100 / 3, 100, 200.0, 100, 300, 300, 50.0),
        ("TDH.MEM.SEPT.ADD", 3, 1, 100 / 6, 50, 50.0, 50, 50, 50, 0.0),
    )
    assert_frame_equal(result.tables["by_leaf"], expected)
    assert result.metrics == {"seamcalls": 6, "busy": 2, "leaves": 3}


def test_percentiles_are_nearest_rank() -> None:
    rows = [call(i, Leaf.TDH_MEM_TRACK, dur) for i, dur in enumerate(range(100, 0, -1))]
    table = run_analyzer(SeamcallLatency(), make_trace(rows)).tables["by_leaf"]
    assert table.select("min_ns", "p50_ns", "p99_ns", "max_ns").row(0) == (1, 50, 99, 100)


def test_ties_in_count_are_ordered_by_leaf_number_and_unknown_leaves_keep_a_name() -> None:
    rows = [call(0, 999, 10), call(1, Leaf.TDH_MEM_TRACK, 10), call(2, Leaf.TDH_VP_FLUSH, 10)]
    table = run_analyzer(SeamcallLatency(), make_trace(rows)).tables["by_leaf"]
    assert table["leaf"].to_list() == ["TDH.VP.FLUSH", "TDH.MEM.TRACK", "LEAF_999"]


def test_empty_trace() -> None:
    result = run_analyzer(SeamcallLatency(), make_trace([]))
    assert result.metrics == {"seamcalls": 0, "busy": 0, "leaves": 0}
    assert_frame_equal(result.tables["by_leaf"], by_leaf())


def test_found_by_name_through_the_plugin_system() -> None:
    result = run_analyzer("seamcall_latency", make_trace([call(0, Leaf.TDH_MEM_TRACK, 10)]))
    assert result.metrics["seamcalls"] == 1


def test_a_batched_row_counts_as_its_calls_each_with_an_equal_share() -> None:
    from tdxtrace.codes import Leaf
    from tdxtrace.events import Kind
    from tdxtrace.testing import make_trace, run_analyzer

    reclaim = int(Leaf.TDH_PHYMEM_PAGE_RECLAIM)
    trace = make_trace([
        {"kind": Kind.SEAMCALL, "ts_ns": 0, "leaf": reclaim, "status": 0, "dur_ns": 9000},
        {"kind": Kind.SEAMCALL, "ts_ns": 10, "leaf": reclaim, "status": 0, "dur_ns": 4000,
         "arg1": 4},
    ])
    result = run_analyzer("seamcall_latency", trace)
    assert result.metrics["seamcalls"] == 5
    row = result.tables["by_leaf"].row(0, named=True)
    assert row["count"] == 5 and row["min_ns"] == 1000 and row["max_ns"] == 9000
    assert row["p50_ns"] == 1000


def test_unit_and_batched_leaves_side_by_side_rank_alike_a_null_leaf_too() -> None:
    # by_leaf ranks leaves of single calls and leaves with batched rows by two routes; both
    # must be nearest-rank over calls, including for rows whose leaf is unknown (null).
    from tdxtrace_plugins.seamcall_latency import by_leaf as table_of

    calls = pl.DataFrame({
        "leaf_id": [None, None, 3, 3, 3, 3, 4, 4],
        "dur_ns": [5, 1, 4, 3, 2, 1, 10, 20],
        "busy": [False] * 8,
        "calls": [1, 1, 1, 1, 1, 1, 1, 3],  # leaf 4: one call of 10 ns, three of 20 ns
    })
    ranks = {row["leaf_id"]: (row["p50_ns"], row["p99_ns"], row["count"])
             for row in table_of(calls).iter_rows(named=True)}
    assert ranks == {3: (2, 4, 4), 4: (20, 20, 4), None: (1, 5, 2)}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(-(1 << 63), (1 << 63) - 1),
                          st.integers(-1000, 1000)), min_size=1, max_size=60),
       st.integers(1, 100))
def test_the_value_at_a_rank_is_the_sorted_value_there_nulls_first_huge_values_too(
        values: list[int | None], percent: int) -> None:
    # Percentiles are picked by selection, not by sorting: they must be the sorted value,
    # including ranks that fall on nulls and values no float holds exactly.
    series = pl.Series(values, dtype=pl.Int64)
    rank = max((len(values) * percent + 99) // 100, 1)
    assert values_at_ranks(series, [rank, 1, len(values)]) == [
        series.sort()[rank - 1], series.sort()[0], series.sort()[len(values) - 1]]
