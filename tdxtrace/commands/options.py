"""Options shared by the commands that run analyzers."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import click

from tdxtrace.analysis_threads import DEFAULT_JOBS, MAX_JOBS
from tdxtrace.commands.messages import warn
from tdxtrace.errors import TraceFormatError
from tdxtrace.trace import Trace, open_trace

# Any timeout longer than this is "no limit" in practice; a bigger number (1e300, inf) is far
# more likely a typo than a wish, and cannot be waited for anyway (thread joins overflow).
MAX_TIMEOUT_S = 7 * 24 * 3600


class TimeoutRange(click.FloatRange):
    """Seconds in (0, MAX_TIMEOUT_S]. ``nan`` compares false with any bound, so click's range
    check lets it through: it is refused here by name."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if isinstance(seconds, float) and math.isnan(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


timeout_option = click.option(
    "--timeout", type=TimeoutRange(min=0, min_open=True, max=MAX_TIMEOUT_S), default=None,
    metavar="SECONDS",
    help="Fail an analyzer that runs longer than this (more than 0, at most "
         f"{MAX_TIMEOUT_S} = a week); the others still run [default: no limit].")


jobs_option = click.option(
    "--jobs", type=click.IntRange(1, MAX_JOBS), default=DEFAULT_JOBS, show_default=True,
    metavar="N",
    help="Analyzers run at once, in threads, over a trace that fits in memory (1: one after "
         f"the other; at most {MAX_JOBS}; with --timeout always 1, as a timeout counts wall-clock "
         "time). Results do not depend on it.")


class PathParam(click.Path):
    """A path parameter that refuses the empty string: ``Path("")`` is ``.``, the current
    folder, which nobody typing ``-o ''`` (or an unset shell variable) meant."""

    def convert(self, value: str | os.PathLike[str], param: click.Parameter | None,
                ctx: click.Context | None) -> str | bytes | os.PathLike[str]:
        if value == "":
            self.fail("the path is empty", param, ctx)
        return super().convert(value, param, ctx)


def path_param(**kwargs: bool) -> PathParam:
    """``click.Path`` converting to ``pathlib.Path``, the empty string refused."""
    return PathParam(path_type=Path, **kwargs)


strict_option = click.option(
    "--strict", is_flag=True,
    help="Refuse a trace with any warning (unfinished, damaged, suspect rows) instead of "
         "analyzing what could be read: exit status 2.")


def open_for_analysis(trace_path: Path, strict: bool) -> Trace:
    """The trace at ``trace_path`` for analyze and report, its warnings on stderr.

    Refused (exit 2): with ``strict``, a trace with warnings; always, an unfinished trace of
    which no event could be read, whose analysis would be all zeros that look like a clean run.
    """
    trace = open_trace(trace_path, keep_decoded=True)  # the analyzers read it, not the file
    warn(trace.warnings)
    if strict and trace.warnings:
        raise TraceFormatError(f"{trace_path}: --strict: the trace has {len(trace.warnings)} "
                               "warning(s), above; nothing was analyzed")
    if not trace.finished and trace.num_events() == 0:
        raise TraceFormatError(f"{trace_path}: nothing to analyze: the trace is unfinished and "
                               "holds no complete batch of events")
    return trace
