"""Misbehaving plugins: each fails alone, in one line, never a traceback.

* ``replay --analyze`` runs analyzers as ``analyze`` and ``report`` do: an analyzer calling
  ``sys.exit(0)`` or raising KeyboardInterrupt itself fails alone (the verdict is still
  printed, exit status 1), and a plugin that fails to load makes the exit status 1.
* A malformed ``notes`` fails that analyzer alone; a plugin attribute (``description``,
  ``thresholds``...) that raises or has the wrong type fails that plugin alone.

Odd option values and messages quoting a newline are in test_cli_robustness_values.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import invoke, record_zero_step, write_plugins

from tdxtrace.analysis import Analyzer, AnalyzerResult, run_analyzers
from tdxtrace.report import render
from tdxtrace.testing import make_trace
from tdxtrace.trace import Trace

HEADER = '''
import sys

from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult
'''


def _plugin(cls_body: str, name: str) -> str:
    return HEADER + f'''
class Odd(Analyzer):
    name = "{name}"
{cls_body}

@hookimpl
def register_analyzers():
    return [Odd()]
'''


PLUGINS = {
    "exits": _plugin('''    description = "calls sys.exit(0)"

    def analyze(self, trace):
        sys.exit(0)
''', "exits"),
    "interrupts": _plugin('''    description = "raises KeyboardInterrupt itself"

    def analyze(self, trace):
        raise KeyboardInterrupt("not the user")
''', "interrupts"),
    "int_notes": _plugin('''    description = "notes is an int"

    def analyze(self, trace):
        return AnalyzerResult(metrics={"m": 1}, notes=5)
''', "int_notes"),
    "str_notes": _plugin('''    description = "notes is one str"

    def analyze(self, trace):
        return AnalyzerResult(metrics={"m": 1}, notes="one caveat")
''', "str_notes"),
    "bad_description": _plugin('''    @property
    def description(self):
        raise RuntimeError("no description\\ntoday")

    def analyze(self, trace):
        return AnalyzerResult(metrics={"m": 1})
''', "bad_description"),
    "bad_thresholds": _plugin('''    description = "thresholds of the wrong shape"
    thresholds = {"m": 5}

    def analyze(self, trace):
        return AnalyzerResult(metrics={"m": 1})
''', "bad_thresholds"),
    "bad_key_metrics": _plugin('''    description = "key_metrics as one str"
    key_metrics = "m"

    def analyze(self, trace):
        return AnalyzerResult(metrics={"m": 1})
''', "bad_key_metrics"),
    "import_fails": "import tdxtrace_no_such_module  # noqa\n",
}


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_zero_step(tmp_path_factory.mktemp("trace"))


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_plugins(tmp_path_factory.mktemp("plugins"), PLUGINS)


def tdxtrace(*args: str | Path, load: str,
             sigint_ignored: bool = False) -> subprocess.CompletedProcess[str]:
    """The real command (its own signal handlers, its own process), only plugins ``load``;
    ``sigint_ignored``: started as `nohup` or a shell's `&` start it, SIGINT ignored."""
    env = {**os.environ, "TDXTRACE_LOAD_PLUGINS": load}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.run([sys.executable, "-m", "tdxtrace", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=ignore)


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# -- replay --analyze ---------------------------------------------------------------------------

@pytest.mark.parametrize(("plugin", "error", "sigint_ignored"), [
    ("exits", "SystemExit: 0", False),
    ("interrupts", "KeyboardInterrupt: not the user", False),
    # In a background job no Ctrl-C can come: the KeyboardInterrupt is still the plugin's.
    ("interrupts", "KeyboardInterrupt: not the user", True),
])
def test_replay_analyze_reports_an_analyzer_that_exits_or_interrupts_itself(
        trace: Path, plugins: Path, plugin: str, error: str, sigint_ignored: bool) -> None:
    done = tdxtrace("replay", trace, "--analyze", "--plugins-dir", plugins,
                    load=f"{plugin},zero_step", sigint_ignored=sigint_ignored)
    assert done.returncode == 1, done.stderr
    assert_no_traceback(done.stderr)
    assert done.stdout.startswith("identical: "), done.stdout  # the verdict is still there
    assert f"streamed != batch analysis: {plugin}: " in done.stdout
    assert error in done.stdout
    assert "streamed == batch analysis: zero_step" in done.stdout  # the others still ran


def test_replay_analyze_json_still_prints_the_document(trace: Path, plugins: Path) -> None:
    done = tdxtrace("replay", trace, "--analyze", "--json", "--plugins-dir", plugins,
                    load="exits,zero_step")
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert doc["identical"] is True
    checks = {c["name"]: c for c in doc["analysis"]}
    assert checks["exits"]["equal"] is False and "SystemExit: 0" in checks["exits"]["detail"]
    assert checks["zero_step"]["equal"] is True


def test_replay_analyze_exits_1_when_a_plugin_fails_to_load(trace: Path,
                                                             plugins: Path) -> None:
    done = tdxtrace("replay", trace, "--analyze", "--plugins-dir", plugins,
                    load="import_fails,zero_step")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith("tdxtrace: plugin import_fails failed ("), done.stderr
    assert done.stderr.count("\n") == 1
    assert "streamed == batch analysis: zero_step" in done.stdout


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_an_analyzer_raising_keyboard_interrupt_itself_fails_alone(
        trace: Path, plugins: Path, tmp_path: Path, command: str) -> None:
    # Not a Ctrl-C (no signal came): the analyzer's failure, not "tdxtrace: interrupted", 130.
    extra = ["-o", tmp_path / "r.html"] if command == "report" else []
    done = tdxtrace(command, trace, "--plugins-dir", plugins, *extra,
                    load="interrupts,zero_step")
    assert done.returncode == 1, done.stderr
    assert "tdxtrace: analyzer interrupts failed: KeyboardInterrupt: not the user" \
        in done.stderr
    assert "interrupted" not in done.stderr.replace("KeyboardInterrupt", "")


# -- malformed results and attributes ------------------------------------------------------------

@pytest.mark.parametrize(("plugin", "error"), [
    ("int_notes", "TypeError: int_notes: notes must be a tuple of str, got int"),
    ("str_notes", "TypeError: str_notes: notes must be a tuple of str, got str"),
])
@pytest.mark.parametrize("fmt", ["table", "json"])
def test_malformed_notes_fail_that_analyzer_alone(trace: Path, plugins: Path, plugin: str,
                                                  error: str, fmt: str) -> None:
    result = invoke("analyze", trace, "--plugins-dir", plugins, "--format", fmt,
                    load=f"{plugin},zero_step")
    assert result.exit_code == 1, result.output
    assert result.stderr == f"tdxtrace: analyzer {plugin} failed: {error}\n"
    if fmt == "json":
        doc = json.loads(result.stdout)
        assert doc[plugin] == {"error": error}
        assert "metrics" in doc["zero_step"]
    else:
        assert f"FAILED: {error}" in result.stdout
        assert "== zero_step" in result.stdout


@pytest.mark.parametrize(("plugin", "error"), [
    ("bad_description", "TypeError: Odd.description cannot be read: RuntimeError: no "
                        "description today"),
    ("bad_thresholds", "TypeError: Odd.thresholds['m'] must be (warn_at, fail_at), two finite "
                       "numbers; got 5"),
    ("bad_key_metrics", "TypeError: Odd.key_metrics must be a tuple of str, got str"),
])
@pytest.mark.parametrize("command", ["analyze", "analyze-json", "report"])
def test_a_bad_plugin_attribute_fails_that_plugin_alone(
        trace: Path, plugins: Path, tmp_path: Path, plugin: str, error: str,
        command: str) -> None:
    args = {"analyze": ["analyze", trace], "analyze-json": ["analyze", trace, "--format", "json"],
            "report": ["report", trace, "-o", tmp_path / "r.html"]}[command]
    result = invoke(*args, "--plugins-dir", plugins, load=f"{plugin},zero_step")
    assert result.exit_code == 1, result.output
    assert_no_traceback(result.output)
    where = plugins / f"{plugin}.py"
    assert result.stderr == f"tdxtrace: plugin {plugin} failed ({where}): {error}\n"
    if command == "report":
        page = (tmp_path / "r.html").read_text()
        assert "zero_step" in page and f"plugin {plugin}" in page
    elif command == "analyze-json":
        assert "metrics" in json.loads(result.stdout)["zero_step"]
    else:
        assert "== zero_step" in result.stdout


class Described(Analyzer):
    name = "described"

    @property
    def description(self) -> str:  # type: ignore[override]
        raise RuntimeError("boom")

    def analyze(self, trace: Trace) -> AnalyzerResult:
        return AnalyzerResult(metrics={"m": 1})


class Plain(Analyzer):
    name = "plain"
    description = "works"

    def analyze(self, trace: Trace) -> AnalyzerResult:
        return AnalyzerResult(metrics={"m": 2})


def test_the_report_api_contains_an_attribute_that_raises() -> None:
    # Analyzers handed to the library directly were never checked by a plugin loader.
    trace = make_trace([])
    outcomes = run_analyzers(trace, [Described(), Plain()])
    assert [o.error for o in outcomes] == [None, None]
    rendered = render(trace, outcomes)
    assert rendered.failed == ("described",)
    assert "RuntimeError: boom" in rendered.html and "works" in rendered.html


def test_run_analyzers_survives_unreadable_columns() -> None:
    class NoColumns(Plain):
        name = "no_columns"

        @property
        def columns(self) -> tuple[str, ...]:  # type: ignore[override]
            raise RuntimeError("no columns")

    outcomes = run_analyzers(make_trace([]), [NoColumns(), Plain()])
    assert [(o.name, o.ok) for o in outcomes] == [("no_columns", True), ("plain", True)]
