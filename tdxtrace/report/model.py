"""The report as plain data: built from the trace metadata and the analyzers' outcomes.

Rendering (:mod:`tdxtrace.report.render`) only lays this out. Everything that decides *what*
the report says lives here: which figures are key, their marks, how each value reads, which rows
of a table are shown. All of it is bounded (rows, columns, metrics, notes, chart elements) so
the page's size does not follow the trace's, and ordered (sections and tables by name, metrics
by name) so the same inputs give the same page.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from tdxtrace._version import __version__
from tdxtrace.analysis import guarded
from tdxtrace.errors import shown
from tdxtrace.plugins.contract import AnalyzerInfo, describe_analyzer
from tdxtrace.report import thresholds as th
from tdxtrace.report.charts import Chart, charts_for
from tdxtrace.report.formatting import (
    format_cell,
    format_int,
    format_ns,
    format_number,
    is_duration_name,
    slug,
    truncate_text,
)

if TYPE_CHECKING:
    from tdxtrace.analysis import Analyzer, AnalyzerOutcome
    from tdxtrace.trace import Trace

MAX_TABLE_ROWS = 50  # rows of one table shown; the rest are counted ("N more rows not shown")
MAX_TABLE_CELLS = 600  # fewer rows for wide tables
MAX_COLUMNS = 16
MAX_TABLES = 10
MAX_METRICS = 200
MAX_NOTES = 20
MAX_NOTE_CHARS = 1000
MAX_ERROR_CHARS = 4000
MAX_SCENARIO_CHARS = 16000


@dataclass(frozen=True)
class Figure:
    """One metric as shown: ``text`` for people, ``exact`` for a tooltip, its mark and limits."""

    name: str
    text: str
    exact: str
    mark: str = th.NONE
    limits: str = ""


@dataclass(frozen=True)
class TableView:
    """The first rows of one result table, already formatted as text."""

    name: str
    anchor: str
    columns: tuple[str, ...]
    numeric: tuple[bool, ...]
    rows: tuple[tuple[str, ...], ...]
    total_rows: int
    hidden_columns: int

    @property
    def hidden_rows(self) -> int:
        return self.total_rows - len(self.rows)


@dataclass(frozen=True)
class Section:
    """One analyzer's part of the report; ``error`` is set when the analyzer failed."""

    name: str
    anchor: str
    description: str
    version: str
    mark: str
    figures: tuple[Figure, ...]  # every metric, by name
    key_figures: tuple[Figure, ...]  # key metrics, then thresholded ones: the summary row
    tables: Mapping[str, TableView] = field(default_factory=dict)
    charts: Mapping[str, Chart] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    error: str | None = None
    template: Path | None = None  # the analyzer's own template file, if it ships one
    template_name: str | None = None  # as the analyzer names it (shown in template errors)
    hidden_metrics: int = 0
    hidden_tables: int = 0
    template_error: str | None = None  # set by rendering when the analyzer's template failed

    @property
    def metrics(self) -> dict[str, Figure]:
        """Figures by metric name, for analyzer templates: ``section.metrics.busy_total``."""
        return {f.name: f for f in self.figures}


@dataclass(frozen=True)
class RunInfo:
    """What the trace says about the run that produced it."""

    trace_name: str
    producer: str
    scenario_name: str
    scenario_text: str
    seed: str
    policies: tuple[tuple[str, str], ...]
    recorded_by: str
    schema_version: int
    events: int
    observable_events: int
    truth_events: int
    digest: str
    finished: bool
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class ReportModel:
    run: RunInfo
    sections: tuple[Section, ...]
    tdxtrace_version: str = __version__
    threshold_rule: str = th.THRESHOLD_RULE

    @property
    def mark(self) -> str:
        return th.worst(s.mark for s in self.sections)

    def count(self, mark: str) -> int:
        return sum(1 for s in self.sections if s.mark == mark)


def _scenario_display(text: str) -> str:
    try:
        pretty = json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
    except (ValueError, RecursionError):  # open_trace bounds the nesting; a library's may not
        pretty = text
    return truncate_text(pretty, MAX_SCENARIO_CHARS)


def run_info(trace: Trace) -> RunInfo:
    meta = trace.metadata
    counts = (trace.events().select(pl.len().alias("n"), pl.col("truth").sum().alias("t"))
              .collect().row(0))
    events, truth = int(counts[0]), int(counts[1] or 0)
    summary = trace.summary
    return RunInfo(
        # shown: a name's bytes that are not UTF-8 could not be written into the page at all.
        trace_name=shown(trace.path.name) if trace.path is not None else "(in memory)",
        producer=meta.producer,
        scenario_name=meta.scenario_name,
        scenario_text=_scenario_display(meta.scenario_text) if meta.scenario_text else "",
        seed="—" if meta.seed is None else str(meta.seed),
        policies=tuple(sorted((str(k), str(v)) for k, v in meta.policies.items())),
        recorded_by=meta.tdxtrace_version,
        schema_version=meta.schema_version,
        events=events,
        observable_events=events - truth,
        truth_events=truth,
        digest=summary.digest if summary is not None else "",
        finished=trace.finished,
        warnings=tuple(trace.warnings),
    )


def figure(name: str, value: int | float, limits: th.Limits | None) -> Figure:
    exact = format_number(value)
    if is_duration_name(name) and not isinstance(value, bool):
        return Figure(name, format_ns(value), f"{exact} ns", th.mark_for(value, limits),
                      th.limits_text(limits))
    return Figure(name, exact, exact, th.mark_for(value, limits), th.limits_text(limits))


