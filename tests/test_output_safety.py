"""Output files are placed safely: never through a special file, never over an input, never raced.

Every command that writes a file (``record``, ``report``, ``capsule``, ``schema --export``)
refuses, with one line naming the path, an output that exists and is not a regular file (a
FIFO, a symbolic link, a directory), and an output that is the same file as its input, even
with ``--force``. Runs write to a unique ``.NAME.<random>.partial`` and claim ``NAME``
atomically, so two runs to one name cannot mix their files, and a user's own ``NAME.partial``
is never touched. (No test touches /dev/null or /dev/full: a FIFO is the same kind of refusal.)
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from cli_helpers import assert_one_line_error as _one_line_error
from cli_helpers import run_cli as _run
from click.testing import Result

import tdxtrace.sim.emulator as emulator
from tdxtrace.commands.schema_cmd import TEXT_FILE
from tdxtrace.trace import open_trace

SHORT = ("--set", "run.duration_us=2000")  # ~3k events, ~50 KB




def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "run.arrow"
    assert _run("record", "zero-step", *SHORT, "-o", path).exit_code == 0
    return path


def _write(command: str, trace: Path, out: Path) -> Result:
    """Run ``command`` with ``-o out --force``: the most permissive way to write ``out``."""
    args: dict[str, list[str | Path]] = {
        "record": ["record", "zero-step", *SHORT],
        "report": ["report", trace, "-a", "seamcall_latency"],
        "capsule": ["capsule", trace],
    }
    return _run(*args[command], "-o", out, "--force")


# -- bug 1: an output that exists and is not a regular file ------------------------------------

def _fifo(path: Path) -> Callable[[], None]:
    os.mkfifo(path)
    return lambda: None if stat.S_ISFIFO(os.lstat(path).st_mode) else pytest.fail("not a fifo")


def _symlink(path: Path) -> Callable[[], None]:
    target = path.with_name("target.txt")
    target.write_text("the link's target")
    path.symlink_to(target.name)

    def unchanged() -> None:
        assert path.is_symlink() and os.readlink(path) == target.name
        assert target.read_text() == "the link's target"

    return unchanged


def _directory(path: Path) -> Callable[[], None]:
    path.mkdir()
    (path / "inside").write_text("kept")
    return lambda: None if (path / "inside").read_text() == "kept" else pytest.fail("changed")


@pytest.mark.parametrize("command", ["record", "report", "capsule"])
@pytest.mark.parametrize(("make", "problem"), [
    (_fifo, "is a FIFO (named pipe), not a regular file; refusing to replace it"),
    (_symlink, "is a symbolic link; refusing to replace it"),
    (_directory, "is a directory, not a regular file; refusing to replace it"),
], ids=["fifo", "symlink", "directory"])
def test_an_output_that_is_not_a_regular_file_is_refused_even_with_force(
        trace: Path, tmp_path: Path, command: str,
        make: Callable[[Path], Callable[[], None]], problem: str) -> None:
    out = tmp_path / "out"
    still_the_same = make(out)
    before = sorted(p.name for p in tmp_path.iterdir())
    _one_line_error(_write(command, trace, out), out, problem)
    still_the_same()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file left


@pytest.mark.parametrize("make", [_fifo, _symlink], ids=["fifo", "symlink"])
def test_schema_export_refuses_a_special_file_in_the_folder(
        tmp_path: Path, make: Callable[[Path], Callable[[], None]]) -> None:
    out = tmp_path / TEXT_FILE
    still_the_same = make(out)
    result = _run("schema", "--export", tmp_path)
    _one_line_error(result, out, "refusing to replace it")
    still_the_same()
    assert _temp_files(tmp_path) == []


# -- bug 2: an output that is the input ---------------------------------------------------------

@pytest.mark.parametrize("command", ["report", "capsule"])
@pytest.mark.parametrize("spelling", ["same name", "hard link", "input via symlink"])
@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
def test_an_output_that_is_the_input_trace_is_refused(
        trace: Path, tmp_path: Path, command: str, spelling: str, force: bool) -> None:
    copy = tmp_path / "t.arrow"
    copy.write_bytes(trace.read_bytes())
    before = copy.read_bytes()
    source, out = copy, copy
    if spelling == "hard link":
        out = tmp_path / "other-name.arrow"
        os.link(copy, out)
    elif spelling == "input via symlink":
        source = tmp_path / "link.arrow"
        source.symlink_to(copy.name)
    args: list[str | Path] = [command, source, "-o", out, *(["--force"] if force else [])]
    if command == "report":
        args[2:2] = ["-a", "seamcall_latency"]
    _one_line_error(_run(*args), out, "refusing to overwrite it (even with --force)")
    assert copy.read_bytes() == before
    assert open_trace(copy).finished
    assert _temp_files(tmp_path) == []


def test_record_refuses_to_overwrite_its_scenario_file(tmp_path: Path) -> None:
    scenario = tmp_path / "mine.toml"
    builtin = Path(emulator.__file__).parent.parent / "scenarios" / "zero-step.toml"
    scenario.write_bytes(builtin.read_bytes())
    before = scenario.read_bytes()
    result = _run("record", scenario, *SHORT, "-o", scenario, "--force")
    _one_line_error(result, scenario, "is the input; refusing to overwrite it")
    assert scenario.read_bytes() == before


# -- bug 3: unique temporary files, no-clobber publishing ---------------------------------------

def test_two_records_to_one_name_one_wins_and_the_other_says_exists(tmp_path: Path) -> None:
    # Real processes, started together; whichever loses (at the first check or when
    # publishing) gets the same one-line error and leaves nothing behind.
    children = [subprocess.Popen(
        [sys.executable, "-m", "tdxtrace", "record", "zero-step", "--set",
         "run.duration_us=20000", "--seed", str(seed), "-o", "run.arrow"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in (1, 2)]
    outputs = [child.communicate(timeout=120) for child in children]
    done = [(child.returncode, *output) for child, output in zip(children, outputs, strict=True)]
    winners = [out for code, out, _ in done if code == 0]
    losers = [err for code, _, err in done if code != 0]
    assert len(winners) == 1 and len(losers) == 1, done
    assert [code for code, _, _ in done].count(2) == 1
    assert losers[0] == ("tdxtrace: error: run.arrow: already exists (use --force to "
                         "overwrite it)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.arrow"]
    summary = open_trace(tmp_path / "run.arrow").summary
    assert summary is not None and winners[0].endswith(f"{summary.digest}\n")


def _taking_the_name(monkeypatch: pytest.MonkeyPatch, out: Path, seen: list[str]) -> None:
    """Make another writer finish ``out`` while this run is still recording."""
    real = emulator.run_scenario

    def run_scenario(*args: Any, **options: Any) -> dict[str, Any]:
        truth = real(*args, **options)
        seen.extend(_temp_files(out.parent))
        out.write_bytes(b"the other run's trace")
        return truth

    monkeypatch.setattr(emulator, "run_scenario", run_scenario)


def test_a_name_taken_during_the_run_is_not_overwritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run.arrow"
    seen: list[str] = []
    _taking_the_name(monkeypatch, out, seen)
    _one_line_error(_run("record", "zero-step", *SHORT, "-o", out), out,
                    "already exists (use --force to overwrite it)")
    assert out.read_bytes() == b"the other run's trace"
    assert len(seen) == 1 and seen[0].startswith(".run.arrow.")  # the run's own temporary file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.arrow"]


def test_force_replaces_a_name_taken_during_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run.arrow"
    _taking_the_name(monkeypatch, out, [])
    assert _run("record", "zero-step", *SHORT, "-o", out, "--force").exit_code == 0
    assert open_trace(out).finished
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.arrow"]


def test_an_interrupted_record_whose_name_was_taken_says_its_events_were_not_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run.arrow"
    real = emulator.run_scenario

    def run_scenario(scenario: Any, seed: int, sink: Any, progress: Any = None,
                     **options: Any) -> Any:
        real(scenario, seed, sink, progress, **options)  # an unfinished trace to keep
        out.write_bytes(b"the other run's trace")
        raise KeyboardInterrupt  # Ctrl-C after another process took the name

    monkeypatch.setattr(emulator, "run_scenario", run_scenario)
    result = _run("record", "zero-step", *SHORT, "-o", out)
    assert result.exit_code == 130
    assert result.stderr == (f"tdxtrace: interrupted: another file took the name {out} during "
                             "the run; the events recorded so far were not kept\n")
    assert out.read_bytes() == b"the other run's trace"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.arrow"]


def _no_hard_links(src: object, dst: object, *args: object, **kwargs: object) -> None:
    raise OSError(errno.EPERM, os.strerror(errno.EPERM))  # what FAT says


def test_without_hard_links_the_name_is_still_claimed_exclusively(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "link", _no_hard_links)
    out = tmp_path / "run.arrow"
    assert _run("record", "zero-step", *SHORT, "-o", out).exit_code == 0
    assert open_trace(out).finished
    taken = tmp_path / "taken.arrow"
    _taking_the_name(monkeypatch, taken, [])
    _one_line_error(_run("record", "zero-step", *SHORT, "-o", taken), taken, "already exists")
    assert taken.read_bytes() == b"the other run's trace"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.arrow", "taken.arrow"]


def test_a_users_own_partial_file_is_left_alone(tmp_path: Path) -> None:
    mine = tmp_path / "X.arrow.partial"
    mine.write_bytes(b"my notes, not tdxtrace's")
    result = _run("record", "zero-step", *SHORT, "-o", tmp_path / "X.arrow")
    assert result.exit_code == 0, result.output
    assert mine.read_bytes() == b"my notes, not tdxtrace's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.arrow", "X.arrow.partial"]


def test_an_interrupted_record_keeps_the_unfinished_trace_under_its_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C after the first batch, injected (tests/test_interrupt.py sends a real signal).
    real = emulator.run_scenario

    def run_scenario(scenario: Any, seed: int, sink: Callable[[pa.RecordBatch], None],
                     progress: Any = None, **options: Any) -> dict[str, Any]:
        def first_then_ctrl_c(batch: pa.RecordBatch) -> None:
            sink(batch)
            raise KeyboardInterrupt

        return real(scenario, seed, first_then_ctrl_c, progress, **options)

    monkeypatch.setattr(emulator, "run_scenario", run_scenario)
    (tmp_path / "run.arrow.partial").write_bytes(b"mine")
    out = tmp_path / "run.arrow"
    result = _run("record", "zero-step", *SHORT, "-o", out)
    assert result.exit_code == 130
    assert result.stderr == (f"tdxtrace: interrupted: {out} keeps the events recorded so far "
                             "and is marked unfinished\n")
    trace = open_trace(out)
    assert not trace.finished and trace.num_events() > 0
    assert (tmp_path / "run.arrow.partial").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.arrow", "run.arrow.partial"]


def test_traces_stay_byte_identical_and_readable_by_others(tmp_path: Path) -> None:
    first, second = tmp_path / "a.arrow", tmp_path / "b.arrow"
    assert _run("record", "zero-step", *SHORT, "-o", first).exit_code == 0
    assert _run("record", "zero-step", *SHORT, "-o", second).exit_code == 0
    assert first.read_bytes() == second.read_bytes()
    old_mask = os.umask(0o022)
    os.umask(old_mask)
    # Not mkstemp's private 0o600: what open() would have made under the umask.
    assert stat.S_IMODE(first.stat().st_mode) == 0o666 & ~old_mask


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_honour_the_umask(tmp_path: Path, mask: int) -> None:
    trace, capsule = tmp_path / "a.arrow", tmp_path / "a.capsule.json"
    old_mask = os.umask(mask)
    try:
        assert _run("record", "zero-step", *SHORT, "-o", trace).exit_code == 0
        assert _run("capsule", trace, "-o", capsule).exit_code == 0
    finally:
        os.umask(old_mask)
    for path in (trace, capsule):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
