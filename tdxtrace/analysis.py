"""The analyzer contract and how analyzers run: one failing analyzer never stops the others.

Plugin authors subclass :class:`Analyzer` and return an :class:`AnalyzerResult` (data only:
polars frames and numbers, never HTML). :func:`run_analyzers` runs a set of them over one trace,
turning an exception or a malformed result into a failed :class:`AnalyzerOutcome`, and orders
the outcomes by analyzer name, never by plugin load order.
"""

from __future__ import annotations

import math
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import polars as pl

from tdxtrace.analysis_threads import DEFAULT_JOBS, run_in_threads
from tdxtrace.errors import TdxtraceError
from tdxtrace.schema import COLUMN_NAMES
from tdxtrace.trace.budget import DECODE_BUDGET_ENV as DECODE_BUDGET_ENV  # re-exported
from tdxtrace.trace.budget import decode_budget_bytes, decoded_bytes

if TYPE_CHECKING:
    from tdxtrace.trace import RunMetadata, Trace

ANALYZER_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
T = TypeVar("T")
# Columns the per-batch adapter always keeps: Trace.from_frame needs them to order rows and
# observable() needs truth to hide the ground-truth rows.
_ALWAYS_KEPT = ("seq", "ts_ns", "kind", "truth")


@dataclass(frozen=True)
class AnalyzerResult:
    """What an analyzer found in one trace.

    ``metrics``: flat, keys without the analyzer prefix, ints for counts, JSON numbers only
    (no NaN or infinity). ``tables``: name -> frame with a deterministic row order.
    ``notes``: caveats for humans (e.g. what the trace cannot show).
    """

    metrics: dict[str, int | float]
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


@dataclass
class _BatchState:
    metadata: RunMetadata
    frames: list[pl.DataFrame] = field(default_factory=list)


class Analyzer(ABC):
    """Base class of every analyzer; a plugin returns instances from ``register_analyzers``."""

    name: ClassVar[str]
    description: ClassVar[str]
    version: ClassVar[str] = "1"
    columns: ClassVar[tuple[str, ...]] = COLUMN_NAMES
    key_metrics: ClassVar[tuple[str, ...]] = ()
    # metric -> (warn_at, fail_at): value >= warn_at => warn, value >= fail_at => fail.
    thresholds: ClassVar[dict[str, tuple[float, float]]] = {}
    template: ClassVar[str | None] = None

    @abstractmethod
    def analyze(self, trace: Trace) -> AnalyzerResult:
        """Analyze a whole trace; read ``trace.observable()`` only."""

    # The per-batch form (replay --analyze). This default buffers the columns the analyzer
    # declared and runs analyze() at the end; override all three only to stream for real.
    def start(self, metadata: RunMetadata) -> Any:
        return _BatchState(metadata)

    def feed(self, state: Any, batch: pl.DataFrame) -> None:
        # Truth rows stay (seq must remain gap-free); observable() hides them from analyze().
        wanted = set(self.columns) | set(_ALWAYS_KEPT)
        state.frames.append(batch.select([c for c in batch.columns if c in wanted]))

    def finish(self, state: Any) -> AnalyzerResult:
        from tdxtrace.trace import Trace  # local: the trace package imports nothing from here

        frames = [f for f in state.frames if f.width]
        frame = pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()
        return self.analyze(Trace.from_frame(frame, state.metadata))