def table_view(name: str, frame: pl.DataFrame, anchor: str) -> TableView:
    columns = frame.columns[:MAX_COLUMNS]
    max_rows = min(MAX_TABLE_ROWS, max(5, MAX_TABLE_CELLS // max(1, len(columns))))
    shown = frame.select(columns).head(max_rows)
    rows = tuple(tuple(format_cell(col, value) for col, value in zip(columns, row, strict=True))
                 for row in shown.iter_rows())
    numeric = tuple(frame.schema[c].is_numeric() for c in columns)
    return TableView(name, anchor, tuple(columns), numeric, rows, frame.height,
                     len(frame.columns) - len(columns))


def _template_path(analyzer: Analyzer | None, info: AnalyzerInfo | None) -> Path | None:
    """The analyzer's template, relative to the folder of the module that defines its class."""
    if analyzer is None or info is None or not info.template:
        return None
    module = sys.modules.get(type(analyzer).__module__)
    module_file = getattr(module, "__file__", None)
    if module_file is None:
        return None
    return Path(module_file).resolve().parent / info.template


def _failed_section(name: str, anchor: str, info: AnalyzerInfo | None, error: str) -> Section:
    return Section(
        name=name, anchor=anchor, description=info.description if info else "",
        version=info.version if info else "", mark=th.FAIL, figures=(), key_figures=(),
        error=truncate_text(error, MAX_ERROR_CHARS))


def _result_section(name: str, anchor: str, analyzer: Analyzer | None,
                    info: AnalyzerInfo | None, result: Any,
                    overrides: th.ThresholdTable | None) -> Section:
    limits = th.effective_limits(info.thresholds if info else {}, name, overrides)
    metrics = dict(sorted(result.metrics.items()))
    figures = {k: figure(k, v, limits.get(k)) for k, v in metrics.items()}
    key_names = list(info.key_metrics if info is not None else ())
    key_names += [m for m in limits if m not in key_names]
    key_figures = tuple(figures.get(k) or Figure(k, "—", "not reported", th.NONE,
                                                 th.limits_text(limits.get(k)))
                        for k in key_names)
    tables: dict[str, pl.DataFrame] = dict(sorted(result.tables.items()))
    # Tables under the section's "a-" anchor, charts under "c-": a chart drawn from a table
    # has the table's name, and an id must name one element.
    views = {t: table_view(t, f, f"{anchor}-{slug(t)}")
             for t, f in list(tables.items())[:MAX_TABLES]}
    notes = tuple(truncate_text(str(n), MAX_NOTE_CHARS) for n in result.notes[:MAX_NOTES])
    return Section(
        name=name, anchor=anchor, description=info.description if info else "",
        version=info.version if info else "", mark=th.worst(f.mark for f in figures.values()),
        figures=tuple(figures.values())[:MAX_METRICS], key_figures=key_figures,
        tables=views, charts=charts_for(name, f"c-{slug(name)}", tables), notes=notes,
        template=_template_path(analyzer, info),
        template_name=info.template if info is not None else None,
        hidden_metrics=max(0, len(figures) - MAX_METRICS),
        hidden_tables=max(0, len(tables) - MAX_TABLES))


def build_report(trace: Trace, outcomes: Sequence[AnalyzerOutcome], *,
                 analyzers: Mapping[str, Analyzer],
                 thresholds: th.ThresholdTable | None = None) -> ReportModel:
    """The report's data: run info and one section per outcome, sorted by analyzer name.

    ``analyzers`` maps names to the Analyzer instances that produced ``outcomes`` (for their
    description, key metrics, thresholds and template); ``thresholds`` overrides their limits.
    A result the report cannot read (e.g. a table that is not a DataFrame) gives a failed
    section instead of stopping the report: plugins are other people's code.
    """
    sections: list[Section] = []
    used: set[str] = set()
    for outcome in sorted(outcomes, key=lambda o: (o.name, o.error or "")):
        anchor = f"a-{slug(outcome.name)}"
        while anchor in used:  # two names that slug alike still get distinct ids
            anchor += "-x"
        used.add(anchor)
        analyzer = analyzers.get(outcome.name)
        # Its attributes are plugin code too (properties): one that raises fails its section.
        info, attribute_error = (None, None) if analyzer is None else \
            guarded(partial(describe_analyzer, analyzer))
        if outcome.error is not None or outcome.result is None or attribute_error:
            error = outcome.error or (f"the report cannot read this analyzer's attributes: "
                                      f"{attribute_error}" if attribute_error else
                                      "the analyzer returned no result")
            sections.append(_failed_section(outcome.name, anchor, info, error))
            continue
        try:
            sections.append(_result_section(outcome.name, anchor, analyzer, info,
                                            outcome.result, thresholds))
        except (TypeError, ValueError, pl.exceptions.PolarsError) as err:
            sections.append(_failed_section(
                outcome.name, anchor, info,
                f"the report cannot read this analyzer's result: {type(err).__name__}: {err}"))
    return ReportModel(run=run_info(trace), sections=tuple(sections))


def event_summary(run: RunInfo) -> str:
    """``"1,234 events (1,200 observable, 34 truth)"``."""
    return (f"{format_int(run.events)} events ({format_int(run.observable_events)} observable, "
            f"{format_int(run.truth_events)} truth)")
