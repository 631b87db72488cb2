"""Run the ``tdxtrace`` command in-process and check its one-line errors (shared by tests)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from tdxtrace.cli import main


def run_cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result: Result, path: Path, problem: str) -> None:
    """Exit 2, no traceback, exactly one stderr line naming ``path`` and saying ``problem``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"tdxtrace: error: {path}: "), result.stderr
    assert problem in result.stderr, result.stderr
