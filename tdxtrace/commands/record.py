"""``tdxtrace record``: run a scenario in the emulator and write its trace."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from tdxtrace.commands.messages import say
from tdxtrace.commands.options import path_param
from tdxtrace.outputs import check_output, make_folder
from tdxtrace.signals import interrupt_once
from tdxtrace.sim.emulator import RecordInterrupted, record
from tdxtrace.sim.scenario import builtin_names, load_scenario


class ProgressLine:
    """A one-line progress indicator on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = -1

    def __call__(self, done_ns: int, total_ns: int) -> None:
        if not self.enabled or total_ns <= 0:
            return
        pct = min(100, done_ns * 100 // total_ns)
        if pct != self._last:
            self._last = pct
            click.echo(f"\rrecording: {pct:3d}% of simulated time", err=True, nl=False)

    def finish(self) -> None:
        if self.enabled and self._last >= 0:
            click.echo("", err=True)


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which file is at ``path`` now (inode, size, mtime), to tell a new trace from an old."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@click.command("record")
@click.argument("scenario")
@click.option("--seed", type=int, default=1, show_default=True, help="Run seed.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a scenario key, e.g. --set td.vcpus=8 (repeatable).")
@click.option("-o", "--output", type=path_param(),  # checked by check_output
              default=None, help="Trace file to write [default: SCENARIO.arrow].")
@click.option("--compression", type=click.Choice(["zstd", "lz4"]), default="zstd",
              show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def record_command(scenario: str, seed: int, overrides: tuple[str, ...], output: Path | None,
                   compression: str, force: bool) -> None:
    """Record SCENARIO (a built-in name or a .toml file) to an Arrow trace.

    \b
    Example:
      tdxtrace record zero-step --seed 7 --set policy.frozen_spte=local_retry -o run.arrow
    """
    loaded = load_scenario(scenario, overrides)
    path = output or Path(f"{Path(scenario).stem}.arrow")
    # A scenario file given as the output would be lost; the writer checks the rest again.
    scenario_file = None if scenario in builtin_names() else Path(scenario)
    check_output(path, force=force, inputs=(scenario_file,))
    make_folder(path)  # a missing output folder is created, as report and demo do
    progress = ProgressLine(sys.stderr.isatty())
    before = _identity(path)
    with interrupt_once():  # a second Ctrl-C must not cut the unfinished trace's clean-up
        try:
            summary = record(loaded, seed, path, force=force, compression=compression,
                             progress=progress)
        except RecordInterrupted as interrupt:  # Ctrl-C or SIGTERM
            progress.finish()
            if interrupt.kept:
                say(f"tdxtrace: interrupted: {path} keeps the events recorded so far and is "
                    "marked unfinished")
            elif _identity(path) not in (None, before):
                say(f"tdxtrace: interrupted: another file took the name {path} during the "
                    "run; the events recorded so far were not kept")
            elif before is not None:
                say(f"tdxtrace: interrupted: {path} is left as it was; the events recorded so "
                    "far were not kept (an unfinished trace never replaces a file)")
            else:
                say(f"tdxtrace: interrupted before the first batch of events was written; "
                    f"{path} was not written")
            sys.exit(130)
    progress.finish()
    click.echo(f"{path}: {summary.events} events, {summary.digest}")
