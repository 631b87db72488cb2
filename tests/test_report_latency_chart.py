"""The SEAMCALL latency chart says that TDH.VP.ENTER's bar is mostly time in the guest."""

from __future__ import annotations

import polars as pl

from tdxtrace.report.charts import latency_by_leaf


def _by_leaf(leaves: list[str]) -> pl.DataFrame:
    n = len(leaves)
    return pl.DataFrame({"leaf": leaves, "count": [10] * n, "min_ns": [100] * n,
                         "p50_ns": [1_000] * n, "p99_ns": [5_000] * n, "max_ns": [9_000] * n})


def test_vp_enter_gets_a_note_and_other_leaves_do_not() -> None:
    with_enter = latency_by_leaf("c", _by_leaf(["TDH.MEM.PAGE.AUG", "TDH.VP.ENTER"]))
    assert with_enter.svg is not None
    assert "time in the guest" in with_enter.note
    without = latency_by_leaf("c", _by_leaf(["TDH.MEM.PAGE.AUG"]))
    assert "guest" not in without.note
