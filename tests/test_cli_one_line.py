"""Every error is one line on stderr, click's own usage errors and odd analyzer failures too.

Click prints a bad option or argument as a four-line Usage/Try/Error block; tdxtrace prints
``tdxtrace: error: <what and which value> (see tdxtrace CMD --help)`` with click's exit status.
An analyzer raising a BaseException that is not an Exception (GeneratorExit) fails alone, named,
with or without ``--timeout``, and is never mistaken for a timeout. ``TDXTRACE_LOAD_PLUGINS``
set but empty loads every plugin, as unset does.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from tdxtrace import _entry
from tdxtrace.analysis import Analyzer, AnalyzerResult, run_one
from tdxtrace.cli import main, one_line_message
from tdxtrace.testing import make_trace
from tdxtrace.trace import Trace

BUILTINS = {"busy_retry", "mapgpa", "seamcall_latency", "teardown_latency", "zap_scope",
            "zero_step"}

GENERATOR_EXIT = '''
from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer


class Closed(Analyzer):
    name = "closed"
    description = "raises GeneratorExit"

    def analyze(self, trace):
        raise GeneratorExit("closed early")


@hookimpl
def register_analyzers():
    return [Closed()]
'''


def invoke(*args: str | Path, env: dict[str, str | None] | None = None) -> Result:
    # prog_name as a user types it: the help hint at the end of the line names it.
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="tdxtrace", env=env)


def assert_one_error_line(result: Result, *named: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    line = result.stderr.rstrip("\n")
    assert line.startswith("tdxtrace: error: "), line
    for text in named:
        assert text in line, line
    for block in ("Usage:", "Try '", "Error:", "Traceback"):
        assert block not in line
    return line


# Each case: the arguments (given tmp_path) and the texts the line must contain: the option or
# argument at fault, the value, and the command whose --help it points to.
Args = Callable[[Path], list[str]]
BAD_INVOCATIONS: dict[str, tuple[Args, Args]] = {
    "output-is-a-directory": (  # checked by click or by tdxtrace itself: one line either way
        lambda d: ["record", "zero-step", "-o", str(d)],
        lambda d: [str(d), "is a directory"]),
    "timeout-zero": (
        lambda d: ["analyze", "X", "--timeout", "0"],
        lambda d: ["--timeout: ", "0.0 is not in the range", "(see tdxtrace analyze --help)"]),
    "timeout-not-a-number": (
        lambda d: ["analyze", "X", "--timeout", "soon"],
        lambda d: ["--timeout: ", "'soon'"]),
    "unknown-compression": (
        lambda d: ["record", "zero-step", "--compression", "gzip"],
        lambda d: ["--compression: ", "'gzip' is not one of 'zstd', 'lz4'"]),
    "out-dir-is-a-file": (
        lambda d: ["demo", "--out-dir", str(d / "file")],
        lambda d: ["--out-dir: ", f"Directory '{d / 'file'}' is a file",
                   "(see tdxtrace demo --help)"]),
    "missing-argument": (
        lambda d: ["analyze"],
        lambda d: ["Missing argument 'TRACE'", "(see tdxtrace analyze --help)"]),
    "replay-needs-a-source": (
        lambda d: ["replay"],
        lambda d: ["give either TRACE or --capsule FILE", "(see tdxtrace replay --help)"]),
    "replay-until-with-analyze": (
        lambda d: ["replay", "run.arrow", "--until", "5", "--analyze"],
        lambda d: ["--analyze and --until cannot be combined", "(see tdxtrace replay --help)"]),
    "option-without-its-argument": (
        lambda d: ["record", "zero-step", "-o"],
        lambda d: ["Option '-o' requires an argument", "(see tdxtrace record --help)"]),
    "unknown-option": (
        lambda d: ["analyze", "run.arrow", "--bogus"],
        lambda d: ["No such option '--bogus'", "(see tdxtrace analyze --help)"]),
    "misspelled-option": (
        lambda d: ["record", "zero-step", "--forc"],
        lambda d: ["No such option '--forc'", "'--force'"]),
    "unknown-command": (
        lambda d: ["frobnicate"],
        lambda d: ["No such command 'frobnicate'", "(see tdxtrace --help)"]),
    "unknown-group-option": (
        lambda d: ["--bogus"],
        lambda d: ["No such option '--bogus'", "(see tdxtrace --help)"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INVOCATIONS))
def test_a_click_usage_error_is_one_line_exit_2(case: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    args, named = BAD_INVOCATIONS[case]
    assert_one_error_line(invoke(*args(tmp_path)), *named(tmp_path))


EMPTY_PATHS = {
    "record-output": (["record", "zero-step", "-o", ""], "-o/--output", "record"),
    "report-output": (["report", "run.arrow", "-o", ""], "-o/--output", "report"),
    "capsule-output": (["capsule", "run.arrow", "-o", ""], "-o/--output", "capsule"),
    "analyze-trace": (["analyze", ""], "TRACE", "analyze"),
    "info-trace": (["info", ""], "TRACE", "info"),
    "replay-capsule": (["replay", "--capsule", ""], "--capsule", "replay"),
    "demo-out-dir": (["demo", "--out-dir", ""], "--out-dir", "demo"),
    "plugins-dir": (["plugins", "--plugins-dir", ""], "--plugins-dir", "plugins"),
    "schema-export": (["schema", "--export", ""], "--export", "schema"),
}


@pytest.mark.parametrize("case", sorted(EMPTY_PATHS))
def test_an_empty_path_is_refused_not_read_as_the_current_folder(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Path("") is ".": `-o "$OUT"` with OUT unset must not become "write into this folder".
    monkeypatch.chdir(tmp_path)
    args, option, command = EMPTY_PATHS[case]
    assert_one_error_line(invoke(*args), f"{option}: the path is empty",
                          f"(see tdxtrace {command} --help)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads a file without read permission")
def test_an_unreadable_trace_is_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "unreadable.arrow"
    path.write_bytes(b"ARROW1")
    path.chmod(0)
    assert_one_error_line(invoke("info", path), str(path))


def test_the_real_entry_point_prints_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "tdxtrace", "record", "zero-step",
                           "--compression", "gzip"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("tdxtrace: error: --compression: 'gzip' is not one of ")


def test_a_multi_line_click_message_is_joined_into_one_line() -> None:
    ctx = click.Context(click.Command("x"), info_name="tdxtrace x")
    err = click.BadParameter("first line\n  second line\n", ctx=ctx, param_hint=["-a", "--all"])
    assert one_line_message(err) == ("-a/--all: first line second line "
                                     "(see tdxtrace x --help)")
    assert one_line_message(click.ClickException("a\nb")) == "a b"  # no usage, no help hint


def test_a_click_exception_keeps_its_exit_status() -> None:
    @click.command("fails")
    def fails() -> None:
        raise click.ClickException("cannot do that\nat all")
    group = type(main)(name="tdxtrace", commands=[fails])
    result = CliRunner().invoke(group, ["fails"], prog_name="tdxtrace")
    assert_one_error_line(result, "tdxtrace: error: cannot do that at all", code=1)
    assert result.stderr == "tdxtrace: error: cannot do that at all\n"


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["analyze", "--help"],
                                  ["record", "-h"]])
def test_help_is_unchanged(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.startswith("Usage: tdxtrace ")
    assert "Options:" in result.stdout


def test_version_is_unchanged() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("tdxtrace, version ")


def test_a_bare_tdxtrace_shows_the_help_on_stdout_and_exits_2() -> None:
    # stdout, so `tdxtrace | less` pages it; 2, because no command was given.
    result = invoke()
    assert result.exit_code == 2 and result.stderr == ""
    assert result.stdout.startswith("Usage: tdxtrace [OPTIONS] COMMAND [ARGS]...")
    assert "Commands:" in result.stdout and "tdxtrace: error" not in result.stdout
    assert result.stdout == invoke("--help").stdout


@pytest.fixture
def closed_plugin(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "closed.py").write_text(GENERATOR_EXIT)
    return folder


@pytest.mark.parametrize("timeout", [[], ["--timeout", "30"]], ids=["no-timeout", "timeout"])
def test_an_analyzer_raising_generator_exit_fails_alone_and_named(
        trace_file: Path, closed_plugin: Path, timeout: list[str]) -> None:
    # A subprocess: a thread's traceback goes to the real stderr, which CliRunner would miss.
    done = subprocess.run([sys.executable, "-m", "tdxtrace", "analyze", str(trace_file),
                           "--plugins-dir", str(closed_plugin), *timeout, "--format", "json"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TDXTRACE_LOAD_PLUGINS": "closed,busy_retry"})
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert doc["closed"] == {"error": "GeneratorExit: closed early"}
    assert "metrics" in doc["busy_retry"]  # the others still run
    assert done.stderr == "tdxtrace: analyzer closed failed: GeneratorExit: closed early\n"


class Interrupts(Analyzer):
    name = "interrupts"
    description = "raises KeyboardInterrupt itself"

    def analyze(self, trace: Trace) -> AnalyzerResult:
        raise KeyboardInterrupt


def test_a_keyboard_interrupt_raised_by_an_analyzer() -> None:
    # In the worker thread (--timeout) it cannot be the user's Ctrl-C: the analyzer failed.
    outcome = run_one(Interrupts(), make_trace([]), timeout=30)
    assert outcome.error == "KeyboardInterrupt"
    # In the main thread it may be, so it stops the command (tdxtrace: interrupted, 130).
    with pytest.raises(KeyboardInterrupt):
        run_one(Interrupts(), make_trace([]))


@pytest.mark.parametrize("value", ["", "  ", ",", " , ,"])
def test_an_empty_load_plugins_variable_loads_everything(trace_file: Path, value: str) -> None:
    listed = invoke("plugins", "--json", env={"TDXTRACE_LOAD_PLUGINS": value})
    assert listed.exit_code == 0, listed.output
    assert {p["name"] for p in json.loads(listed.stdout)["plugins"]} >= BUILTINS
    analyzed = invoke("analyze", trace_file, "--format", "json",
                      env={"TDXTRACE_LOAD_PLUGINS": value})
    assert analyzed.exit_code == 0, analyzed.output
    assert set(json.loads(analyzed.stdout)) >= BUILTINS


def test_ctrl_c_while_the_cli_is_still_importing_is_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Importing the CLI (polars, pyarrow) takes ~0.3 s; a Ctrl-C then must not be a traceback.
    real_import = builtins.__import__

    def interrupted_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "tdxtrace.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    with pytest.raises(SystemExit) as exited:
        _entry.run()
    assert exited.value.code == 130
    assert capsys.readouterr().err == "tdxtrace: interrupted\n"
