"""``tdxtrace replay`` and ``tdxtrace capsule``: prove a run reproducible, event for event."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from tdxtrace.commands.messages import failed_plugins, warn
from tdxtrace.commands.options import path_param
from tdxtrace.commands.plugins_cmd import plugins_dir_option
from tdxtrace.errors import TdxtraceError
from tdxtrace.outputs import check_output
from tdxtrace.plugins import load_analyzers, make_plugin_manager
from tdxtrace.replay import (
    AnalysisCheck,
    ReplayPlan,
    ReplayResult,
    capsule_from_trace,
    check_streaming,
    plan_from_capsule,
    plan_from_metadata,
    read_capsule,
    replay_capsule,
    replay_trace,
    snapshot,
    write_capsule,
)
from tdxtrace.replay.runner import event_at, run_until
from tdxtrace.replay.text import render_divergence, render_state
from tdxtrace.trace import Trace, open_trace


class _Progress:
    """``replaying: 42% of simulated time`` on stderr, only when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._last = -1

    def __call__(self, done_ns: int, total_ns: int) -> None:
        pct = min(100, done_ns * 100 // total_ns) if total_ns > 0 else 100
        if self.enabled and pct != self._last:
            self._last = pct
            click.echo(f"\rreplaying: {pct:3d}% of simulated time", err=True, nl=False)

    def finish(self) -> None:
        if self.enabled and self._last >= 0:
            click.echo("", err=True)


def _result_doc(result: ReplayResult) -> dict[str, Any]:
    divergence = result.divergence
    return {"source": result.source, "identical": result.identical, "events": result.events,
            "digest": result.digest, "prefix": result.prefix,
            "divergence": None if divergence is None else asdict(divergence)}


def _result_text(result: ReplayResult) -> str:
    if result.divergence is not None:
        return render_divergence(result.source, result.divergence)
    if result.prefix:
        return (f"identical prefix: {result.events} events, digest {result.digest} (the trace "
                "is unfinished: only its complete events were compared)")
    return f"identical: {result.events} events, digest {result.digest}"


def _analysis_text(checks: Sequence[AnalysisCheck]) -> str:
    lines = [f"streamed == batch analysis: {c.name}" if c.equal else
             f"streamed != batch analysis: {c.name}: {c.detail}" for c in checks]
    if not checks:
        lines.append("no analyzers loaded")
    return "\n".join(lines)


def _plan(trace: Trace | None, capsule_path: Path | None, force: bool) -> ReplayPlan:
    if trace is not None:
        plan = plan_from_metadata(trace.metadata, str(trace.path), force=force)
    else:
        assert capsule_path is not None
        plan = plan_from_capsule(read_capsule(capsule_path), str(capsule_path), force=force)
    if plan.version_note is not None:  # said before comparing; --force was given
        warn([f"{plan.version_note}; replaying anyway (--force)"])
    return plan


def _until(trace: Trace | None, plan: ReplayPlan, source: str, seq: int,
           as_json: bool) -> int:
    if trace is None:
        # A capsule has no events to compare with: run to seq and show the state unchecked.
        world = run_until(plan.scenario, plan.seed, lambda batch: None, seq)
        if world is None:
            raise TdxtraceError(f"{source}: --until {seq}: the run ends before event {seq}")
        state = snapshot(world, seq)
    else:
        result, kept = replay_trace(trace, plan, until=seq)
        if kept is None:
            _emit(as_json, _result_doc(result), _result_text(result))
            return 1
        state = snapshot(kept, seq, event_at(trace, seq))
    _emit(as_json, {"source": source, "checked": trace is not None, "state": state},
          render_state(state))
    return 0


def _emit(as_json: bool, doc: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else text)


@click.command("replay")
@click.argument("trace_path", metavar="[TRACE]", required=False,
                type=path_param())
@click.option("--capsule", "capsule_path", type=path_param(), metavar="FILE",
              help="Replay from a capsule (see `tdxtrace capsule`) instead of a trace.")
@click.option("--force", is_flag=True,
              help="Replay a trace written by another tdxtrace version anyway.")
@click.option("--until", "until", type=click.IntRange(min=0), metavar="SEQ",
              help="Re-run up to event SEQ and print the model's state there.")
@click.option("--analyze", is_flag=True,
              help="Also stream the events through each analyzer's per-batch form and check "
                   "it equals the batch analysis.")
@click.option("--batch-rows", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Rows per batch fed to the analyzers with --analyze.")
@plugins_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def replay_command(trace_path: Path | None, capsule_path: Path | None, force: bool,
                   until: int | None, analyze: bool, batch_rows: int,
                   plugins_dirs: Sequence[Path], as_json: bool) -> None:
    """Re-run TRACE's scenario and seed in the emulator and compare, event by event.

    Prints `identical: N events, digest D`, or the first divergent event: its seq, the
    recorded and replayed rows side by side, and the fields that differ. A trace written by
    another tdxtrace version is refused unless --force. An unfinished trace is compared up
    to its last complete event.

    \b
    Exit status: 0 identical (and, with --analyze, every analyzer agrees); 1 divergent, or
    (with --analyze) an analyzer's streamed result differs, an analyzer failed or a plugin
    failed to load; 2 bad input (unreadable trace, no scenario, other version without
    --force).

    \b
    Examples:
      tdxtrace replay run.arrow
      tdxtrace replay run.arrow --analyze
      tdxtrace replay run.arrow --until 12345 --json
      tdxtrace replay --capsule run.capsule.json
    """
    if (trace_path is None) == (capsule_path is None):
        raise click.UsageError("give either TRACE or --capsule FILE")
    if capsule_path is not None and analyze:
        raise click.UsageError("--analyze needs the trace's events, not a capsule")
    if until is not None and analyze:  # --until stops part way: nothing whole to analyze
        raise click.UsageError("--analyze and --until cannot be combined")
    trace = open_trace(trace_path) if trace_path is not None else None
    if trace is not None:
        warn(trace.warnings)
    plan = _plan(trace, capsule_path, force)
    source = str(trace_path if trace_path is not None else capsule_path)
    if until is not None:
        sys.exit(_until(trace, plan, source, until, as_json))
    progress = _Progress()
    try:
        if trace is not None:
            result, _ = replay_trace(trace, plan, progress=progress)
        else:
            assert capsule_path is not None
            result = replay_capsule(read_capsule(capsule_path), plan, source,
                                    progress=progress)
    finally:
        progress.finish()
    doc, text = _result_doc(result), _result_text(result)
    checks: list[AnalysisCheck] = []
    plugins_ok = True
    if analyze:
        assert trace is not None
        loaded = load_analyzers(make_plugin_manager(plugins_dirs=plugins_dirs))
        failed_plugins(loaded.failed)
        plugins_ok = not loaded.failed
        checks = check_streaming(trace, loaded.analyzers, batch_rows=batch_rows)
        doc["analysis"] = [asdict(c) for c in checks]
        text += "\n" + _analysis_text(checks)
    _emit(as_json, doc, text)
    if not result.identical or not plugins_ok or not all(c.equal for c in checks):
        sys.exit(1)


@click.command("capsule")
@click.argument("trace_path", metavar="TRACE", type=path_param())
@click.option("-o", "--output", type=path_param(),  # checked when writing
              default=None, help="Capsule file to write [default: TRACE.capsule.json].")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def capsule_command(trace_path: Path, output: Path | None, force: bool) -> None:
    """Write a small reproduction capsule of TRACE: scenario, seed, version and digest.

    Another machine replays it without the trace (`tdxtrace replay --capsule FILE`) and
    checks the digest. The trace must be finished.

    \b
    Example:
      tdxtrace capsule run.arrow -o run.capsule.json
    """
    path = output or trace_path.with_name(trace_path.name + ".capsule.json")
    check_output(path, force=force, inputs=(trace_path,))  # before reading the whole trace
    trace = open_trace(trace_path)
    capsule = capsule_from_trace(trace)
    write_capsule(capsule, path, force=force, inputs=(trace_path,))
    click.echo(f"{path}: capsule of {capsule.events} events, {capsule.digest} "
               f"({path.stat().st_size} bytes)")