@dataclass(frozen=True)
class AnalyzerOutcome:
    """One analyzer's run: its result, or the one-line error that made it fail."""

    name: str
    result: AnalyzerResult | None
    error: str | None
    analyzer: Analyzer | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def error_line(err: BaseException) -> str:
    """An exception as one line: its type and its message."""
    try:
        text = str(err)
    except Exception:  # a plugin's broken __str__ must not hide which error it raised
        text = "(its message could not be shown)"
    message = " ".join(text.split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def check_result(name: str, result: object) -> AnalyzerResult:
    """``result`` if it honours the AnalyzerResult contract, else a TypeError/ValueError."""
    if not isinstance(result, AnalyzerResult):
        raise TypeError(f"{name}.analyze() returned {type(result).__name__}, "
                        "expected AnalyzerResult")
    if not isinstance(result.metrics, dict):
        raise TypeError(f"{name}: metrics must be a dict, got {type(result.metrics).__name__}")
    for key, value in result.metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"{name}: metric name {key!r} is not a string")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name}: metric {key!r} is {type(value).__name__}, "
                            "expected int or float")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}: metric {key!r} is {value} (JSON numbers only)")
    if not isinstance(result.tables, dict):
        raise TypeError(f"{name}: tables must be a dict, got {type(result.tables).__name__}")
    for key, table in result.tables.items():
        if not isinstance(key, str) or not isinstance(table, pl.DataFrame):
            raise TypeError(f"{name}: table {key!r} is {type(table).__name__}, "
                            "expected polars.DataFrame")
    # A str is a sequence too: notes="caveat" would be shown one character per note.
    if not isinstance(result.notes, tuple | list):
        raise TypeError(f"{name}: notes must be a tuple of str, got "
                        f"{type(result.notes).__name__}")
    for index, note in enumerate(result.notes):
        if not isinstance(note, str):
            raise TypeError(f"{name}: note {index} is {type(note).__name__}, expected str")
    return result


def select_analyzers(analyzers: Iterable[Analyzer], only: Sequence[str] = ()) -> list[Analyzer]:
    """The analyzers named in ``only`` (all when empty), sorted by name.

    An unknown name is a :class:`TdxtraceError` listing the available names.
    """
    by_name: dict[str, Analyzer] = {}
    for analyzer in analyzers:
        if analyzer.name in by_name:
            raise TdxtraceError(f"two analyzers are named {analyzer.name!r}: "
                                f"{type(by_name[analyzer.name]).__qualname__} and "
                                f"{type(analyzer).__qualname__}")
        by_name[analyzer.name] = analyzer
    unknown = sorted(set(only) - by_name.keys())
    if unknown:
        available = ", ".join(sorted(by_name)) or "none"
        # The variable may be why: it keeps every other plugin from loading.
        limited = os.environ.get("TDXTRACE_LOAD_PLUGINS", "").strip()
        why = f" (TDXTRACE_LOAD_PLUGINS={limited} limits which plugins load)" if limited else ""
        raise TdxtraceError(f"unknown analyzer {', '.join(map(repr, unknown))}; "
                            f"available: {available}{why}")
    wanted = set(only) if only else set(by_name)
    return [by_name[n] for n in sorted(wanted)]


class UserInterrupts:
    """The Ctrl-C and SIGTERM the user sent, counted by the CLI's signal handlers.

    ``counting`` is set while :mod:`tdxtrace.cli` runs a command with its handlers installed;
    then a KeyboardInterrupt raised while ``received`` did not change was raised by plugin code
    itself, not by a signal. Without the CLI (library use) nothing counts.
    """

    counting: ClassVar[bool] = False
    received: ClassVar[int] = 0


def guarded(call: Callable[[], T], *, in_worker: bool = False) -> tuple[T | None, str | None]:
    """Run plugin code: ``(its result, None)``, or ``(None, the one-line error)`` it failed with.

    Any BaseException plugin code raises (GeneratorExit, SystemExit, an exception group...) is
    that plugin's failure: its bug must not take the others down or print a traceback.
    KeyboardInterrupt is the exception when it may be the user's Ctrl-C (or SIGTERM, see
    tdxtrace.cli), which must stop the whole command: then it propagates. It cannot be the
    user's in a worker thread (Python delivers signals to the main thread only), nor when the
    CLI counted no signal while the call ran (see :class:`UserInterrupts`).
    """
    seen = UserInterrupts.received
    try:
        return call(), None
    except KeyboardInterrupt as err:
        if not in_worker and (not UserInterrupts.counting or UserInterrupts.received != seen):
            raise
        return None, error_line(err)
    except BaseException as err:  # any other BaseException: see above
        return None, error_line(err)


def _run_guarded(analyzer: Analyzer, trace: Trace, *, in_worker: bool = False) -> AnalyzerOutcome:
    result, error = guarded(lambda: check_result(analyzer.name, analyzer.analyze(trace)),
                            in_worker=in_worker)
    return AnalyzerOutcome(analyzer.name, result, error, analyzer)


