"""`replay --analyze`: every analyzer's per-batch form equals its batch form, on every scenario."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from replay_helpers import cli, record_short

from tdxtrace.analysis import AnalyzerResult
from tdxtrace.plugins import load_analyzers, make_plugin_manager
from tdxtrace.replay import check_streaming
from tdxtrace.replay.analyze import result_difference
from tdxtrace.sim.scenario import builtin_names
from tdxtrace.trace import open_trace

# Declares only `kind` but reads `dur_ns`: its streamed form sees nulls where analyze() sees
# durations, which is exactly the mistake the check exists to catch.
BAD_COLUMNS_PLUGIN = '''
import polars as pl
from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult

class BadColumns(Analyzer):
    name = "bad_columns"
    description = "declares too few columns"
    columns = ("kind",)

    def analyze(self, trace):
        total = trace.observable().select(pl.col("dur_ns").sum()).collect().item()
        return AnalyzerResult(metrics={"dur_ns": int(total or 0)})

class FeedFails(Analyzer):
    name = "feed_fails"
    description = "raises while streaming"

    def analyze(self, trace):
        return AnalyzerResult(metrics={})

    def feed(self, state, batch):
        raise RuntimeError("cannot stream")

@hookimpl
def register_analyzers():
    return [BadColumns(), FeedFails()]
'''


def _builtin_analyzers() -> list[str]:
    return [a.name for a in load_analyzers(make_plugin_manager()).analyzers]


@pytest.mark.parametrize("name", builtin_names())
def test_streamed_results_equal_batch_results_for_every_builtin_analyzer(
        tmp_path: Path, name: str) -> None:
    trace = open_trace(record_short(tmp_path, name, 5))
    analyzers = load_analyzers(make_plugin_manager()).analyzers
    # Small batches, not aligned to anything, so every analyzer sees many of them.
    checks = check_streaming(trace, analyzers, batch_rows=997)
    assert [c.name for c in checks] == sorted(_builtin_analyzers()) and checks
    assert [c for c in checks if not c.equal] == []


def test_cli_analyze_reports_each_analyzer(tmp_path: Path) -> None:
    path = record_short(tmp_path, "zero-step", 2)
    result = CliRunner().invoke(cli(), ["replay", str(path), "--analyze", "--batch-rows",
                                        "300"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("identical: ")
    assert lines[1:] == [f"streamed == batch analysis: {n}" for n in _builtin_analyzers()]


def test_a_streaming_mismatch_and_a_failing_feed_exit_1(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "bad.py").write_text(BAD_COLUMNS_PLUGIN, encoding="utf-8")
    path = record_short(tmp_path, "fault-storm", 1)
    result = CliRunner().invoke(cli(), ["replay", str(path), "--analyze", "--plugins-dir",
                                        str(plugins), "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc["identical"] is True
    by_name = {c["name"]: c for c in doc["analysis"]}
    assert by_name["bad_columns"]["equal"] is False
    assert by_name["bad_columns"]["detail"].startswith("metric dur_ns: streamed 0, batch ")
    assert by_name["feed_fails"] == {"name": "feed_fails", "equal": False,
                                     "detail": "feed() failed: RuntimeError: cannot stream"}
    assert all(by_name[n]["equal"] for n in _builtin_analyzers())


def test_analyze_needs_a_trace_not_a_capsule(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli(), ["replay", "--capsule", str(tmp_path / "c.json"),
                                        "--analyze"])
    assert result.exit_code == 2 and "--analyze needs the trace" in result.output


def test_result_difference_tolerates_rounding_only() -> None:
    table = pl.DataFrame({"leaf": [6, 7], "mean_ns": [1.0, 2.0]})
    base = AnalyzerResult({"calls": 3, "mean_ns": 1.0 / 3.0}, {"t": table}, ("note",))
    rounded = AnalyzerResult({"calls": 3, "mean_ns": (1.0 / 3.0) * (1 + 1e-15)},
                             {"t": table.with_columns(pl.col("mean_ns") * (1 + 1e-15))},
                             ("note",))
    assert result_difference(rounded, base) is None
    assert result_difference(AnalyzerResult({"calls": 4, "mean_ns": 1.0 / 3.0}, {"t": table},
                                            ("note",)), base) == \
        "metric calls: streamed 4, batch 3"
    other_rows = AnalyzerResult(base.metrics, {"t": table.reverse()}, ("note",))
    assert (result_difference(other_rows, base) or "").startswith("table t: ")
    assert result_difference(AnalyzerResult(base.metrics, {"t": table}), base) == \
        "notes differ: streamed [], batch ['note']"
