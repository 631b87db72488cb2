"""`tdxtrace info` and `tdxtrace schema` through click, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from tdxtrace.cli import main
from tdxtrace.events import kind_name
from tdxtrace.schema import schema_text
from tdxtrace.trace import RunMetadata, TraceWriter, open_trace
from tdxtrace.trace.writer import conform_events

JSON_KEYS = {"events", "digest", "finished", "seed", "scenario", "schema_version", "truth",
             "producer", "tdxtrace_version", "policies", "events_by_kind", "span_ns",
             "warnings"}


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_info_describes_a_finished_trace(trace_file: Path, events_frame: pl.DataFrame) -> None:
    code, out, err = _run("info", str(trace_file))
    assert code == 0 and err == ""
    summary = open_trace(trace_file).summary
    assert summary is not None
    truth = int(events_frame["truth"].sum())
    for expected in ("status          finished", "scenario        fault-storm",
                     "seed            42", "frozen_spte=local_retry",
                     f"events          1000 ({1000 - truth} observable, {truth} truth)",
                     "time span       0 .. 249750 ns (249.750 us)",
                     f"digest          {summary.digest}", "truth counters  zero_step_armed=3",
                     "observable events by kind", "truth events by kind",
                     "  t_zero_step_armed"):
        assert expected in out


def test_info_text_keeps_a_newline_in_the_path_on_its_line(tmp_path: Path,
                                                           trace_file: Path) -> None:
    odd = tmp_path / "nl\nname.arrow"
    odd.write_bytes(trace_file.read_bytes())
    code, out, _ = _run("info", str(odd))
    assert code == 0
    assert out.splitlines()[0] == f"trace           {tmp_path}/nl\\nname.arrow"
    assert out.splitlines()[1].startswith("status ")


def test_info_json_has_the_documented_keys_and_counts(trace_file: Path,
                                                       events_frame: pl.DataFrame) -> None:
    code, out, _ = _run("info", str(trace_file), "--json")
    assert code == 0
    facts = json.loads(out)
    assert facts.keys() >= JSON_KEYS
    assert facts["events"] == 1000 and facts["finished"] is True
    assert facts["seed"] == 42 and facts["scenario"] == "fault-storm"
    assert facts["schema_version"] == 1 and facts["producer"] == "emulator"
    assert facts["truth"] == {"zero_step_armed": 3}
    assert facts["span_ns"] == [0, 249750]
    assert facts["digest"] == open_trace(trace_file).summary.digest  # type: ignore[union-attr]
    by_kind = facts["events_by_kind"]
    assert list(by_kind) == sorted(by_kind)
    expected = events_frame["kind"].value_counts()
    assert by_kind == {kind_name(k): n for k, n in expected.iter_rows()}


def test_info_on_an_unfinished_trace_counts_what_was_read(
        tmp_path: Path, run_metadata: RunMetadata, events_frame: pl.DataFrame) -> None:
    path = tmp_path / "run.arrow"
    writer = TraceWriter(path, run_metadata)
    for batch in conform_events(events_frame.head(300)).to_batches(max_chunksize=100):
        writer.write_batch(batch)
    writer.close_unfinished()
    path.write_bytes(path.read_bytes()[:-40])  # and lose the footer too
    code, out, _ = _run("info", str(path), "--json")
    facts = json.loads(out)
    assert code == 0
    assert facts["finished"] is False and facts["digest"] is None and facts["truth"] == {}
    assert facts["events"] == 300 and len(facts["warnings"]) == 2
    code, out, _ = _run("info", str(path))
    assert "status          UNFINISHED" in out and "unfinished trace (no summary)" in out


@pytest.mark.parametrize("content", [None, b"", b"garbage, not arrow"])
def test_bad_input_is_one_line_on_stderr_and_exit_status_2(tmp_path: Path,
                                                          content: bytes | None) -> None:
    path = tmp_path / "run.arrow"
    if content is not None:
        path.write_bytes(content)
    code, out, err = _run("info", str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"tdxtrace: error: {path}: ")


def test_schema_prints_the_format() -> None:
    code, out, _ = _run("schema")
    assert code == 0 and out == schema_text()
    code, out, _ = _run("schema", "--json")
    described = json.loads(out)
    assert described["schema_version"] == 1
    assert [c["name"] for c in described["columns"]][:3] == ["seq", "ts_ns", "dur_ns"]
    assert {"value": 100, "name": "T_ZERO_STEP_ARMED"}.items() <= described["kinds"][23].items()


def test_schema_export_writes_the_files(tmp_path: Path) -> None:
    code, out, _ = _run("schema", "--export", str(tmp_path))
    assert code == 0
    assert (tmp_path / "trace-v1.txt").read_text() == schema_text()
    assert out.splitlines() == [f"wrote {tmp_path / 'trace-v1.txt'}",
                                f"wrote {tmp_path / 'trace-v1.arrow-schema'}"]


@pytest.mark.parametrize("command", ["info", "schema"])
def test_help_shows_an_example(command: str) -> None:
    code, out, _ = _run(command, "--help")
    assert code == 0 and "Examples:" in out and f"tdxtrace {command}" in out


def test_a_usage_error_exits_2() -> None:
    code, _, err = _run("info")
    assert code == 2 and "Missing argument 'TRACE'" in err
