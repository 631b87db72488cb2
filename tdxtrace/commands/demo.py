"""``tdxtrace demo``: the built-in default end to end: record, analyze, report."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import click

from tdxtrace.analysis import AnalyzerOutcome, run_analyzers
from tdxtrace.commands.messages import failed_plugins, say
from tdxtrace.commands.options import path_param
from tdxtrace.commands.record import ProgressLine
from tdxtrace.outputs import check_output, make_folder
from tdxtrace.plugins import load_analyzers, make_plugin_manager, require_analyzers
from tdxtrace.report import render, write_html
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.trace import open_trace

DEMO_SCENARIO = "demo"


def _figure(outcomes: dict[str, AnalyzerOutcome], analyzer: str, metric: str) -> str:
    outcome = outcomes.get(analyzer)
    if outcome is None or outcome.result is None:
        return "?"
    value = outcome.result.metrics.get(metric)
    return "?" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def summary_lines(header: str, outcomes: Sequence[AnalyzerOutcome]) -> list[str]:
    """The three lines `demo` prints: the run with zero-step and BUSY, teardown, MapGPA."""
    by_name = {o.name: o for o in outcomes}

    def f(analyzer: str, metric: str) -> str:
        return _figure(by_name, analyzer, metric)

    def longest(count: str, text: str) -> str:
        # "the longest of none" says nothing: left out when the count is 0.
        return "" if count == "0" else f" (longest {text})"

    max_ns = f("teardown_latency", "max_teardown_ns")
    teardown_ms = f"{int(max_ns) / 1e6:.2f} ms" if max_ns.isdigit() else max_ns
    chains, teardowns = f("busy_retry", "chains"), f("teardown_latency", "teardowns")
    return [
        # Not "N BUSYs in M chains": a BUSY KVM does not retry (an AUG whose fault resumes
        # the guest) is in no chain.
        f"{header}; zero-step incidents: {f('zero_step', 'incidents')}; OPERAND_BUSY: "
        f"{f('busy_retry', 'busy_total')}; retry chains: {chains}"
        f"{longest(chains, f('busy_retry', 'max_chain') + ' attempts')}",
        f"teardowns: {teardowns}{longest(teardowns, teardown_ms)}, "
        f"HKID leaks: {f('teardown_latency', 'hkid_leaks')}",
        f"MapGPA conversions: {f('mapgpa', 'conversions')}, RETRYs: {f('mapgpa', 'retries')}, "
        f"give-ups: {f('mapgpa', 'giveups')}; SPTEs zapped: {f('zap_scope', 'sptes_zapped')}",
    ]


@click.command("demo")
@click.option("--seed", type=int, default=1, show_default=True, help="Run seed.")
@click.option("--out-dir", type=path_param(file_okay=False),
              default=Path("reports"), show_default=True,
              help="Folder for demo.arrow and demo.html (both are overwritten).")
def demo_command(seed: int, out_dir: Path) -> None:
    """Record the default scenario, analyze it and write reports/demo.html.

    The default scenario is a mix that shows the four stories tdxtrace was built for:
    zero-step under resume_guest, OPERAND_BUSY retries on the zap path, a TD teardown and a
    MapGPA conversion. Exit status 1 if an analyzer failed (the report still shows it).

    \b
    Example:
      tdxtrace demo && xdg-open reports/demo.html
    """
    scenario = load_scenario(DEMO_SCENARIO)
    trace_path, html_path = out_dir / "demo.arrow", out_dir / "demo.html"
    # Both outputs before the run (they are overwritten, but never a link, folder or device):
    # a refused report must not cost the trace that was there.
    for output in (trace_path, html_path):
        check_output(output, force=True)
    make_folder(trace_path)
    progress = ProgressLine(sys.stderr.isatty())
    summary = record(scenario, seed, trace_path, force=True, progress=progress)
    progress.finish()
    trace = open_trace(trace_path, keep_decoded=True)  # the analyzers read it, not the file
    loaded = load_analyzers(make_plugin_manager())
    require_analyzers(loaded)
    outcomes = run_analyzers(trace, loaded.analyzers)
    rendered = render(trace, outcomes, analyzers={a.name: a for a in loaded.analyzers})
    written = write_html(rendered.html, html_path, force=True)
    click.echo(str(written))
    header = f"{scenario.name}, seed {seed}: {summary.events} events"
    for line in summary_lines(header, outcomes):
        click.echo(line)
    failed_plugins(loaded.failed)
    for name in rendered.failed:
        say(f"tdxtrace: analyzer {name} failed (see its section)")
    if rendered.failed or loaded.failed:
        sys.exit(1)
