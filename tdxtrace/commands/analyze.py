"""``tdxtrace analyze``: run the analyzers over a trace and print their figures."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import click
import polars as pl

from tdxtrace.analysis import Analyzer, AnalyzerOutcome, guarded, run_analyzers
from tdxtrace.commands.messages import failed_plugins, say
from tdxtrace.commands.options import (
    jobs_option,
    open_for_analysis,
    path_param,
    strict_option,
    timeout_option,
)
from tdxtrace.commands.plugins_cmd import plugins_dir_option
from tdxtrace.plugins import (
    describe_analyzer,
    load_analyzers,
    make_plugin_manager,
    require_analyzers,
)
from tdxtrace.report.formatting import is_hex_name

TABLE_ROWS = 20  # rows shown per table in the text format


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a table cell may legitimately be undefined
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def outcomes_json(outcomes: Sequence[AnalyzerOutcome]) -> dict[str, Any]:
    """The ``--format json`` document (see :func:`analyze_command`)."""
    doc: dict[str, Any] = {}
    for outcome in sorted(outcomes, key=lambda o: o.name):
        if outcome.result is None:
            doc[outcome.name] = {"error": outcome.error}
            continue
        result = outcome.result
        doc[outcome.name] = {
            "metrics": dict(result.metrics),
            "tables": {name: _json_value(frame.to_dicts())
                       for name, frame in result.tables.items()},
            "notes": list(result.notes),
        }
    return doc


def _cell(value: Any, hex_column: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    if hex_column and isinstance(value, int):
        return f"{value:#x}"  # GPAs, RIPs and statuses read as the kernel prints them
    return str(value)


def render_table(frame: pl.DataFrame, limit: int = TABLE_ROWS) -> list[str]:
    """A frame as aligned text lines (numbers right-aligned), at most ``limit`` rows."""
    shown = frame.head(limit)
    hexes = [is_hex_name(name) for name in frame.columns]
    cells = [[_cell(v, h) for v, h in zip(row, hexes, strict=True)]
             for row in shown.iter_rows()]
    numeric = [dtype.is_numeric() for dtype in frame.dtypes]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(frame.columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w)
                 for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    lines = [line(frame.columns)] + [line(r) for r in cells]
    if frame.height > limit:
        lines.append(f"... {frame.height - limit} more")
    return lines


def _description(analyzer: Analyzer | None) -> str:
    # Checked when its plugin loaded; read guarded all the same (a property runs plugin code
    # again), as a header without its description beats no results at all.
    info, _ = guarded(partial(describe_analyzer, analyzer)) if analyzer else (None, None)
    return info.description if info is not None else ""


def outcomes_text(outcomes: Sequence[AnalyzerOutcome]) -> str:
    """The ``--format table`` rendering: per analyzer, metrics, then tables, then notes."""
    out: list[str] = []
    for outcome in sorted(outcomes, key=lambda o: o.name):
        description = _description(outcome.analyzer)
        out.append(f"== {outcome.name}" + (f": {description}" if description else ""))
        if outcome.result is None:
            out += [f"FAILED: {outcome.error}", ""]
            continue
        result = outcome.result
        width = max((len(k) for k in result.metrics), default=0)
        out += [f"  {key.ljust(width)}  {_cell(value)}" for key, value in result.metrics.items()]
        for name, frame in result.tables.items():
            rows = "1 row" if frame.height == 1 else f"{frame.height} rows"
            out += ["", f"  {name} ({rows})"]
            out += [f"    {text}" for text in render_table(frame)]
        out += [f"  note: {note}" for note in result.notes]
        out.append("")
    return "\n".join(out)


@click.command("analyze")
@click.argument("trace_path", metavar="TRACE", type=path_param())
@click.option("--analyzer", "-a", "only", multiple=True, metavar="NAME",
              help="Run only this analyzer (repeatable; default: all).")
@plugins_dir_option
@timeout_option
@jobs_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Text for people, or JSON for scripts and CI.")
@strict_option
def analyze_command(trace_path: Path, only: Sequence[str], plugins_dirs: Sequence[Path],
                    fmt: str, timeout: float | None, jobs: int, strict: bool) -> None:
    """Run the analyzers over TRACE and print their metrics and tables.

    Analyzers come from the plugins (see `tdxtrace plugins`); results are ordered by analyzer
    name. Warnings about the trace (e.g. unfinished) and failures go to stderr.

    \b
    JSON (--format json): one object whose keys are the analyzer names, sorted:
      {"NAME": {"metrics": {"METRIC": number, ...},
                "tables": {"TABLE": [{"COLUMN": value, ...}, ...], ...},
                "notes": ["caveat", ...]},
       "FAILED_NAME": {"error": "ExceptionType: message"}}
    Metrics are flat and unprefixed; table rows keep the column order; integers (including
    64-bit statuses) stay integers; an undefined float cell is null.

    \b
    Exit status: 0 all analyzers ran; 1 an analyzer or a plugin failed (the other results
    are still printed); 2 bad input (unreadable trace, an unfinished one with no event read,
    unknown --analyzer, bad plugin hook, or with --strict a trace with warnings: a CI check
    then cannot pass on the part of a cut or damaged file that could be read).

    \b
    Examples:
      tdxtrace analyze run.arrow
      tdxtrace analyze run.arrow -a busy_retry --format json
      tdxtrace analyze run.arrow --strict --format json > figures.json   (CI)
    """
    trace = open_for_analysis(trace_path, strict)
    pm = make_plugin_manager(plugins_dirs=plugins_dirs)
    loaded = load_analyzers(pm)
    require_analyzers(loaded)
    # Reported first: a failed plugin may be why an --analyzer NAME is unknown.
    failed_plugins(loaded.failed)
    outcomes = run_analyzers(trace, loaded.analyzers, only=only, timeout=timeout, jobs=jobs)
    if fmt == "json":
        click.echo(json.dumps(outcomes_json(outcomes), indent=2, default=str))
    else:
        click.echo(outcomes_text(outcomes), nl=False)
    for outcome in outcomes:
        if not outcome.ok:
            say(f"tdxtrace: analyzer {outcome.name} failed: {outcome.error}")
    if loaded.failed or not all(o.ok for o in outcomes):
        sys.exit(1)
