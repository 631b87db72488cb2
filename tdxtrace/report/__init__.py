"""The HTML report: one self-contained, deterministic page per trace.

A report is data first (:func:`build_report` -> :class:`~tdxtrace.report.model.ReportModel`),
rendering second (:func:`~tdxtrace.report.render.render_model`). Library entry points::

    html = render_report(trace, outcomes)                  # the page as text
    path = write_report(trace, outcomes, Path("reports/run.html"), force=True)

``outcomes`` come from :func:`tdxtrace.analysis.run_analyzers`. The Analyzer instances (their
description, key metrics, thresholds and template) are taken from ``analyzers`` when given, else
from each outcome's ``analyzer``. ``thresholds`` (analyzer -> metric -> (warn_at, fail_at))
overrides the analyzers' own; see :mod:`tdxtrace.report.thresholds` for the marking rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tdxtrace.errors import ESCAPE_ERRORS
from tdxtrace.outputs import check_output, make_folder, write_output
from tdxtrace.report import model as _model
from tdxtrace.report.render import RenderedReport, render_model
from tdxtrace.report.thresholds import THRESHOLD_RULE, ThresholdTable, parse_thresholds

if TYPE_CHECKING:
    from tdxtrace.analysis import Analyzer, AnalyzerOutcome
    from tdxtrace.trace import Trace

_CANNOT_WRITE = "cannot write the report ({reason})"

__all__ = [
    "THRESHOLD_RULE",
    "RenderedReport",
    "build_report",
    "default_report_path",
    "parse_thresholds",
    "render",
    "render_report",
    "write_html",
    "write_report",
]


def _analyzer_map(outcomes: Sequence[AnalyzerOutcome],
                  analyzers: Mapping[str, Analyzer] | None) -> dict[str, Analyzer]:
    if analyzers is not None:
        return dict(analyzers)
    found: dict[str, Analyzer] = {}
    for outcome in outcomes:
        analyzer = getattr(outcome, "analyzer", None)
        if analyzer is not None:
            found[outcome.name] = analyzer
    return found


def build_report(trace: Trace, outcomes: Sequence[AnalyzerOutcome], *,
                 analyzers: Mapping[str, Analyzer] | None = None,
                 thresholds: ThresholdTable | None = None) -> _model.ReportModel:
    """The report's data (run info, one section per outcome, sorted by name)."""
    return _model.build_report(trace, outcomes, analyzers=_analyzer_map(outcomes, analyzers),
                               thresholds=thresholds)


def render(trace: Trace, outcomes: Sequence[AnalyzerOutcome], *,
           analyzers: Mapping[str, Analyzer] | None = None,
           thresholds: ThresholdTable | None = None) -> RenderedReport:
    """The page and the names of the sections that failed (analyzer or template errors)."""
    return render_model(build_report(trace, outcomes, analyzers=analyzers,
                                     thresholds=thresholds))


def render_report(trace: Trace, outcomes: Sequence[AnalyzerOutcome], *,
                  analyzers: Mapping[str, Analyzer] | None = None,
                  thresholds: ThresholdTable | None = None) -> str:
    """The report as one HTML page (same inputs => same text)."""
    return render(trace, outcomes, analyzers=analyzers, thresholds=thresholds).html


def default_report_path(trace_path: Path) -> Path:
    """``reports/<trace stem>.html``, relative to the current directory."""
    return Path("reports") / f"{trace_path.stem}.html"


def write_html(html: str, path: Path, *, force: bool = False,
               inputs: Sequence[Path | None] = ()) -> Path:
    """Write ``html`` to ``path`` through a temporary file in the same folder, then rename.

    The folder is created if missing. An existing ``path`` is an :class:`OutputError` unless
    ``force``; one that is not a regular file, or is one of ``inputs`` (the trace), is one
    even with ``force``. A crash never leaves a half-written report under the final name.
    """
    path = Path(path)
    check_output(path, force=force, inputs=inputs)
    make_folder(path, failure=_CANNOT_WRITE)
    # A trace name's bytes that are not UTF-8 reach the page as text UTF-8 cannot encode (in
    # warnings and plugins' errors too): they are written escaped (\xff), as on the terminal.
    return write_output(path, html.encode("utf-8", ESCAPE_ERRORS), force=force, inputs=inputs,
                        failure=_CANNOT_WRITE)


def write_report(trace: Trace, outcomes: Sequence[AnalyzerOutcome], path: Path, *,
                 analyzers: Mapping[str, Analyzer] | None = None,
                 thresholds: ThresholdTable | None = None, force: bool = False) -> Path:
    """Render the report and write it to ``path`` (see :func:`write_html`); returns ``path``."""
    path = Path(path)
    check_output(path, force=force, inputs=(trace.path,))  # before the work, and when writing
    html = render_report(trace, outcomes, analyzers=analyzers, thresholds=thresholds)
    return write_html(html, path, force=force, inputs=(trace.path,))
