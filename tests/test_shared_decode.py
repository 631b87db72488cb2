"""Analyzers give the same results whether they share one decode or stream the file each."""

from __future__ import annotations

from pathlib import Path

import pytest
from polars.testing import assert_frame_equal

from tdxtrace.analysis import DECODE_BUDGET_ENV, run_analyzers
from tdxtrace.errors import TdxtraceError
from tdxtrace.plugins import load_analyzers, make_plugin_manager
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.trace import open_trace


def _outcomes(path: Path, budget_mb: str, monkeypatch: pytest.MonkeyPatch) -> dict:  # type: ignore[type-arg]
    monkeypatch.setenv(DECODE_BUDGET_ENV, budget_mb)
    analyzers = load_analyzers(make_plugin_manager()).analyzers
    return {o.name: o for o in run_analyzers(open_trace(path), analyzers)}


@pytest.mark.parametrize("name", ["demo", "zap-under-load"])
def test_shared_decode_and_streaming_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           name: str) -> None:
    path = tmp_path / "run.arrow"
    record(load_scenario(name, ["run.duration_us=4000"]), 5, path)
    streamed = _outcomes(path, "0", monkeypatch)  # budget 0: every analyzer streams
    shared = _outcomes(path, "4096", monkeypatch)
    assert sorted(streamed) == sorted(shared)
    for analyzer, outcome in streamed.items():
        other = shared[analyzer]
        assert outcome.error is None and other.error is None, (outcome.error, other.error)
        assert outcome.result is not None and other.result is not None
        assert outcome.result.metrics == other.result.metrics
        assert sorted(outcome.result.tables) == sorted(other.result.tables)
        for table, frame in outcome.result.tables.items():
            assert_frame_equal(frame, other.result.tables[table])


def test_a_bad_budget_is_a_one_line_error(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.arrow"
    record(load_scenario("zero-step", ["run.duration_us=500"]), 1, path)
    with pytest.raises(TdxtraceError, match=DECODE_BUDGET_ENV):
        _outcomes(path, "lots", monkeypatch)