def run_one(analyzer: Analyzer, trace: Trace, timeout: float | None = None) -> AnalyzerOutcome:
    """Run one analyzer; an exception, a malformed result or a timeout is a failed outcome.

    With ``timeout`` the analyzer runs in a daemon thread; one that has not returned after
    ``timeout`` seconds is reported as failed and left behind (a Python thread running polars
    cannot be stopped; the process exits without waiting for it). Only a run that asks for a
    timeout depends on the machine's speed. A Ctrl-C while waiting stops the command as usual.
    """
    if timeout is None:
        return _run_guarded(analyzer, trace)
    box: list[AnalyzerOutcome] = []

    def work() -> None:
        box.append(_run_guarded(analyzer, trace, in_worker=True))

    worker = threading.Thread(target=work, name=f"tdxtrace-analyzer-{analyzer.name}",
                              daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():  # only a thread still running has really run out of time
        return AnalyzerOutcome(analyzer.name, None,
                               f"timed out after {timeout:g} s (--timeout)", analyzer)
    if not box:  # _run_guarded catches everything; kept so a gap can never read as a timeout
        return AnalyzerOutcome(analyzer.name, None, "ended without a result", analyzer)
    return box[0]


def run_analyzers(trace: Trace, analyzers: Iterable[Analyzer], *, only: Sequence[str] = (),
                  timeout: float | None = None, jobs: int = DEFAULT_JOBS) -> list[AnalyzerOutcome]:
    """Run analyzers over ``trace``; outcomes ordered by analyzer name.

    When the columns they read (``Analyzer.columns``) fit in the decode budget, they are
    decoded once and every analyzer queries that copy, up to ``jobs`` of them at once in
    threads (:mod:`tdxtrace.analysis_threads`; one at a time with a ``timeout``); otherwise
    each analyzer streams the file itself, one after the other, trading time for memory (see
    :mod:`tdxtrace.trace.budget`).
    A trace opened with ``open_trace(..., keep_decoded=True)`` within the budget is already
    decoded: nothing is read again.
    """
    selected = select_analyzers(analyzers, only)
    columns = _shared_columns(selected) if len(selected) > 1 else None
    if columns is not None and \
            decoded_bytes(trace.num_events(), columns) <= decode_budget_bytes():
        trace = trace.decoded(columns)
    # Not with a timeout: it is wall-clock time, which the analyzers running at once share,
    # so whether one timed out would depend on ``jobs``.
    if jobs > 1 and len(selected) > 1 and trace.in_memory and timeout is None:
        return run_in_threads(lambda a: _run_guarded(a, trace, in_worker=_in_worker()),
                              selected, jobs,
                              lambda a: AnalyzerOutcome(a.name, None, "ended without a result", a))
    return [run_one(a, trace, timeout) for a in selected]


def _in_worker() -> bool:
    """Whether this is a thread other than the main one, where a KeyboardInterrupt is the
    analyzer's own (Python delivers signals to the main thread only). run_in_threads runs in
    the main thread when it cannot start one."""
    return threading.current_thread() is not threading.main_thread()


def _declared_columns(analyzer: Analyzer) -> tuple[str, ...]:
    declared: object = analyzer.columns
    if isinstance(declared, str) or not isinstance(declared, tuple | list) or \
            not all(isinstance(c, str) for c in declared):
        raise TypeError(f"{analyzer.name}.columns is not a tuple of str")
    return tuple(declared)


def _shared_columns(analyzers: Sequence[Analyzer]) -> list[str] | None:
    """The columns the analyzers declare, or None (no shared decode) when one's ``columns``
    cannot be read: a plugin's loader checked it, but a library caller's analyzer may not be
    checked, and its bad attribute must fail it alone (in its own run), not the others."""
    wanted = set(_ALWAYS_KEPT)
    for analyzer in analyzers:
        declared, _ = guarded(partial(_declared_columns, analyzer))
        if declared is None:
            return None
        wanted.update(declared)
    return sorted(wanted)
