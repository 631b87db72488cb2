"""Analyzers over a trace held in memory run two at a time (``--jobs``), with the same results.

Two analyzers that each wait for the other at a barrier finish only when they really run at
once: that is how these tests tell concurrency from a sequence, with no timing involved.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import invoke

from tdxtrace.analysis import Analyzer, AnalyzerResult, run_analyzers
from tdxtrace.analysis_threads import run_in_threads
from tdxtrace.testing import make_trace
from tdxtrace.trace import Trace, open_trace

ROWS = [{"kind": 1, "ts_ns": i * 10, "leaf": 9, "status": 0} for i in range(10)]


class Meets(Analyzer):
    """Waits at ``barrier`` for the other analyzer: it can only pass if both run at once."""

    description = "waits for its partner"

    def __init__(self, name: str, barrier: threading.Barrier) -> None:
        self.name = name  # type: ignore[misc]
        self.barrier = barrier

    def analyze(self, trace: Trace) -> AnalyzerResult:
        self.barrier.wait()
        return AnalyzerResult(metrics={"met": 1})


class Fixed(Analyzer):
    description = "returns at once, or after a pause, or raises"

    def __init__(self, name: str, pause_s: float = 0.0, raises: bool = False) -> None:
        self.name = name  # type: ignore[misc]
        self.pause_s = pause_s
        self.raises = raises

    def analyze(self, trace: Trace) -> AnalyzerResult:
        time.sleep(self.pause_s)
        if self.raises:
            raise KeyboardInterrupt("raised by the analyzer")
        return AnalyzerResult(metrics={"rows": trace.num_events()})


def _pair(timeout_s: float) -> list[Analyzer]:
    barrier = threading.Barrier(2, timeout=timeout_s)
    return [Meets("left", barrier), Meets("right", barrier)]


def test_two_analyzers_run_at_once_over_a_trace_in_memory() -> None:
    outcomes = run_analyzers(make_trace(ROWS), _pair(timeout_s=30))
    assert [(o.name, o.error) for o in outcomes] == [("left", None), ("right", None)]


def test_jobs_1_runs_them_one_after_the_other() -> None:
    outcomes = run_analyzers(make_trace(ROWS), _pair(timeout_s=0.2), jobs=1)
    assert [o.name for o in outcomes] == ["left", "right"]
    assert all(o.error is not None and "BrokenBarrierError" in o.error for o in outcomes)


def test_with_a_timeout_they_run_one_after_the_other() -> None:
    # A timeout counts wall-clock time, which analyzers running at once would share: whether
    # one timed out would depend on --jobs. With one, --jobs is not used.
    outcomes = run_analyzers(make_trace(ROWS), _pair(timeout_s=0.2), timeout=30)
    assert all(o.error is not None and "BrokenBarrierError" in o.error for o in outcomes)


@pytest.mark.usefixtures("sigint_delivered")
def test_after_a_ctrl_c_no_other_analyzer_starts() -> None:
    # The first item sends Ctrl-C and waits until the caller has seen it; the worker then
    # finds nothing left to start.
    seen = threading.Event()
    ran: list[str] = []

    def run(item: str) -> str:
        ran.append(item)
        if item == "first":
            os.kill(os.getpid(), signal.SIGINT)  # to the main thread, waiting in join()
            seen.wait(30)
        return item

    with pytest.raises(KeyboardInterrupt):
        run_in_threads(run, ["first", "second", "third"], 1, lambda item: "missing")
    seen.set()
    for thread in threading.enumerate():
        if thread.name.startswith("tdxtrace-analyzers-"):
            thread.join(30)
    assert ran == ["first"]


def test_without_threads_a_keyboard_interrupt_still_stops_the_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # When no thread can start, the analyzers run in the main thread, where a
    # KeyboardInterrupt may be the user's Ctrl-C: it stops the run, as one at a time does.
    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    ran: list[str] = []

    class Records(Fixed):
        def analyze(self, trace: Trace) -> AnalyzerResult:
            ran.append(self.name)
            return super().analyze(trace)

    with pytest.raises(KeyboardInterrupt):
        run_analyzers(make_trace(ROWS), [Records("a", raises=True), Records("b")])
    assert ran == ["a"]


def test_a_trace_streamed_from_its_file_is_analyzed_one_at_a_time(
        trace_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Over the decode budget each analyzer streams the file: the low-memory path keeps one
    # working set at a time.
    monkeypatch.setenv("TDXTRACE_DECODE_BUDGET_MB", "0")
    outcomes = run_analyzers(open_trace(trace_file), _pair(timeout_s=0.2))
    assert all(o.error is not None and "BrokenBarrierError" in o.error for o in outcomes)


def test_outcomes_keep_name_order_whichever_finishes_first() -> None:
    analyzers = [Fixed("b_fast"), Fixed("a_slow", pause_s=0.3), Fixed("c_fast")]
    outcomes = run_analyzers(make_trace(ROWS), analyzers, jobs=3)
    assert [o.name for o in outcomes] == ["a_slow", "b_fast", "c_fast"]
    assert all(o.result is not None and o.result.metrics == {"rows": 10} for o in outcomes)


def test_a_keyboard_interrupt_raised_in_a_thread_fails_that_analyzer_only() -> None:
    # No signal goes to a thread: the KeyboardInterrupt is the analyzer's own.
    outcomes = run_analyzers(make_trace(ROWS), [Fixed("raises", raises=True), Fixed("fine")])
    assert [(o.name, o.error) for o in outcomes] == [
        ("fine", None), ("raises", "KeyboardInterrupt: raised by the analyzer")]


def test_the_command_prints_the_same_figures_with_any_jobs(tmp_path: Path) -> None:
    trace = tmp_path / "run.arrow"
    recorded = invoke("record", "demo", "--set", "run.duration_us=8000", "-o", trace)
    assert recorded.exit_code == 0, recorded.output
    printed = [invoke("analyze", trace, "--format", "json", "--jobs", jobs)
               for jobs in ("1", "2", "6")]
    assert all(p.exit_code == 0 for p in printed), [p.output for p in printed]
    assert printed[0].stdout == printed[1].stdout == printed[2].stdout
    assert len(json.loads(printed[0].stdout)) == 6


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_jobs_below_one_is_refused_in_one_line(trace_file: Path, command: str) -> None:
    done = invoke(command, trace_file, "--jobs", "0")
    assert done.exit_code == 2
    assert done.stderr.strip().splitlines() == [
        f"tdxtrace: error: --jobs: 0 is not in the range 1<=x<=64 (see tdxtrace {command} "
        "--help)"]
