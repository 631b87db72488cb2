"""Hand-made inputs: deep nesting, special files as capsules, odd scenario and trace files.

Each is one line on stderr naming the file and the key at fault, exit status 2; never a
RecursionError traceback, a hang, or a read of an endless file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from cli_helpers import record_zero_step
from click.testing import CliRunner, Result
from replay_helpers import rewrite

from tdxtrace.cli import main
from tdxtrace.schema import META_POLICIES, META_SCENARIO, META_SEED, SUMMARY_TRUTH

DEEP = "[" * 20000 + "]" * 20000


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_zero_step(tmp_path_factory.mktemp("trace"))


@pytest.fixture(scope="module")
def capsule(trace: Path) -> dict[str, object]:
    path = trace.with_name("run.capsule.json")
    assert invoke("capsule", trace, "-o", path).exit_code == 0
    doc: dict[str, object] = json.loads(path.read_text())
    return doc


def invoke(*args: str | Path, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="tdxtrace", env=env)


def assert_one_line(result: Result, *named: str) -> str:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    line = result.stderr
    assert line.startswith("tdxtrace: error: ") and "Traceback" not in line, line
    for text in named:
        assert text in line, line
    return line


# -- nesting -------------------------------------------------------------------------------------

def test_a_scenario_nested_5000_deep(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text('name = "deep"\n# [[[ a comment\ns = "[[["\nx = ' + "[" * 5000 + "]" * 5000)
    assert_one_line(invoke("record", path, "-o", tmp_path / "o.arrow"),
                    f"{path}: line 4: x: ", "nested more than 64 levels deep")
    assert sorted(os.listdir(tmp_path)) == ["deep.toml"]


def test_a_scenario_nested_deep_in_a_table_and_by_dotted_keys(tmp_path: Path) -> None:
    braces = tmp_path / "braces.toml"
    braces.write_text("[run]\nduration_us = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n")
    assert_one_line(invoke("record", braces), f"{braces}: line 2: run.duration_us: ")
    dotted = tmp_path / "dotted.toml"
    dotted.write_text("[run]\nduration_us." + ".".join(["a"] * 3000) + " = 1\n")
    assert_one_line(invoke("record", dotted), f"{dotted}: run.duration_us.a.a",
                    "nested more than 64 levels deep")


def test_a_set_value_nested_5000_deep() -> None:
    value = "[" * 5000 + "]" * 5000
    assert_one_line(invoke("record", "zero-step", "--set", f"run.duration_us={value}"),
                    "--set run.duration_us: the value is nested more than 64 levels deep")


def _replace(key: str, value: str) -> Callable[[dict[str, str]], dict[str, str]]:
    return lambda meta: {**meta, key: value}


@pytest.mark.parametrize(("key", "where"), [
    (META_POLICIES, "metadata"), (META_SCENARIO, "metadata"), (SUMMARY_TRUTH, "summary")])
@pytest.mark.parametrize("command", ["info", "analyze", "replay", "capsule", "report"])
def test_trace_metadata_nested_20000_deep(trace: Path, tmp_path: Path, key: str, where: str,
                                          command: str) -> None:
    path = tmp_path / "deep.arrow"
    changes = {where: _replace(key, DEEP)}
    rewrite(trace, path, **changes)  # type: ignore[arg-type]
    assert_one_line(invoke(command, path), f"{path}: ",
                    f"metadata {key}: values are nested more than 64 levels deep")


def test_a_capsule_nested_deep(capsule: dict[str, object], tmp_path: Path) -> None:
    path = tmp_path / "deep.capsule.json"
    path.write_text(json.dumps({**capsule, "truth": {"x": 1}}).replace('"x": 1', f'"x": {DEEP}'))
    assert_one_line(invoke("replay", "--capsule", path),
                    f"{path}: capsule: values are nested more than 64 levels deep (under key "
                    "'truth')")


# -- not JSON numbers ---------------------------------------------------------------------------

@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_truth_counters_that_are_not_json_numbers_are_refused(trace: Path, tmp_path: Path,
                                                              number: str) -> None:
    path = tmp_path / "nan.arrow"
    rewrite(trace, path, summary=_replace(SUMMARY_TRUTH, f'{{"faults": {number}}}'))
    for command in ("info", "capsule"):
        assert_one_line(invoke(command, path, *(["--json"] if command == "info" else [])),
                        f"{path}: damaged summary: metadata {SUMMARY_TRUTH}: ", number)


def test_a_capsule_holding_nan_is_refused(capsule: dict[str, object], tmp_path: Path) -> None:
    path = tmp_path / "nan.capsule.json"
    path.write_text(json.dumps({**capsule, "truth": {"faults": float("nan")}}))
    assert_one_line(invoke("replay", "--capsule", path),
                    f"{path}: capsule: NaN is not a JSON number")


# -- capsules that are not small regular files ---------------------------------------------------

def _replay_capsule(path: Path | str) -> subprocess.CompletedProcess[str]:
    # A child process with a time limit: the old code blocked on a FIFO forever.
    return subprocess.run([sys.executable, "-m", "tdxtrace", "replay", "--capsule", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_a_fifo_as_capsule_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "f.cap"
    os.mkfifo(fifo)
    done = _replay_capsule(fifo)
    assert done.returncode == 2
    assert done.stderr == f"tdxtrace: error: {fifo}: not a regular file\n"


def test_dev_zero_as_capsule_is_refused_without_reading_it() -> None:
    done = _replay_capsule("/dev/zero")
    assert done.returncode == 2
    assert done.stderr == "tdxtrace: error: /dev/zero: not a regular file\n"


def test_a_huge_file_as_capsule_is_refused_before_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    with open(path, "wb") as out:
        out.truncate(5 << 20)  # sparse: nothing to read, it is refused on its size
    assert_one_line(invoke("replay", "--capsule", path),
                    f"{path}: not a tdxtrace capsule (larger than 4 MiB")


def test_a_directory_as_capsule(tmp_path: Path) -> None:
    assert_one_line(invoke("replay", "--capsule", tmp_path),
                    f"{tmp_path}: is a directory, not a capsule file")


# -- smaller things -------------------------------------------------------------------------------

def test_capsule_of_a_trace_without_a_seed_says_so(trace: Path, tmp_path: Path) -> None:
    path = tmp_path / "seedless.arrow"
    rewrite(trace, path, metadata=_replace(META_SEED, ""))
    line = assert_one_line(invoke("capsule", path), f"{path}: cannot make a capsule: no seed "
                           f"(metadata {META_SEED} is empty)")
    assert "no scenario" not in line


def test_a_directory_named_like_a_scenario_file(tmp_path: Path) -> None:
    folder = tmp_path / "dir.toml"
    folder.mkdir()
    assert_one_line(invoke("record", folder), f"{folder}: is a directory, not a scenario file")


def test_a_scenario_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbfname = "bom"\n[run]\nduration_us = 1500\n')
    result = invoke("record", path, "-o", tmp_path / "bom.arrow")
    assert result.exit_code == 0, result.output
    info = invoke("info", tmp_path / "bom.arrow", "--json")
    assert json.loads(info.stdout)["scenario"] == "bom"


def test_an_arrow_stream_is_told_from_other_files(trace: Path, tmp_path: Path) -> None:
    path = tmp_path / "stream.arrow"
    table = ipc.open_file(str(trace)).read_all()
    with pa.OSFile(str(path), "wb") as sink, ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert_one_line(invoke("info", path), f"{path}: not an Arrow IPC file (bad magic); it "
                    "looks like an Arrow IPC stream, not the Arrow IPC file format")


@pytest.mark.parametrize("value", ["-5", "-1", "1.5", "lots"])
def test_a_bad_decode_budget_is_an_error_naming_the_variable(trace: Path, value: str) -> None:
    assert_one_line(invoke("analyze", trace, env={"TDXTRACE_DECODE_BUDGET_MB": value}),
                    f"TDXTRACE_DECODE_BUDGET_MB={value!r}: expected a whole number of "
                    "megabytes, 0 or more")


def test_a_zero_decode_budget_is_allowed(trace: Path) -> None:
    result = invoke("analyze", trace, "-a", "zero_step",
                    env={"TDXTRACE_DECODE_BUDGET_MB": "0"})
    assert result.exit_code == 0, result.output
