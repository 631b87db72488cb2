"""``tdxtrace record``: run a scenario in the emulator and write its trace."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import click

from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: keep what was recorded as an unfinished trace."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


@click.command("record")
@click.argument("scenario")
@click.option("--seed", type=int, default=1, show_default=True, help="Run seed.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a scenario key, e.g. --set td.vcpus=8 (repeatable).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
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
    progress = ProgressLine(sys.stderr.isatty())
    try:
        with sigterm_as_interrupt():
            summary = record(loaded, seed, path, force=force, compression=compression,
                             progress=progress)
    except KeyboardInterrupt:
        progress.finish()
        click.echo(f"tdxtrace: interrupted: {path} keeps the events recorded so far and is "
                   "marked unfinished", err=True)
        sys.exit(130)
    progress.finish()
    click.echo(f"{path}: {summary.events} events, {summary.digest}")
