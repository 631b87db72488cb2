"""Failing plugins are isolated: reported in the output and the report, the rest still runs.

Plugins from a ``--plugins-dir`` that fail in every way a plugin can: an analyzer that
raises, one that returns the wrong type or a malformed result, one that never returns, a
``register_analyzers`` that raises, a file that fails to import. Each failure is one line on
stderr naming the analyzer or plugin, an ``error`` entry in ``analyze --format json`` and a
failed section in the report; every other analyzer's figures are still there; the exit status
is 1 (as ``--help`` documents), and 2 is kept for bad input.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import record_zero_step, write_plugins
from click.testing import CliRunner, Result

from tdxtrace.cli import main

HEADER = '''
import sys
import time

from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult
'''

GOOD = HEADER + '''
class Counts(Analyzer):
    name = "counts"
    description = "events in the trace"

    def analyze(self, trace):
        return AnalyzerResult(metrics={"events": trace.observable().collect().height})


@hookimpl
def register_analyzers():
    return [Counts()]
'''


def _analyzer_plugin(name: str, body: str) -> str:
    return HEADER + f'''
class Broken(Analyzer):
    name = "{name}"
    description = "fails on purpose"

    def analyze(self, trace):
{body}


@hookimpl
def register_analyzers():
    return [Broken()]
'''


PLUGINS = {
    "good": GOOD,
    "raises": _analyzer_plugin("raises", '        raise ValueError("no TD_EXIT rows\\nat all")'),
    "wrong_type": _analyzer_plugin("wrong_type", '        return {"events": 3}'),
    "nan_metric": _analyzer_plugin(
        "nan_metric", '        return AnalyzerResult(metrics={"ratio": float("nan")})'),
    "import_fails": "import tdxtrace_no_such_module  # noqa\n",
    "syntax_error": "def register_analyzers(:\n",
    "register_raises": HEADER + '''
@hookimpl
def register_analyzers():
    raise RuntimeError("cannot build my analyzers")
''',
}

ERRORS = {
    "raises": "ValueError: no TD_EXIT rows at all",
    "wrong_type": "TypeError: wrong_type.analyze() returned dict, expected AnalyzerResult",
    "nan_metric": "ValueError: nan_metric: metric 'ratio' is nan (JSON numbers only)",
}
PLUGIN_ERRORS = {
    "import_fails": "ModuleNotFoundError: No module named 'tdxtrace_no_such_module'",
    "syntax_error": "SyntaxError:",
    "register_raises": "RuntimeError: cannot build my analyzers",
}


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_zero_step(tmp_path_factory.mktemp("trace"), 3000)


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_plugins(tmp_path_factory.mktemp("plugins"), PLUGINS)


def _stderr_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line]


def test_analyze_reports_each_failure_and_still_runs_the_others(trace: Path,
                                                                plugins: Path) -> None:
    result = CliRunner().invoke(main, ["analyze", str(trace), "--plugins-dir", str(plugins),
                                       "--format", "json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    for name, error in ERRORS.items():
        assert doc[name] == {"error": error}
    # The working analyzers, built-in and from the folder, are all there with their figures.
    assert doc["counts"]["metrics"]["events"] > 1000
    builtins = {"busy_retry", "mapgpa", "seamcall_latency", "teardown_latency", "zap_scope",
                "zero_step"}
    assert builtins <= set(doc)
    assert all("metrics" in doc[name] for name in builtins)
    lines = _stderr_lines(result)
    for name, error in ERRORS.items():
        assert f"tdxtrace: analyzer {name} failed: {error}" in lines
    for name, error in PLUGIN_ERRORS.items():
        line = next(x for x in lines if x.startswith(f"tdxtrace: plugin {name} failed ("))
        assert error in line and str(plugins) in line
    assert len(lines) == len(ERRORS) + len(PLUGIN_ERRORS)  # one line each, no traceback
    assert "Traceback" not in result.output


def test_the_report_shows_each_failure_as_a_failed_section(trace: Path, plugins: Path,
                                                           tmp_path: Path) -> None:
    html = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", str(trace), "--plugins-dir", str(plugins),
                                       "-o", str(html)])
    assert result.exit_code == 1, result.output
    assert result.stdout.strip() == str(html)
    page = html.read_text(encoding="utf-8")
    sections = {part.split('"', 1)[0]: part for part in page.split('<section id="')[1:]}
    expected = {**{f"a-{n}": e for n, e in ERRORS.items()},
                **{f"a-plugin-{n}": e for n, e in PLUGIN_ERRORS.items()}}
    failed = {anchor for anchor, text in sections.items() if 'class="error-box"' in text}
    assert failed == set(expected)
    for anchor, error in expected.items():
        assert error.replace("'", "&#39;") in sections[anchor], anchor
    for name in ("counts", "seamcall_latency", "busy_retry"):  # still analyzed and shown
        assert sections[f"a-{name}"].startswith(f'a-{name}" class="analyzer analyzer-ok"')
    assert "Traceback" not in result.output


def test_only_a_working_analyzer_selected_exits_zero(trace: Path, plugins: Path) -> None:
    # Failures are reported where they happen: an analyzer that was not asked for does not
    # run, but a plugin that failed to load is still reported (it may be why a name is
    # unknown), so the status stays 1.
    result = CliRunner().invoke(main, ["analyze", str(trace), "--plugins-dir", str(plugins),
                                       "-a", "counts", "--format", "json"])
    assert set(json.loads(result.stdout)) == {"counts"}
    assert result.exit_code == 1
    good_only = plugins.parent / "good-only"
    good_only.mkdir(exist_ok=True)
    (good_only / "good.py").write_text(GOOD)
    clean = CliRunner().invoke(main, ["analyze", str(trace), "--plugins-dir", str(good_only),
                                      "-a", "counts"])
    assert clean.exit_code == 0 and clean.stderr == ""


def test_the_exit_status_rule_is_documented() -> None:
    for command in ("analyze", "report"):
        text = CliRunner().invoke(main, [command, "--help"]).output
        assert "Exit status: 0" in text
        assert "1 " in text and "2 bad input" in text


def test_bad_input_is_status_2_not_1(trace: Path, plugins: Path) -> None:
    unknown = CliRunner().invoke(main, ["analyze", str(trace), "-a", "no_such_analyzer"])
    assert unknown.exit_code == 2
    assert _stderr_lines(unknown)[-1].startswith("tdxtrace: error: unknown analyzer")
    missing = CliRunner().invoke(main, ["analyze", str(trace), "--plugins-dir",
                                        str(plugins / "nope")])
    assert missing.exit_code == 2


def test_an_analyzer_calling_sys_exit_is_isolated_too(trace: Path, tmp_path: Path) -> None:
    (tmp_path / "exits.py").write_text(_analyzer_plugin("exits", "        sys.exit(0)"))
    (tmp_path / "good.py").write_text(GOOD)
    result = CliRunner().invoke(main, ["analyze", str(trace), "--plugins-dir", str(tmp_path),
                                       "--format", "json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["exits"] == {"error": "SystemExit: 0"} and "counts" in doc


HANGS = _analyzer_plugin("hangs", "        time.sleep(3600)")


def test_an_analyzer_that_never_returns_is_stopped_by_the_timeout(trace: Path,
                                                                  tmp_path: Path) -> None:
    (tmp_path / "hangs.py").write_text(HANGS)
    (tmp_path / "good.py").write_text(GOOD)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tdxtrace", "analyze", str(trace),
                           "--plugins-dir", str(tmp_path), "--timeout", "2", "-a", "hangs",
                           "-a", "counts", "--format", "json"],
                          capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert doc["hangs"]["error"].startswith("timed out after 2 s")
    assert doc["counts"]["metrics"]["events"] > 1000
    assert "tdxtrace: analyzer hangs failed: timed out after 2 s" in done.stderr
