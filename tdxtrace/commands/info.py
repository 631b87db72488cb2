"""``tdxtrace info``: what a trace file holds, from its metadata and one pass over its events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import polars as pl

from tdxtrace.commands.options import path_param
from tdxtrace.errors import one_line
from tdxtrace.events import kind_name
from tdxtrace.trace import Trace, open_trace


def describe_trace(trace: Trace) -> dict[str, Any]:
    """The facts ``tdxtrace info`` shows, as JSON-able data (one vectorized pass over events)."""
    per_kind = (
        trace.events()
        .group_by("kind", "truth")
        .agg(pl.len().alias("events"), pl.col("ts_ns").min().alias("first"),
             pl.col("ts_ns").max().alias("last"))
        .sort("kind", "truth")
        .collect()
    )
    by_kind: dict[str, int] = {}
    observable: dict[str, int] = {}
    truth_rows: dict[str, int] = {}
    for kind, is_truth, count in per_kind.select("kind", "truth", "events").iter_rows():
        name = kind_name(kind)  # one row per kind: a few dozen at most
        by_kind[name] = by_kind.get(name, 0) + count
        side = truth_rows if is_truth else observable
        side[name] = side.get(name, 0) + count
    span = None
    if per_kind.height:
        span = [int(per_kind["first"].min()), int(per_kind["last"].max())]  # type: ignore[arg-type]
    meta = trace.metadata
    summary = trace.summary
    return {
        "path": str(trace.path) if trace.path else None,
        "finished": trace.finished,
        "schema_version": meta.schema_version,
        "tdxtrace_version": meta.tdxtrace_version,
        "producer": meta.producer,
        "scenario": meta.scenario_name,
        "seed": meta.seed,
        "policies": dict(sorted(meta.policies.items())),
        "events": trace.num_events(),
        "observable_events": sum(observable.values()),
        "truth_events": sum(truth_rows.values()),
        "events_by_kind": dict(sorted(by_kind.items())),
        "observable_by_kind": observable,  # in kind-number order
        "truth_by_kind": truth_rows,
        "span_ns": span,
        "digest": summary.digest if summary else None,
        "truth": summary.truth if summary else {},
        "warnings": list(trace.warnings),
    }


def human_ns(ns: int) -> str:
    """A duration in the largest unit that keeps it at least 1 (``123.457 ms``)."""
    for unit, scale in (("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)):
        if abs(ns) >= scale:
            return f"{ns / scale:.3f} {unit}"
    return f"{ns} ns"


def _pairs(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in mapping.items()) or "(none)"


def render_text(facts: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe_trace`."""
    span = facts["span_ns"]
    span_text = "(no events)"
    if span is not None:
        span_text = f"{span[0]} .. {span[1]} ns ({human_ns(span[1] - span[0])})"
    rows = [
        ("trace", facts["path"] or "(in memory)"),
        ("status", "finished" if facts["finished"] else "UNFINISHED"),
        ("schema version", str(facts["schema_version"])),
        ("written by", f"tdxtrace {facts['tdxtrace_version']} ({facts['producer']})"),
        ("scenario", facts["scenario"] or "(none)"),
        ("seed", "(none)" if facts["seed"] is None else str(facts["seed"])),
        ("policies", _pairs(facts["policies"])),
        ("events", f"{facts['events']} ({facts['observable_events']} observable, "
                   f"{facts['truth_events']} truth)"),
        ("time span", span_text),
        ("digest", facts["digest"] or "(none: unfinished trace)"),
        ("truth counters", _pairs(dict(sorted(facts["truth"].items())))),
    ]
    # The path and metadata are free text: a newline in one must not fake a line of its own.
    lines = [f"{label:<16}{one_line(value)}" for label, value in rows]
    for title, counts in (("observable events by kind", facts["observable_by_kind"]),
                          ("truth events by kind", facts["truth_by_kind"])):
        if counts:
            width = max(len(name) for name in counts)
            lines += ["", title] + [f"  {name:<{width}}  {n:>12}" for name, n in counts.items()]
    if facts["warnings"]:
        lines += ["", "warnings"] + [f"  {warning}" for warning in facts["warnings"]]
    return "\n".join(lines)


@click.command(
    "info",
    epilog="""\b
Examples:
  tdxtrace info run.arrow
  tdxtrace info run.arrow --json | jq .events_by_kind""",
)
@click.argument("trace_path", metavar="TRACE", type=path_param())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def info_command(trace_path: Path, as_json: bool) -> None:
    """Show a trace's run metadata, event counts by kind, time span and digest.

    An unfinished trace (interrupted run, damaged file) is described from the events that
    could be read, with a warning; its digest is absent.
    """
    facts = describe_trace(open_trace(trace_path))
    if as_json:
        click.echo(json.dumps(facts, indent=2))
    else:
        click.echo(render_text(facts))
