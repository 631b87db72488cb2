"""Analyzers give the same results whether they share one decode or stream the file each."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from polars.testing import assert_frame_equal

from tdxtrace.analysis import DECODE_BUDGET_ENV, run_analyzers
from tdxtrace.errors import TdxtraceError
from tdxtrace.plugins import load_analyzers, make_plugin_manager
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.trace import Trace, open_trace


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


def test_a_trace_kept_at_open_gives_the_same_results(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.arrow"
    record(load_scenario("demo", ["run.duration_us=3000"]), 3, path)
    analyzers = load_analyzers(make_plugin_manager()).analyzers
    kept = open_trace(path, keep_decoded=True)
    assert kept._layout.kind == "decoded"  # nothing read from the file again
    from_file = {o.name: o for o in run_analyzers(open_trace(path), analyzers)}
    for outcome in run_analyzers(kept, analyzers):
        other = from_file[outcome.name]
        assert outcome.result is not None and other.result is not None, outcome.error
        assert outcome.result.metrics == other.result.metrics
        for table, frame in outcome.result.tables.items():
            assert_frame_equal(frame, other.result.tables[table])


def test_kept_events_equal_the_files_events_and_batches_still_come_from_it(
        trace_file: Path, tmp_path: Path) -> None:
    plain = open_trace(trace_file)
    kept = open_trace(trace_file, keep_decoded=True)
    assert_frame_equal(kept.events().collect(), plain.events().collect())
    assert [b.num_rows for b in kept.iter_batches()] == [100] * 10
    assert kept.summary == plain.summary and kept.warnings == plain.warnings
    # A file cut short (no footer) keeps exactly the complete batches it reads.
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(trace_file.read_bytes()[: trace_file.stat().st_size // 2])
    kept_cut, plain_cut = open_trace(cut, keep_decoded=True), open_trace(cut)
    assert kept_cut.num_events() == plain_cut.num_events() > 0
    assert kept_cut.warnings == plain_cut.warnings
    assert_frame_equal(kept_cut.events().collect(), plain_cut.events().collect())


def test_over_the_budget_nothing_is_kept(trace_file: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DECODE_BUDGET_ENV, "0")
    trace = open_trace(trace_file, keep_decoded=True)
    assert trace._layout.kind == "file"
    assert trace.events().select("seq").collect().height == 1000


def test_a_trace_that_outgrows_the_budget_while_opening_keeps_nothing(
        trace_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file cut short has no summary to say how big it is: batches are kept while they fit,
    # and all dropped when one does not (about a third of its ~600 events fit here).
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(trace_file.read_bytes()[: trace_file.stat().st_size * 2 // 3])
    monkeypatch.setattr("tdxtrace.trace.reader.decode_budget_bytes", lambda: 20_000)
    trace = open_trace(cut, keep_decoded=True)
    assert trace._layout.kind == "stream"
    assert trace.num_events() >= 500
    assert_frame_equal(trace.events().collect(), open_trace(cut).events().collect())


def test_a_trace_whose_summary_says_it_is_too_big_is_not_kept_even_for_a_while(
        trace_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tdxtrace.trace.reader as reader

    monkeypatch.setattr(reader, "decode_budget_bytes", lambda: 50_000)
    kept_sizes: list[int] = []
    original = reader.BatchChecker.__init__

    def spy(self: reader.BatchChecker, keep_bytes: int = 0) -> None:
        kept_sizes.append(keep_bytes)
        original(self, keep_bytes)

    monkeypatch.setattr(reader.BatchChecker, "__init__", spy)
    open_trace(trace_file, keep_decoded=True)
    assert kept_sizes == [0]  # 1000 events announced: no batch is held while checking


def test_trace_shared_builds_once_in_memory_and_every_time_from_the_file(
        trace_file: Path) -> None:
    built: list[int] = []

    def build(trace: object) -> int:
        built.append(1)
        return len(built)

    in_memory = open_trace(trace_file, keep_decoded=True)
    assert [in_memory.shared("k", build) for _ in range(3)] == [1, 1, 1]
    assert in_memory.shared("other", build) == 2  # one value per key
    built.clear()
    from_file = open_trace(trace_file)  # streams: keeping values could hold gigabytes
    assert [from_file.shared("k", build) for _ in range(2)] == [1, 2]


def test_a_shared_value_may_be_built_from_another(trace_file: Path) -> None:
    # busy_retry's exit segments are built from the shared VP.ENTER pairs: a build asking for
    # another key must not wait on the lock its own caller holds. Run in a thread, so that a
    # regression fails here instead of hanging the suite.
    trace = open_trace(trace_file, keep_decoded=True)

    def rows(of: Trace) -> int:
        return of.num_events()

    got: list[int] = []
    worker = threading.Thread(target=lambda: got.append(
        trace.shared("twice", lambda of: 2 * of.shared("rows", rows))), daemon=True)
    worker.start()
    worker.join(60)
    assert got == [2000], "Trace.shared deadlocked on a nested build"
    assert trace.shared("rows", rows) == 1000
