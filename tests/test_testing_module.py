"""tdxtrace.testing: what plugin authors use to test their analyzers."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import polars as pl
import pytest

from tdxtrace.analysis import Analyzer, AnalyzerResult
from tdxtrace.codes import Leaf, Status
from tdxtrace.errors import TdxtraceError
from tdxtrace.events import Flow, Kind
from tdxtrace.schema import COLUMN_NAMES
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace.trace import RunMetadata, Trace


class CountRows(Analyzer):
    name: ClassVar[str] = "count_rows"
    description: ClassVar[str] = "rows"

    def analyze(self, trace: Trace) -> AnalyzerResult:
        return AnalyzerResult({"rows": trace.observable().collect().height})


class Broken(Analyzer):
    name: ClassVar[str] = "broken"
    description: ClassVar[str] = "raises"

    def analyze(self, trace: Trace) -> AnalyzerResult:
        raise ZeroDivisionError("division by zero")


class WrongType(Analyzer):
    name: ClassVar[str] = "wrong_type"
    description: ClassVar[str] = "returns a dict"

    def analyze(self, trace: Trace) -> AnalyzerResult:
        return {"rows": 1}  # type: ignore[return-value]


def test_make_trace_accepts_enum_members_and_fills_defaults() -> None:
    trace = make_trace([
        {"kind": Kind.SEAMCALL, "ts_ns": 5, "leaf": Leaf.TDH_MEM_TRACK,
         "status": Status.OPERAND_BUSY, "flow": Flow.ZAP},
        {"kind": 3, "ts_ns": 9, "truth": False},
    ])
    frame = trace.events().collect()
    assert frame.columns == list(COLUMN_NAMES)
    assert frame.select("seq", "ts_ns", "kind", "leaf", "status", "flow", "dur_ns").rows() == [
        (0, 5, 1, 38, int(Status.OPERAND_BUSY), 3, 0), (1, 9, 3, None, None, 0, 0)]
    assert frame.schema["status"] == pl.UInt64


def test_make_trace_keeps_given_seq_and_metadata() -> None:
    meta = RunMetadata(scenario_name="mine", seed=7)
    trace = make_trace([{"seq": 0, "kind": 1, "ts_ns": 0}, {"seq": 1, "kind": 1, "ts_ns": 3}],
                       meta)
    assert trace.metadata == meta
    assert trace.events().collect()["seq"].to_list() == [0, 1]


def test_make_trace_of_no_rows_is_an_empty_trace_with_every_column() -> None:
    trace = make_trace([])
    assert trace.num_events() == 0
    assert trace.observable().collect().columns == list(COLUMN_NAMES)


@pytest.mark.parametrize(("rows", "message"), [
    ([{"kind": 1, "ts_ns": 0, "lead": 6}], "make_trace: unknown column(s) lead"),
    ([{"kind": 1}], "make_trace: row 0 has no ts_ns"),
    ([{"ts_ns": 0}], "make_trace: row 0 has no kind"),
    ([{"seq": 0, "kind": 1, "ts_ns": 0}, {"kind": 1, "ts_ns": 1}],
     "make_trace: give seq in every row or in none"),
])
def test_make_trace_rejects_bad_rows_naming_the_problem(rows: list[dict[str, int]],
                                                        message: str) -> None:
    with pytest.raises(TdxtraceError) as err:
        make_trace(rows)
    assert str(err.value) == message


def test_run_analyzer_reads_observable_rows_only() -> None:
    trace = make_trace([{"kind": 1, "ts_ns": 0},
                        {"kind": Kind.T_LOCK_HOLDER, "ts_ns": 0, "truth": True}])
    assert run_analyzer(CountRows(), trace).metrics == {"rows": 1}


def test_run_analyzer_lets_the_analyzers_exception_through() -> None:
    with pytest.raises(ZeroDivisionError):
        run_analyzer(Broken(), make_trace([]))


def test_run_analyzer_rejects_a_result_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"wrong_type.analyze\(\) returned dict"):
        run_analyzer(WrongType(), make_trace([]))


def test_run_analyzer_by_name_finds_plugins_dir_analyzers(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.py").write_text(
        "from tdxtrace import hookimpl\n"
        "from tdxtrace.analysis import Analyzer, AnalyzerResult\n"
        "class Mine(Analyzer):\n"
        "    name = 'mine'\n"
        "    description = 'counts events'\n"
        "    def analyze(self, trace):\n"
        "        return AnalyzerResult({'events': trace.num_events()})\n"
        "@hookimpl\n"
        "def register_analyzers():\n"
        "    return [Mine()]\n")
    monkeypatch.setenv("TDXTRACE_LOAD_PLUGINS", "mine")
    result = run_analyzer("mine", make_trace([{"kind": 1, "ts_ns": 0}]), plugins_dirs=[tmp_path])
    assert result.metrics == {"events": 1}
    with pytest.raises(TdxtraceError, match=r"^unknown analyzer 'nope'; available: mine$"):
        run_analyzer("nope", make_trace([]), plugins_dirs=[tmp_path])
