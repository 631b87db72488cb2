"""The ``tdxtrace`` command: a thin click layer over library functions.

Each command lives in its own module under :mod:`tdxtrace.commands`; this module only builds the
group and turns :class:`~tdxtrace.errors.TdxtraceError` and click's own usage errors into one
line on stderr.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator, Sequence
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
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:
            err.show()  # a bare `tdxtrace`: the help is the message, as before
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"tdxtrace: error: {one_line_message(err, self._help_for(args))}",
                       err=True)
            sys.exit(err.exit_code)
        except click.Abort:  # Ctrl-C or EOF while click parses or prompts: as standalone does
            click.echo("Aborted!", err=True)
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
