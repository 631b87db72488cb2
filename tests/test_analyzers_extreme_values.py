"""Every built-in analyzer survives any schema-valid value: a finished trace from another
producer (a converter from a real host, a hand edit with a fresh digest) can hold a uint64 of
2^63 or more, a negative LP, a negative duration. Such a value may make a figure absurd, but
no analyzer may fail on it: the others' results would still be reported, but that one's lost.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tdxtrace.analysis import run_analyzers
from tdxtrace.plugins import load_analyzers, make_plugin_manager
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.trace import Trace, open_trace

U64_MAX = 2**64 - 1
EXTREMES: dict[str, tuple[int, ...]] = {
    "arg0": (2**63, U64_MAX), "arg1": (2**63, U64_MAX), "arg2": (U64_MAX,),
    "gpa": (2**63, U64_MAX), "rip": (U64_MAX,), "status": (U64_MAX, 0),
    "lp": (-1, -(2**31)), "td": (-1, 2**31 - 1), "vcpu": (-1, 2**31 - 1),
    "dur_ns": (-1, 2**62), "corr": (-1, 2**62), "exit_reason": (2**32 - 1,),
    "level": (255,), "leaf": (2**16 - 1,), "sub": (2**16 - 1,),
    # Time going backwards and unknown codes are soft rules: read, warned about, analyzed.
    "ts_ns": (0, 2**62), "kind": (99,), "flow": (255,),
}
CASES = [(column, value) for column, values in EXTREMES.items() for value in values]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    # The demo has every flow: zero-step, zap BUSY retries, MapGPA, a teardown with CACHE.WB.
    path = tmp_path_factory.mktemp("extreme") / "demo.arrow"
    record(load_scenario("demo", []), 1, path)
    return open_trace(path).events().collect()


@pytest.mark.parametrize(("column", "value"), CASES, ids=[f"{c}={v}" for c, v in CASES])
def test_no_analyzer_fails_on_an_extreme_value(base: pl.DataFrame, column: str,
                                               value: int, tmp_path: Path) -> None:
    # Every 5th row of each kind gets the value, so every kind's rows carry some.
    picked = (pl.int_range(pl.len()).over("kind") % 5) == 0
    edited = base.with_columns(
        pl.when(picked).then(pl.lit(value)).otherwise(pl.col(column))
        .cast(base.schema[column]).alias(column))
    trace = Trace.from_frame(edited)
    outcomes = run_analyzers(trace, load_analyzers(make_plugin_manager()).analyzers)
    failed = {o.name: o.error for o in outcomes if o.error is not None}
    assert failed == {}
