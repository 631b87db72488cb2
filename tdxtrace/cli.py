"""The ``tdxtrace`` command: a thin click layer over library functions.

Each command lives in its own module under :mod:`tdxtrace.commands`; this module only builds the
group and turns :class:`~tdxtrace.errors.TdxtraceError` into one line on stderr.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click

from tdxtrace._version import __version__
from tdxtrace.errors import TdxtraceError


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C, so every command cleans up the same way."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Group(click.Group):
    """A group whose commands report user errors as one line and a non-zero exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with sigterm_as_interrupt():
                return super().invoke(ctx)
        except TdxtraceError as err:
            click.echo(f"tdxtrace: error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("tdxtrace: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tdxtrace")
def main() -> None:
    """Record, replay and analyze how KVM drives the Intel TDX module.

    \b
    Start here:
      tdxtrace demo                      record the default scenario and report it
      tdxtrace scenarios                 list the built-in scenarios
      tdxtrace record zero-step -o run.arrow
      tdxtrace info run.arrow
    """


def _register_commands() -> None:
    # Imported here, not at module top, so each command module stays independent and a broken
    # optional command cannot stop `tdxtrace --version` from working.
    from tdxtrace.commands import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_register_commands()
