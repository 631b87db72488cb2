"""The lines commands print on stderr besides errors: warnings and failed plugins.

Each goes through :func:`tdxtrace.errors.one_line`, as errors do in :mod:`tdxtrace.cli`: they
quote file names, metadata and plugin messages, any of which may hold a newline or a byte that
is not UTF-8, and a warning must stay one line.
"""

from __future__ import annotations

from collections.abc import Iterable

import click

from tdxtrace.errors import one_line
from tdxtrace.plugins import FailedPlugin


def say(line: str) -> None:
    """``line`` on stderr, as one line."""
    click.echo(one_line(line), err=True)


def warn(warnings: Iterable[str]) -> None:
    """``tdxtrace: warning: ...``, one line each (a trace's warnings)."""
    for warning in warnings:
        say(f"tdxtrace: warning: {warning}")


def failed_plugins(failed: Iterable[FailedPlugin]) -> None:
    """``tdxtrace: plugin NAME failed (WHERE): ERROR``, one line per plugin."""
    for plugin in failed:
        say(f"tdxtrace: plugin {plugin.name} failed ({plugin.where}): {plugin.error}")
