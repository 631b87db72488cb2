"""Run the ``tdxtrace`` command in-process and check its one-line errors (shared by tests)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from tdxtrace.cli import main


def run_cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def invoke(*args: str | Path, load: str | None = None) -> Result:
    """``tdxtrace ARGS`` in-process under its own name; given ``load``, only those plugins."""
    env = {"TDXTRACE_LOAD_PLUGINS": load} if load is not None else None
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="tdxtrace", env=env)


def assert_one_line_error(result: Result, path: Path, problem: str) -> None:
    """Exit 2, no traceback, exactly one stderr line naming ``path`` and saying ``problem``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"tdxtrace: error: {path}: "), result.stderr
    assert problem in result.stderr, result.stderr


def record_zero_step(folder: Path, duration_us: int = 1500) -> Path:
    """A short zero-step trace, ``folder/run.arrow``, recorded through the CLI."""
    path = folder / "run.arrow"
    result = run_cli("record", "zero-step", "--set", f"run.duration_us={duration_us}",
                     "-o", path)
    assert result.exit_code == 0, result.output
    return path


def write_plugins(folder: Path, texts: dict[str, str]) -> Path:
    """``folder`` holding one ``NAME.py`` per entry of ``texts``: a --plugins-dir."""
    for name, text in texts.items():
        (folder / f"{name}.py").write_text(text)
    return folder
