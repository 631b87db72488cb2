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

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tdxtrace.errors import OutputError
from tdxtrace.report import model as _model
from tdxtrace.report.render import RenderedReport, render_model
from tdxtrace.report.thresholds import THRESHOLD_RULE, ThresholdTable, parse_thresholds

if TYPE_CHECKING:
    from tdxtrace.analysis import Analyzer, AnalyzerOutcome
    from tdxtrace.trace import Trace

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


def write_html(html: str, path: Path, *, force: bool = False) -> Path:
    """Write ``html`` to ``path`` through a temporary file in the same folder, then rename.

    The folder is created if missing. An existing ``path`` is an :class:`OutputError` unless
    ``force``; a crash never leaves a half-written report under the final name.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, expected a report file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{path}: cannot write the report (folder {parent} is not "
                                  "a folder)")
            break
    if path.exists() and not force:
        raise OutputError(f"{path}: already exists (use --force to overwrite it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial",
                                         dir=path.parent)
    except OSError as err:
        raise OutputError(f"{path}: cannot write the report ({err.strerror or err})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            out.write(html)
        os.chmod(temp_name, 0o644)  # mkstemp makes it private; a report is meant to be shared
        os.replace(temp_name, path)
    except OSError as err:
        Path(temp_name).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the report ({err.strerror or err})") from None
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def write_report(trace: Trace, outcomes: Sequence[AnalyzerOutcome], path: Path, *,
                 analyzers: Mapping[str, Analyzer] | None = None,
                 thresholds: ThresholdTable | None = None, force: bool = False) -> Path:
    """Render the report and write it to ``path`` (see :func:`write_html`); returns ``path``."""
    path = Path(path)
    if path.exists() and not force:  # checked before the work, and again when writing
        raise OutputError(f"{path}: already exists (use --force to overwrite it)")
    html = render_report(trace, outcomes, analyzers=analyzers, thresholds=thresholds)
    return write_html(html, path, force=force)
