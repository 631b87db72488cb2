"""Odd option values and odd text in messages: a usage error or one line, never a traceback.

``--timeout nan``/``inf``/``1e300`` is a usage error naming the option, while a week is still
accepted; an error or warning quoting a newline (a file name, capsule metadata) stays one line,
the newline printed as ``\\n``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import invoke, record_zero_step
from replay_helpers import rewrite


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_zero_step(tmp_path_factory.mktemp("trace"))


# -- --timeout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "1e300", "604801"])
@pytest.mark.parametrize("command", ["analyze", "report"])
def test_timeout_refuses_nan_infinity_and_absurd_values(trace: Path, value: str,
                                                        command: str) -> None:
    result = invoke(command, trace, "--timeout", value)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("tdxtrace: error: --timeout: "), result.stderr
    assert f"(see tdxtrace {command} --help)" in result.stderr


def test_timeout_help_states_the_limit() -> None:
    result = invoke("analyze", "--help")
    assert "604800 = a week" in " ".join(result.stdout.split())


def test_a_large_but_sane_timeout_still_runs(trace: Path) -> None:
    result = invoke("analyze", trace, "-a", "zero_step", "--timeout", "604800")
    assert result.exit_code == 0, result.output


# -- one line, whatever the message quotes -------------------------------------------------------

def test_a_newline_in_a_file_name_stays_on_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "nl\nname.arrow"
    result = invoke("info", path)
    assert result.exit_code == 2
    assert result.stderr == f"tdxtrace: error: {tmp_path}/nl\\nname.arrow: does not exist\n"


def test_a_newline_in_capsule_metadata_stays_on_one_error_line(trace: Path,
                                                                tmp_path: Path) -> None:
    capsule = tmp_path / "run.capsule.json"
    assert invoke("capsule", trace, "-o", capsule).exit_code == 0
    doc = json.loads(capsule.read_text())
    doc["tdxtrace_version"] = "0.0.1\nsecond\x1b[31m line"
    capsule.write_text(json.dumps(doc))
    result = invoke("replay", "--capsule", capsule)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "written by tdxtrace 0.0.1\\nsecond\\x1b[31m line" in result.stderr


def test_warnings_quoting_a_newline_stay_one_line_each(trace: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut\nshort.arrow"
    data = rewrite(trace, tmp_path / "small-batches.arrow").read_bytes()  # 1000 events each
    cut.write_bytes(data[: len(data) * 2 // 3])  # no footer: unfinished, with warnings
    result = invoke("analyze", cut, "-a", "zero_step")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("tdxtrace: warning: ") for line in lines), lines
    assert all("cut\\nshort.arrow" in line for line in lines)


def test_report_strict_refuses_a_trace_with_warnings_and_writes_nothing(
        trace: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.arrow"
    data = rewrite(trace, tmp_path / "small.arrow").read_bytes()  # 1000-event batches
    cut.write_bytes(data[: len(data) * 2 // 3])  # unfinished, some events readable
    page = tmp_path / "cut.html"
    lenient = invoke("report", cut, "-o", page, load="zero_step")
    assert lenient.exit_code == 0 and page.is_file()
    page.unlink()
    strict = invoke("report", cut, "-o", page, "--strict", load="zero_step")
    assert strict.exit_code == 2 and not page.exists()
    assert strict.stderr.splitlines()[-1] == (
        f"tdxtrace: error: {cut}: --strict: the trace has 2 warning(s), above; nothing was "
        "analyzed")
