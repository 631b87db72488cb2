"""``replay --analyze``: the analyzers' per-batch form must agree with their batch form.

The recorded events are streamed in ``seq`` order through each analyzer's
``start``/``feed``/``finish`` (as replay would run them while events arrive) and the result is
compared with ``analyze`` on the whole trace. Metrics and table cells that are floats may
differ by rounding only (polars may sum chunked columns in another order); everything else must
be exactly equal: metric names, integers, table names, columns, dtypes, row order, notes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import polars as pl
import pyarrow as pa
from polars.testing import assert_frame_equal

from tdxtrace.analysis import Analyzer, AnalyzerResult, check_result, guarded, run_one
from tdxtrace.trace import Trace

FLOAT_REL_TOL = 1e-9  # rounding, not a different answer
FLOAT_ABS_TOL = 1e-9


@dataclass(frozen=True)
class AnalysisCheck:
    """One analyzer: do its streamed and batch results agree? ``detail`` says how not."""

    name: str
    equal: bool
    detail: str = ""


def _slices(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pl.DataFrame]:
    for batch in batches:
        for start in range(0, batch.num_rows, rows):
            frame = pl.from_arrow(batch.slice(start, rows))
            assert isinstance(frame, pl.DataFrame)
            yield frame


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL)
    return bool(a == b) and type(a) is type(b)


def result_difference(streamed: AnalyzerResult, batch: AnalyzerResult) -> str | None:
    """What differs between two results of one analyzer, or None when they agree."""
    if list(streamed.metrics) != list(batch.metrics):
        return (f"metric names differ: streamed {sorted(streamed.metrics)}, batch "
                f"{sorted(batch.metrics)}")
    for key, value in batch.metrics.items():
        if not _close(streamed.metrics[key], value):
            return f"metric {key}: streamed {streamed.metrics[key]!r}, batch {value!r}"
    if list(streamed.tables) != list(batch.tables):
        return (f"table names differ: streamed {list(streamed.tables)}, batch "
                f"{list(batch.tables)}")
    for name, frame in batch.tables.items():
        try:
            assert_frame_equal(streamed.tables[name], frame, check_exact=False,
                               rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL)
        except AssertionError as err:
            return f"table {name}: {' '.join(str(err).split())}"
    if streamed.notes != batch.notes:
        return f"notes differ: streamed {list(streamed.notes)}, batch {list(batch.notes)}"
    return None


def check_streaming(trace: Trace, analyzers: Sequence[Analyzer], *,
                    batch_rows: int = 65536) -> list[AnalysisCheck]:
    """Stream ``trace`` through each analyzer's per-batch form; compare with ``analyze``.

    One pass over the file feeds every analyzer. An analyzer that fails in either form (any
    exception, ``sys.exit()``, a malformed result) is reported as not equal, with its error;
    the others carry on. Its calls run as ``analyze`` and ``report`` run them
    (:func:`tdxtrace.analysis.guarded`): only the user's Ctrl-C stops the command. Ordered by
    name.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    ordered = sorted(analyzers, key=lambda a: a.name)
    states: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for analyzer in ordered:
        state, error = guarded(partial(analyzer.start, trace.metadata))
        if error is not None:
            errors[analyzer.name] = f"start() failed: {error}"
        states[analyzer.name] = state
    for frame in _slices(trace.iter_batches(), batch_rows):
        for analyzer in ordered:
            if analyzer.name in errors:
                continue
            _, error = guarded(partial(analyzer.feed, states[analyzer.name], frame))
            if error is not None:
                errors[analyzer.name] = f"feed() failed: {error}"
    return [_check_one(analyzer, trace, states.get(analyzer.name), errors.get(analyzer.name))
            for analyzer in ordered]


def _check_one(analyzer: Analyzer, trace: Trace, state: Any, error: str | None
               ) -> AnalysisCheck:
    if error is not None:
        return AnalysisCheck(analyzer.name, False, error)
    streamed, error = guarded(lambda: check_result(analyzer.name, analyzer.finish(state)))
    if streamed is None:
        return AnalysisCheck(analyzer.name, False, f"finish() failed: {error}")
    outcome = run_one(analyzer, trace)
    if outcome.result is None:
        return AnalysisCheck(analyzer.name, False, f"analyze() failed: {outcome.error}")
    difference = result_difference(streamed, outcome.result)
    return AnalysisCheck(analyzer.name, difference is None, difference or "")
