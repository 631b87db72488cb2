"""Helpers for plugin authors' tests: build a tiny trace in code, run one analyzer on it.

Example::

    from tdxtrace.events import Kind
    from tdxtrace.testing import make_trace, run_analyzer

    trace = make_trace([
        {"kind": Kind.SEAMCALL, "ts_ns": 0, "dur_ns": 900, "leaf": 6, "status": 0},
    ])
    result = run_analyzer("seamcall_latency", trace)
    assert result.metrics["seamcalls"] == 1

Unlike ``tdxtrace analyze``, :func:`run_analyzer` lets the analyzer's exception propagate, so
a failing test shows the analyzer's own traceback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from tdxtrace.analysis import Analyzer, AnalyzerResult, check_result
from tdxtrace.errors import TdxtraceError
from tdxtrace.plugins import load_analyzers, make_plugin_manager
from tdxtrace.schema import FIELDS
from tdxtrace.trace import RunMetadata, Trace

_FIELD_TYPES = {f.name: f.type for f in FIELDS}
# Values for the non-nullable columns a row may leave out (kind and ts_ns are required).
_DEFAULTS: dict[str, Any] = {"dur_ns": 0, "truth": False, "flow": 0, "sub": 0}


def _plain(value: Any) -> Any:
    # Enum members (Kind.SEAMCALL, Flow.ZAP, Leaf.TDH_MEM_TRACK, ...) become their numbers.
    return int(value) if isinstance(value, IntEnum) else value


def make_trace(rows: Sequence[Mapping[str, Any]], metadata: RunMetadata | None = None) -> Trace:
    """A trace made of ``rows`` (dicts keyed by trace column names).

    Kinds, flows, leaves, subs and statuses may be given as ints or enum members. ``kind`` and
    ``ts_ns`` are required in every row; ``seq`` is assigned 0, 1, ... in list order unless
    every row gives one. Values left out are null, except dur_ns 0, truth False, flow 0, sub 0.
    """
    given = {name for row in rows for name in row}
    unknown = sorted(given - _FIELD_TYPES.keys())
    if unknown:
        raise TdxtraceError(f"make_trace: unknown column(s) {', '.join(unknown)}")
    # Schema order, so the frame looks like one read from a file.
    present = [name for name in _FIELD_TYPES if name in given] if rows else list(_FIELD_TYPES)
    for index, row in enumerate(rows):
        for required in ("kind", "ts_ns"):
            if row.get(required) is None:
                raise TdxtraceError(f"make_trace: row {index} has no {required}")
    with_seq = sum("seq" in row for row in rows)
    if with_seq not in (0, len(rows)):
        raise TdxtraceError("make_trace: give seq in every row or in none")
    defaults = {k: v for k, v in _DEFAULTS.items() if k in present}
    records = [{**defaults, **{k: _plain(v) for k, v in row.items()}} for row in rows]
    if rows and not with_seq:
        present = ["seq", *present]
        for seq, record in enumerate(records):
            record["seq"] = seq
    schema = pa.schema([pa.field(n, _FIELD_TYPES[n]) for n in present])
    table = pa.Table.from_pylist(records, schema=schema)
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return Trace.from_frame(frame, metadata)


def run_analyzer(analyzer: Analyzer | str, trace: Trace, *,
                 plugins_dirs: Sequence[Path] = ()) -> AnalyzerResult:
    """Run one analyzer on ``trace`` and return its checked result; its exceptions propagate.

    ``analyzer`` is an instance, or a name looked up among the installed plugins (and those in
    ``plugins_dirs``), exactly as ``tdxtrace analyze`` would find it.
    """
    if isinstance(analyzer, str):
        pm = make_plugin_manager(plugins_dirs=plugins_dirs)
        loaded = load_analyzers(pm)
        found = [a for a in loaded.analyzers if a.name == analyzer]
        if not found:
            available = ", ".join(a.name for a in loaded.analyzers) or "none"
            failed = "".join(f"; plugin {f.name!r} failed: {f.error}" for f in loaded.failed)
            raise TdxtraceError(f"unknown analyzer {analyzer!r}; available: {available}{failed}")
        analyzer = found[0]
    return check_result(analyzer.name, analyzer.analyze(trace))
