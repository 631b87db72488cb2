"""The ``tdxtrace`` command: a thin click layer over library functions.

Each command lives in its own module under :mod:`tdxtrace.commands`; this module only builds the
group and turns :class:`~tdxtrace.errors.TdxtraceError` and click's own usage errors into one
line on stderr, with control characters escaped (:func:`~tdxtrace.errors.one_line`).
"""

from __future__ import annotations

import contextlib
import io
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click

from tdxtrace._version import __version__
from tdxtrace.analysis import UserInterrupts
from tdxtrace.errors import ESCAPE_ERRORS, TdxtraceError, one_line


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C, so every command cleans up the same way."""


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated`; both it and Ctrl-C are counted in
    :class:`~tdxtrace.analysis.UserInterrupts`, so an analyzer's own ``raise KeyboardInterrupt``
    fails that analyzer instead of reading as the user stopping the command."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        UserInterrupts.received += 1
        raise Terminated()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        UserInterrupts.received += 1
        raise KeyboardInterrupt()

    previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    # Only Python's own Ctrl-C handler is replaced: an ignored SIGINT (a job started with
    # `nohup` or `&`) stays ignored, and a caller's own handler is left alone. Ignored, no
    # Ctrl-C can come, so every user interrupt is a counted SIGTERM all the same; only a
    # caller's own handler leaves the count unknown.
    handler = signal.getsignal(signal.SIGINT)
    counts_sigint = handler is signal.default_int_handler
    previous_int = signal.signal(signal.SIGINT, on_sigint) if counts_sigint else None
    was_counting = UserInterrupts.counting
    UserInterrupts.counting = counts_sigint or handler == signal.SIG_IGN
    try:
        yield
    finally:
        UserInterrupts.counting = was_counting
        signal.signal(signal.SIGTERM, previous_term)
        # Unless a command replaced it meanwhile: `record` leaves Ctrl-C ignored once it was
        # pressed (a second one during the exit must not turn status 130 into death by signal).
        if previous_int is not None and signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, previous_int)


def escape_unencodable_output() -> None:
    """Make stdout and stderr write what they cannot encode escaped (``\\xff``).

    A file name whose bytes are not UTF-8 reaches Python as text that no encoding can write;
    printing it (``record``'s summary line, ``info``'s header) would otherwise end the command
    with a UnicodeEncodeError traceback after the work was done.
    """
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            with contextlib.suppress(ValueError, OSError):  # closed, or not reconfigurable
                stream.reconfigure(errors=ESCAPE_ERRORS)


def _param_hint(err: click.BadParameter) -> str | None:
    """The option or argument at fault as the user types it: ``-o/--output``, ``TRACE``."""
    if err.param_hint is not None:
        hint = err.param_hint
        return hint if isinstance(hint, str) else "/".join(hint)
    if isinstance(err.param, click.Option):
        return "/".join(err.param.opts)
    if err.param is not None:
        return err.param.human_readable_name
    return None


def one_line_message(err: click.ClickException, help_command: str | None = None) -> str:
    """A click error as the single line after ``tdxtrace: error: ``.

    A bad value reads ``-o/--output: File '/tmp' is a directory``; other usage errors keep
    click's wording (``Missing argument 'TRACE'``, ``No such command 'x'``). A usage error ends
    with where to get help, the one useful line of click's usual four-line block.
    """
    hint = None
    if isinstance(err, click.BadParameter) and not isinstance(err, click.MissingParameter):
        hint = _param_hint(err)  # MissingParameter's own wording already names the parameter
    message = f"{hint}: {err.message}" if hint else err.format_message()
    # One line even when a message (a plugin's, a type's) spans several.
    message = " ".join(part.strip() for part in message.splitlines() if part.strip())
    message = one_line(message)
    ctx = err.ctx if isinstance(err, click.UsageError) else None
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        help_name = max(ctx.command.get_help_option_names(ctx), key=len)
        message = f"{message.removesuffix('.')} (see {ctx.command_path} {help_name})"
    elif isinstance(err, click.UsageError) and help_command:
        # click's option parser raises some errors ("requires an argument") with no context.
        message = f"{message.removesuffix('.')} (see {help_command} --help)"
    return message


class _Group(click.Group):
    """A group whose commands report user errors as one line and a non-zero exit status."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        # click prints its errors in standalone mode only, as a 4-line Usage/Try/Error block,
        # with no hook to change that; so run click non-standalone and do what standalone mode
        # does here, printing ClickExceptions our way. A caller asking for non-standalone mode
        # gets click's exceptions unchanged.
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        escape_unencodable_output()
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:
            # A bare `tdxtrace`: the help, on stdout so it can be paged (`tdxtrace | less`),
            # and status 2 because no command was given (as git does).
            click.echo(err.ctx.get_help() if err.ctx is not None else err.format_message())
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"tdxtrace: error: {one_line_message(err, self._help_for(args))}",
                       err=True)
            sys.exit(err.exit_code)
        except click.Abort as err:
            if isinstance(err.__cause__, KeyboardInterrupt):  # Ctrl-C while click parsed
                click.echo("tdxtrace: interrupted", err=True)
                sys.exit(130)
            click.echo("Aborted!", err=True)  # EOF at a prompt: as standalone does
            sys.exit(1)
        # Non-standalone click returns a click Exit's code (--help, --version, ctx.exit(n)) or
        # the command's return value; commands here return None and exit with sys.exit().
        sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)

    def _help_for(self, args: Sequence[str] | None) -> str:
        """``tdxtrace CMD`` for the command the arguments name, else ``tdxtrace``."""
        words = list(sys.argv[1:] if args is None else args)
        command = next((w for w in words if not w.startswith("-")), None)
        return f"tdxtrace {command}" if command in self.commands else "tdxtrace"

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with signals_as_interrupts():
                return super().invoke(ctx)
        except TdxtraceError as err:
            click.echo(f"tdxtrace: error: {one_line(str(err))}", err=True)
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
