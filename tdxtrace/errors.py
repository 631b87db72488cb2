"""The errors tdxtrace reports to a user as one line (never a traceback)."""

from __future__ import annotations


class TdxtraceError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The message must name the file, key or field at fault. The CLI prints it as
    ``tdxtrace: error: <message>`` on stderr and exits with :attr:`exit_code`.
    """

    exit_code = 2


class TraceFormatError(TdxtraceError):
    """A file is not a readable tdxtrace trace (not Arrow, wrong schema, unknown version)."""


class ScenarioError(TdxtraceError):
    """A scenario file or ``--set`` override is invalid."""


class OutputError(TdxtraceError):
    """An output cannot be written (exists, unwritable folder, disk full)."""
