"""Output problems: a clear one-line error, and nothing half-written left behind.

Covered for ``record`` (trace files) and ``report`` (HTML): an existing output (refused unless
``--force``), a folder that cannot hold files (a path under a regular file; a read-only
mount), a full disk (a small tmpfs, a file size limit in a child process, and an injected
write failure). After any failure the output path holds what it held before (nothing, or the
old file when ``--force`` was given) and no temporary file is left.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from cli_helpers import assert_one_line_error as _one_line_error
from cli_helpers import run_cli as _run
from click.testing import Result

SHORT = ("--set", "run.duration_us=3000")  # ~20k events, ~150 KB
BIG = ("--set", "run.duration_us=60000")  # well over 1 MB




def _only(folder: Path, *names: str) -> None:
    """``folder`` holds exactly ``names``: no .partial, no temporary report."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "run.arrow"
    assert _run("record", "zero-step", *SHORT, "-o", path).exit_code == 0
    return path


def _report(trace: Path, out: Path, *extra: str) -> Result:
    return _run("report", trace, "-a", "seamcall_latency", "-o", out, *extra)


# -- an existing output ----------------------------------------------------------------------

def test_record_refuses_an_existing_file_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "run.arrow"
    out.write_bytes(b"precious")
    _one_line_error(_run("record", "zero-step", *SHORT, "-o", out), out,
                    "already exists (use --force to overwrite it)")
    assert out.read_bytes() == b"precious"
    forced = _run("record", "zero-step", *SHORT, "-o", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert out.read_bytes().startswith(b"ARROW1")
    _only(tmp_path, "run.arrow")


def test_report_refuses_an_existing_file_unless_forced(trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("precious")
    _one_line_error(_report(trace, out), out, "already exists (use --force to overwrite it)")
    assert out.read_text() == "precious"
    assert _report(trace, out, "--force").exit_code == 0
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    _only(tmp_path, "report.html")


# -- a folder that cannot hold the output --------------------------------------------------------

def test_an_output_under_a_regular_file_is_refused(trace: Path, tmp_path: Path) -> None:
    # Tests run as root, which chmod does not stop; a path through a file stops everyone.
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "out.arrow"
    _one_line_error(_run("record", "zero-step", *SHORT, "-o", out), out,
                    f"folder {blocker} is not a folder")
    html = blocker / "report.html"
    _one_line_error(_report(trace, html), html,
                    f"cannot write the report (folder {blocker} is not a folder)")
    # demo creates its folder (reports/ by default): one line too, not a traceback.
    _one_line_error(_run("demo", "--out-dir", blocker / "sub"), blocker / "sub" / "demo.arrow",
                    f"cannot write: folder {blocker} is not a folder")
    _one_line_error(_run("demo", "--out-dir", "/dev/null"), Path("/dev/null/demo.arrow"),
                    "cannot write: folder /dev/null is not a folder")
    capsule = blocker / "run.capsule.json"
    _one_line_error(_run("capsule", trace, "-o", capsule), capsule,
                    f"cannot write: folder {blocker} is not a folder")
    _only(tmp_path, "file.txt")


def test_a_missing_output_folder_is_created_by_every_command(trace: Path,
                                                             tmp_path: Path) -> None:
    outputs = {"record": tmp_path / "a" / "b" / "run.arrow",
               "report": tmp_path / "c" / "report.html",
               "capsule": tmp_path / "d" / "e" / "run.capsule.json",
               "demo": tmp_path / "f" / "demo.html"}
    assert _run("record", "zero-step", *SHORT, "-o", outputs["record"]).exit_code == 0
    assert _report(trace, outputs["report"]).exit_code == 0
    assert _run("capsule", trace, "-o", outputs["capsule"]).exit_code == 0
    assert _run("demo", "--out-dir", outputs["demo"].parent).exit_code == 0
    for command, path in outputs.items():
        assert path.is_file() and path.stat().st_size > 0, command


def _mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "ro"
    if not _mount_tmpfs(folder, "ro,size=64k"):
        pytest.skip("cannot mount a tmpfs here (needs root in a mount namespace)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_folder_is_refused(trace: Path, read_only_folder: Path) -> None:
    out = read_only_folder / "run.arrow"
    _one_line_error(_run("record", "zero-step", *SHORT, "-o", out), out,
                    "cannot write: Read-only file system")
    html = read_only_folder / "report.html"
    _one_line_error(_report(trace, html), html, "cannot write the report (Read-only file system)")
    demo_dir = read_only_folder / "demo"
    _one_line_error(_run("demo", "--out-dir", demo_dir), demo_dir / "demo.arrow",
                    "cannot write: Read-only file system")
    _only(read_only_folder)


# -- a full disk -----------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "small"
    if not _mount_tmpfs(folder, "size=128k"):
        pytest.skip("cannot mount a tmpfs here (needs root in a mount namespace)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_while_recording_leaves_nothing(small_disk: Path) -> None:
    out = small_disk / "run.arrow"
    _one_line_error(_run("record", "fault-storm", *BIG, "-o", out), out,
                    "cannot write: No space left on device")
    _only(small_disk)


def test_a_full_disk_keeps_the_old_file_when_forced(small_disk: Path) -> None:
    out = small_disk / "run.arrow"
    out.write_bytes(b"precious")
    _one_line_error(_run("record", "fault-storm", *BIG, "-o", out, "--force"), out,
                    "No space left on device")
    assert out.read_bytes() == b"precious"
    _only(small_disk, "run.arrow")


def test_a_full_disk_while_writing_a_report_leaves_nothing(trace: Path,
                                                           small_disk: Path) -> None:
    (small_disk / "filler").write_bytes(b"x" * (128 * 1024 - 4096))
    html = small_disk / "report.html"
    _one_line_error(_report(trace, html), html,
                    "cannot write the report (No space left on device)")
    _only(small_disk, "filler")


def _limited(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("command", ["record", "report"])
def test_a_file_size_limit_is_a_clear_error(trace: Path, tmp_path: Path, command: str) -> None:
    # Python ignores SIGXFSZ, so going over RLIMIT_FSIZE is an EFBIG write error: the same
    # path as a full disk, with no mount needed.
    out = tmp_path / ("run.arrow" if command == "record" else "report.html")
    args = (["record", "fault-storm", *SHORT, "-o", str(out)] if command == "record" else
            ["report", str(trace), "-a", "seamcall_latency", "-o", str(out)])
    done = subprocess.run([sys.executable, "-m", "tdxtrace", *args], capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: _limited(16 * 1024))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"tdxtrace: error: {out}: ")
    assert "File too large" in done.stderr
    _only(tmp_path)


class _FailingSink:
    """A file that fails like a full disk once ``budget`` bytes have been written."""

    def __init__(self, path: str, mode: str, budget: int) -> None:
        self._file = open(path, mode)  # noqa: SIM115 (closed by close(), like pa.OSFile)
        self._budget = budget
        self.closed = False

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if size > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= size
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self.closed = True
        self._file.close()


@pytest.mark.parametrize("budget", [0, 4096, 100_000])
def test_an_injected_write_failure_leaves_nothing(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  budget: int) -> None:
    # Fails while writing the schema, the first batch, or a later one.
    monkeypatch.setattr(pa, "OSFile", lambda path, mode: _FailingSink(path, mode, budget))
    out = tmp_path / "run.arrow"
    _one_line_error(_run("record", "fault-storm", *SHORT, "-o", out), out,
                    "cannot write: No space left on device")
    _only(tmp_path)


def test_a_folder_it_may_not_look_into_is_one_error(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # As a user, Path.exists() raises PermissionError under a folder without x permission
    # (tests run as root, which permissions do not stop: the refusal is injected).
    from tdxtrace.errors import OutputError
    from tdxtrace.outputs import make_folder

    locked = tmp_path / "locked"
    real_exists = Path.exists

    def exists(self: Path, *args: Any, **kwargs: Any) -> bool:
        if self.is_relative_to(locked) and self != locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_exists(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    out = locked / "sub" / "demo.arrow"
    with pytest.raises(OutputError, match=f"^{out}: cannot write: Permission denied$"):
        make_folder(out)
