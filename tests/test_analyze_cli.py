"""``tdxtrace analyze`` and ``tdxtrace plugins`` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from tdxtrace.cli import main
from tdxtrace.codes import Leaf, OperandId, Status
from tdxtrace.commands.analyze import analyze_command
from tdxtrace.commands.plugins_cmd import plugins_command
from tdxtrace.events import Flow, Kind
from tdxtrace.testing import make_trace
from tdxtrace.trace import TraceWriter, write_events

# The real group class (one-line errors, exit codes), with just the commands under test.
CLI: click.Group = type(main)(name="tdxtrace", commands=[analyze_command, plugins_command])
BUSY_SEPT = Status.OPERAND_BUSY | OperandId.SEPT_TREE

GOOD = '''
import polars as pl
from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult

class Rows(Analyzer):
    name = "rows"
    description = "one row per event"
    def analyze(self, trace):
        frame = trace.observable().select("seq", "status").collect()
        return AnalyzerResult({"events": frame.height, "half": 0.5}, {"events": frame})

@hookimpl
def register_analyzers():
    return [Rows()]
'''
BOOM = '''
from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer

class Boom(Analyzer):
    name = "boom"
    description = "always fails"
    def analyze(self, trace):
        return 1 / 0

@hookimpl
def register_analyzers():
    return [Boom()]
'''


def rows() -> list[dict[str, Any]]:
    calls = [{"kind": Kind.SEAMCALL, "ts_ns": i * 100, "dur_ns": 50, "corr": 1, "td": 0,
              "vcpu": 0, "lp": 0, "gpa": 0x1000, "flow": Flow.FAULT,
              "leaf": Leaf.TDH_MEM_PAGE_AUG, "status": BUSY_SEPT} for i in range(24)]
    calls.append({**calls[0], "ts_ns": 2400, "status": 0})
    return calls


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.arrow"
    trace = make_trace(rows())
    write_events(path, trace.events().collect(), trace.metadata)
    return path


@pytest.fixture
def plugins_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "good.py").write_text(GOOD)
    (folder / "boom.py").write_text(BOOM)
    return folder


def invoke(*args: str | Path, load: str | None = None) -> Result:
    env = {} if load is None else {"TDXTRACE_LOAD_PLUGINS": load}
    return CliRunner().invoke(CLI, [str(a) for a in args], env=env)


def test_json_has_one_key_per_analyzer_with_metrics_tables_and_notes(trace_file: Path) -> None:
    result = invoke("analyze", trace_file, "--format", "json",
                    load="seamcall_latency,busy_retry")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert list(doc) == ["busy_retry", "seamcall_latency"]
    for section in doc.values():
        assert list(section) == ["metrics", "tables", "notes"]
    busy = doc["busy_retry"]
    assert {k: busy["metrics"][k] for k in ("busy_total", "chains", "max_chain")} == {
        "busy_total": 24, "chains": 1, "max_chain": 25}
    assert busy["tables"]["chain_length_hist"] == [{"length": 25, "chains": 1}]
    assert busy["tables"]["livelock"][0]["outcome"] == "success"
    assert doc["seamcall_latency"]["metrics"]["seamcalls"] == 25
    [aug] = doc["seamcall_latency"]["tables"]["by_leaf"]
    assert list(aug)[:3] == ["leaf", "leaf_id", "count"]  # column order is kept
    assert (aug["leaf_id"], aug["busy_pct"]) == (6, 96.0)


def test_uint64_statuses_stay_integers_in_json(trace_file: Path, plugins_dir: Path) -> None:
    result = invoke("analyze", trace_file, "--plugins-dir", plugins_dir, "-a", "rows",
                    "--format", "json", load="good")
    assert result.exit_code == 0, result.output
    events = json.loads(result.stdout)["rows"]["tables"]["events"]
    assert events[0] == {"seq": 0, "status": int(BUSY_SEPT)}


def test_table_format_truncates_long_tables(trace_file: Path, plugins_dir: Path) -> None:
    result = invoke("analyze", trace_file, "--plugins-dir", plugins_dir, load="good")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "== rows: one row per event"
    assert "  half    0.50" in lines
    assert "  events (25 rows)" in lines
    status = f"{int(BUSY_SEPT):#x}"  # status columns print in hex, as the kernel does
    assert f"    {0:>3}  {status:>{len('status')}}" in lines
    assert "    ... 5 more" in lines


def test_a_failing_analyzer_fails_alone_and_the_exit_status_says_so(
        trace_file: Path, plugins_dir: Path) -> None:
    result = invoke("analyze", trace_file, "--plugins-dir", plugins_dir, "--format", "json",
                    load="good,boom")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["boom"] == {"error": "ZeroDivisionError: division by zero"}
    assert doc["rows"]["metrics"]["events"] == 25
    assert result.stderr == "tdxtrace: analyzer boom failed: ZeroDivisionError: division by zero\n"
    text = invoke("analyze", trace_file, "--plugins-dir", plugins_dir, load="good,boom")
    assert "FAILED: ZeroDivisionError: division by zero" in text.stdout.splitlines()


def test_a_plugin_that_cannot_be_imported_is_reported_and_the_rest_runs(
        trace_file: Path, plugins_dir: Path) -> None:
    (plugins_dir / "broken.py").write_text("def register_analyzers(:\n")
    result = invoke("analyze", trace_file, "--plugins-dir", plugins_dir, "--format", "json",
                    load="good,broken")
    assert result.exit_code == 1
    assert list(json.loads(result.stdout)) == ["rows"]
    assert result.stderr.startswith(
        f"tdxtrace: plugin broken failed ({plugins_dir / 'broken.py'}): SyntaxError: ")


@pytest.mark.parametrize(("args", "load", "message"), [
    (["-a", "nope"], "good", "unknown analyzer 'nope'; available: rows "
                             "(TDXTRACE_LOAD_PLUGINS=good limits which plugins load)"),
    ([], "nope", "TDXTRACE_LOAD_PLUGINS names unknown plugin(s) nope; available: "),
])
def test_bad_names_are_one_line_and_exit_2(trace_file: Path, plugins_dir: Path,
                                           args: list[str], load: str, message: str) -> None:
    result = invoke("analyze", trace_file, "--plugins-dir", plugins_dir, *args, load=load)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"tdxtrace: error: {message}")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_a_misspelled_hook_stops_analyze_with_one_line(trace_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "typo"
    folder.mkdir()
    (folder / "typo.py").write_text(
        "from tdxtrace import hookimpl\n@hookimpl\ndef register_analyzer():\n    return []\n")
    result = invoke("analyze", trace_file, "--plugins-dir", folder, load="typo")
    assert result.exit_code == 2
    assert result.stderr == (f"tdxtrace: error: plugin 'typo' ({folder / 'typo.py'}) implements "
                             "unknown hook 'register_analyzer'; known hooks: "
                             "register_analyzers\n")


def test_a_file_that_is_not_a_trace_is_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello")
    result = invoke("analyze", bogus)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"tdxtrace: error: {bogus}") and result.stderr.count("\n") == 1


def test_an_unfinished_trace_is_analyzed_with_a_warning(tmp_path: Path,
                                                        plugins_dir: Path) -> None:
    path = tmp_path / "cut.arrow"
    trace = make_trace(rows())
    writer = TraceWriter(path, trace.metadata)
    for batch in trace.iter_batches():
        writer.write_batch(batch)
    writer.close_unfinished()
    result = invoke("analyze", path, "--plugins-dir", plugins_dir, "--format", "json",
                    load="good")
    assert result.exit_code == 0
    assert result.stderr.startswith(f"tdxtrace: warning: {path}: unfinished trace")
    assert json.loads(result.stdout)["rows"]["metrics"]["events"] == 25


def test_plugins_lists_origin_hooks_and_analyzers(plugins_dir: Path) -> None:
    result = invoke("plugins", "--plugins-dir", plugins_dir, load="good,busy_retry")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("busy_retry  ") and "entry point: tdxtrace_plugins.busy_retry" in \
        lines[0]
    assert lines[3:] == [f"good  -  plugins dir: {plugins_dir / 'good.py'}",
                         "    hooks: register_analyzers", "    analyzers: rows"]


def test_plugins_json_lists_failed_plugins_and_exits_1(plugins_dir: Path) -> None:
    (plugins_dir / "broken.py").write_text("import no_such_module_here\n")
    result = invoke("plugins", "--plugins-dir", plugins_dir, "--json", load="good,broken")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["plugins"] == [{
        "name": "good", "version": "-", "source": "plugins dir",
        "where": str(plugins_dir / "good.py"), "hooks": ["register_analyzers"],
        "analyzers": ["rows"]}]
    assert doc["failed"] == [{
        "name": "broken", "where": str(plugins_dir / "broken.py"),
        "error": "ModuleNotFoundError: No module named 'no_such_module_here'"}]


def test_no_analyzer_loaded_is_an_error_not_an_empty_success(trace_file: Path,
                                                             tmp_path: Path) -> None:
    # A plugin that registers no analyzer, and the only one allowed to load: nothing would
    # run, and an empty output with exit 0 would read as "no findings" to a script.
    folder = tmp_path / "quiet"
    folder.mkdir()
    (folder / "quiet.py").write_text("from tdxtrace import hookimpl\n\n@hookimpl\n"
                                     "def register_analyzers():\n    return []\n")
    result = invoke("analyze", trace_file, "--plugins-dir", folder, load="quiet")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("tdxtrace: error: no analyzers loaded")
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_strict_refuses_a_cut_trace_that_would_otherwise_analyze_to_zeros(
        trace_file: Path, tmp_path: Path) -> None:
    # A trace cut inside its only batch reads as 0 events: its figures would all be zero,
    # which a CI check would take for a clean run, so it is refused even without --strict.
    cut = tmp_path / "cut.arrow"
    data = trace_file.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    lenient = invoke("analyze", cut, "--format", "json", load="busy_retry")
    assert lenient.exit_code == 2 and lenient.stdout == ""
    assert lenient.stderr.splitlines()[-1] == (
        f"tdxtrace: error: {cut}: nothing to analyze: the trace is unfinished and holds no "
        "complete batch of events")
    strict = invoke("analyze", cut, "--strict", "--format", "json", load="busy_retry")
    assert strict.exit_code == 2 and strict.stdout == ""
    assert strict.stderr.splitlines()[-1] == (
        f"tdxtrace: error: {cut}: --strict: the trace has 2 warning(s), above; nothing was "
        "analyzed")
    whole = invoke("analyze", trace_file, "--strict", "--format", "json", load="busy_retry")
    assert whole.exit_code == 0 and json.loads(whole.stdout)["busy_retry"]["metrics"][
        "busy_total"] == 24

