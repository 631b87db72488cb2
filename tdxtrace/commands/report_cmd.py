"""``tdxtrace report``: run the analyzers over a trace and write one self-contained HTML page."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import click

from tdxtrace.analysis import AnalyzerOutcome, run_analyzers
from tdxtrace.commands.messages import failed_plugins, say
from tdxtrace.commands.options import (
    jobs_option,
    open_for_analysis,
    path_param,
    strict_option,
    timeout_option,
)
from tdxtrace.commands.plugins_cmd import plugins_dir_option
from tdxtrace.errors import TdxtraceError
from tdxtrace.outputs import check_output
from tdxtrace.plugins import FailedPlugin, load_analyzers, make_plugin_manager, require_analyzers
from tdxtrace.report import default_report_path, parse_thresholds, render, write_html
from tdxtrace.report.thresholds import ThresholdTable


def failed_plugin_outcome(failed: FailedPlugin) -> AnalyzerOutcome:
    """A failed plugin as a failed section: its analyzers are unknown, its error is not."""
    return AnalyzerOutcome(f"plugin {failed.name}", None,
                           f"plugin {failed.name} ({failed.where}) failed: {failed.error}")


def check_thresholds(thresholds: ThresholdTable, outcomes: Sequence[AnalyzerOutcome]) -> None:
    """Every --threshold must name an analyzer that ran and a metric it reported."""
    ran = {o.name: o for o in outcomes}
    for analyzer, metrics in sorted(thresholds.items()):
        outcome = ran.get(analyzer)
        if outcome is None:
            raise TdxtraceError(f"--threshold {analyzer}.*: no analyzer {analyzer!r} ran "
                                f"(ran: {', '.join(sorted(ran)) or 'none'})")
        if outcome.result is None:
            continue  # it failed; its section says why, and it is marked fail anyway
        unknown = sorted(set(metrics) - outcome.result.metrics.keys())
        if unknown:
            raise TdxtraceError(
                f"--threshold {analyzer}.{unknown[0]}: {analyzer} reports no metric "
                f"{unknown[0]!r} (it has: {', '.join(sorted(outcome.result.metrics))})")


@click.command("report")
@click.argument("trace_path", metavar="TRACE", type=path_param())
@click.option("-o", "--output", type=path_param(), metavar="FILE",
              help="Where to write the report (default: reports/<trace stem>.html).")
@click.option("--analyzer", "-a", "only", multiple=True, metavar="NAME",
              help="Report only this analyzer (repeatable; default: all).")
@plugins_dir_option
@timeout_option
@jobs_option
@click.option("--threshold", "threshold_specs", multiple=True,
              metavar="ANALYZER.METRIC=WARN:FAIL",
              help="Override a metric's warn/fail limits (repeatable).")
@click.option("--force", is_flag=True, help="Overwrite an existing report.")
@strict_option
def report_command(trace_path: Path, output: Path | None, only: Sequence[str],
                   plugins_dirs: Sequence[Path], threshold_specs: Sequence[str],
                   force: bool, timeout: float | None, jobs: int, strict: bool) -> None:
    """Analyze TRACE and write one self-contained HTML report.

    The page has the run's metadata, a summary table of each analyzer's key figures with an
    ok/warn/fail mark, then one section per analyzer (sorted by name) with its metrics,
    charts and tables. It loads nothing from the network and is byte-identical for the same
    trace and plugins, so it can be attached to a bug and diffed.

    \b
    Marks: a metric with limits (WARN, FAIL) is "fail" when value >= FAIL, "warn" when
    value >= WARN, "ok" otherwise; an analyzer's mark is its worst metric's; a failed
    analyzer is "fail". Each analyzer ships default limits; --threshold overrides them.

    \b
    Exit status: 0 written; 1 written, but an analyzer, a plugin or a section template
    failed (its section shows the error); 2 bad input (unreadable trace, unknown analyzer,
    bad --threshold, output exists without --force, output is the trace itself or not a
    regular file, an unfinished trace with no event read, or with --strict a trace with
    warnings).

    \b
    Examples:
      tdxtrace report run.arrow                      # -> reports/run.html
      tdxtrace report run.arrow -o bug-1234.html --force
      tdxtrace report run.arrow -a zero_step --threshold zero_step.kvm_caused_incidents=1:5
    """
    thresholds = parse_thresholds(threshold_specs)
    path = output if output is not None else default_report_path(trace_path)
    # Before the analysis, not after minutes of it; write_html checks again when publishing.
    check_output(path, force=force, inputs=(trace_path,))
    trace = open_for_analysis(trace_path, strict)
    loaded = load_analyzers(make_plugin_manager(plugins_dirs=plugins_dirs))
    require_analyzers(loaded)
    failed_plugins(loaded.failed)
    outcomes = run_analyzers(trace, loaded.analyzers, only=only, timeout=timeout, jobs=jobs)
    check_thresholds(thresholds, outcomes)
    plugin_outcomes = [failed_plugin_outcome(f) for f in loaded.failed]
    rendered = render(trace, [*outcomes, *plugin_outcomes],
                      analyzers={a.name: a for a in loaded.analyzers}, thresholds=thresholds)
    written = write_html(rendered.html, path, force=force, inputs=(trace_path,))
    errors = {o.name: o.error for o in outcomes if o.error}
    for name in rendered.failed:
        if name in errors:
            say(f"tdxtrace: analyzer {name} failed: {errors[name]}")
        elif name not in {o.name for o in plugin_outcomes}:  # those were reported above
            say(f"tdxtrace: analyzer {name}: its section template failed (the report shows "
                "the error)")
    click.echo(str(written))
    if rendered.failed:
        sys.exit(1)
