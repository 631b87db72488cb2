"""File names tdxtrace did not expect: bytes that are not UTF-8, and names near the length limit.

A trace named ``bad\\xff.arrow`` (legal on Linux, whose names are bytes) is read by every
command, printed as ``bad\\xff.arrow``; ``record`` writes one, and writes into a folder with
such a name. A 251-byte output name (legal: the limit is 255) is written by ``record``,
``report`` and ``capsule``, whose hidden temporary name is shortened to fit. ``demo`` checks
both of its outputs before recording.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import record_zero_step
from click.testing import CliRunner, Result

from tdxtrace.cli import main
from tdxtrace.errors import one_line

BAD = b"bad\xff.arrow"


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record_zero_step(tmp_path_factory.mktemp("trace"))


def tdxtrace(*args: str | bytes | Path, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """The real command with byte arguments, as a shell passes them; output as bytes."""
    return subprocess.run([sys.executable, "-m", "tdxtrace", *args], cwd=cwd,
                          capture_output=True, timeout=300,
                          env={**os.environ, "TDXTRACE_LOAD_PLUGINS": "zero_step"})


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="tdxtrace")


def names(folder: Path) -> list[bytes]:
    return sorted(os.listdir(os.fsencode(folder)))


@pytest.fixture
def bad_copy(trace: Path, tmp_path: Path) -> Path:
    (tmp_path / os.fsdecode(BAD)).write_bytes(trace.read_bytes())
    return tmp_path


@pytest.mark.parametrize("args", [
    [b"info", BAD], [b"info", BAD, b"--json"], [b"analyze", BAD], [b"replay", BAD],
    [b"analyze", BAD, b"--format", b"json"], [b"report", BAD, b"-o", b"r.html"],
    [b"capsule", BAD],
], ids=lambda a: " ".join(x.decode(errors="replace") for x in a))
def test_every_command_reads_a_trace_whose_name_is_not_utf8(bad_copy: Path,
                                                            args: list[bytes]) -> None:
    done = tdxtrace(*args, cwd=bad_copy)
    assert done.returncode == 0, done.stderr
    assert b"Traceback" not in done.stderr and b"Error" not in done.stderr, done.stderr
    if args[0] in (b"info", b"capsule") and b"--json" not in args:
        assert b"bad\\xff.arrow" in done.stdout  # the byte, spelled out
    if args[0] == b"capsule":
        assert BAD + b".capsule.json" in names(bad_copy)


def test_the_report_of_such_a_trace_names_it_readably(bad_copy: Path) -> None:
    done = tdxtrace(b"report", BAD, b"-o", b"r.html", cwd=bad_copy)
    assert done.returncode == 0, done.stderr
    assert "bad\\xff.arrow" in (bad_copy / "r.html").read_text(encoding="utf-8")


def test_an_error_about_such_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / os.fsdecode(BAD)).write_bytes(b"not a trace at all")
    done = tdxtrace(b"info", BAD, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == (b"tdxtrace: error: bad\\xff.arrow: not an Arrow IPC file "
                           b"(bad magic)\n")


@pytest.mark.parametrize(("args", "shown"), [
    ([b"record", b"bad\xffname"], b"unknown scenario 'bad\\xffname'"),
    ([b"record", b"zero-step", b"--set", b"td.vcpus=\xff"], b"got '\\xff'"),
    ([b"analyze", BAD, b"-a", b"zz\xffq"], b"unknown analyzer 'zz\\xffq'"),
    ([b"report", BAD, b"--threshold", b"zero_step.in\xff=1:2"], b"no metric 'in\\xff'"),
], ids=["scenario", "set", "analyzer", "threshold"])
def test_a_value_quoted_in_an_error_spells_its_byte_as_on_disk(
        bad_copy: Path, args: list[bytes], shown: bytes) -> None:
    # repr() would say \udcff, Python's stand-in, which no shell or file system uses.
    done = tdxtrace(*args, cwd=bad_copy)
    assert done.returncode == 2
    assert done.stderr.count(b"\n") == 1 and shown in done.stderr, done.stderr
    assert b"udc" not in done.stderr


def test_one_line_keeps_a_backslash_that_was_text() -> None:
    assert one_line(repr("a\\udcff")) == "'a\\\\udcff'"  # typed: a, backslash, udcff
    assert one_line(repr("a\\\udcff")) == "'a\\\\\\xff'"  # a backslash, then the byte


def test_record_writes_a_trace_whose_name_is_not_utf8_and_leaves_nothing_else(
        tmp_path: Path) -> None:
    for force in ([], [b"--force"]):  # a second run replaces it, with no stray files either
        done = tdxtrace(b"record", b"zero-step", b"--set", b"run.duration_us=1500",
                        b"-o", b"r\xff.arrow", *force, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(b"r\\xff.arrow: "), done.stdout
        assert names(tmp_path) == [b"r\xff.arrow"]
    assert tdxtrace(b"info", b"r\xff.arrow", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("args", [
    [b"record", b"zero-step", b"--set", b"run.duration_us=1500", b"-o", b"d\xff/run.arrow"],
    [b"demo", b"--out-dir", b"d\xff"],
])
def test_a_trace_is_written_in_a_folder_whose_name_is_not_utf8(
        tmp_path: Path, args: list[bytes]) -> None:
    # Arrow is given the temporary file's name as bytes: a str with a surrogate escape made it
    # raise UnicodeEncodeError and leave the temporary file behind.
    if args[0] == b"record":
        os.mkdir(os.path.join(os.fsencode(tmp_path), b"d\xff"))
    done = tdxtrace(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / os.fsdecode(b"d\xff")
    written = names(folder)
    assert b"run.arrow" in written or b"demo.arrow" in written, written
    assert not [n for n in written if n.endswith(b".partial")]


LONG = "n" * 245  # + ".arrow" = 251 bytes: legal, and the old temporary name was 269


def test_record_report_and_capsule_write_a_251_byte_name(trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    recorded = invoke("record", "zero-step", "--set", "run.duration_us=1500",
                      "-o", out / f"{LONG}.arrow")
    assert recorded.exit_code == 0, recorded.output
    reported = invoke("report", trace, "-o", out / f"{LONG}.html")
    assert reported.exit_code == 0, reported.output
    capsuled = invoke("capsule", trace, "-o", out / f"{LONG}.caps")
    assert capsuled.exit_code == 0, capsuled.output
    assert sorted(os.listdir(out)) == [f"{LONG}.arrow", f"{LONG}.caps", f"{LONG}.html"]


def test_the_shortened_temporary_name_stays_hidden_and_unique(tmp_path: Path) -> None:
    import tdxtrace.trace  # noqa: F401  (tdxtrace.outputs is imported through it)
    from tdxtrace.outputs import NAME_MAX, create_temp

    made = []
    for name in (LONG + ".arrow", "é" * 124 + ".arrow", os.fsdecode(b"x\xff" * 126)):
        for _ in range(2):
            fd, temp = create_temp(tmp_path / name)
            os.close(fd)
            made.append(temp)
            assert temp.name.startswith(".") and temp.name.endswith(".partial")
            assert len(os.fsencode(temp.name)) <= NAME_MAX
            temp.name.encode("utf-8")  # Arrow can open it by name
    assert len(set(made)) == len(made)


def test_demo_checks_both_outputs_before_recording(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    out.mkdir()
    (out / "demo.arrow").write_bytes(b"the previous trace")
    (out / "demo.html").symlink_to(tmp_path / "elsewhere.html")
    result = invoke("demo", "--out-dir", out)
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"tdxtrace: error: {out}/demo.html: is a symbolic link; refusing "
                             "to replace it (remove the link, or name the file it points "
                             "to)\n")
    assert (out / "demo.arrow").read_bytes() == b"the previous trace"  # not re-recorded
    assert sorted(os.listdir(out)) == ["demo.arrow", "demo.html"]


def test_the_report_of_a_cut_trace_so_named_quotes_it_in_its_warnings(trace: Path,
                                                                      tmp_path: Path) -> None:
    from replay_helpers import rewrite

    data = rewrite(trace, tmp_path / "small-batches.arrow").read_bytes()  # 1000 events each
    (tmp_path / os.fsdecode(BAD)).write_bytes(data[: len(data) * 2 // 3])  # unfinished
    done = tdxtrace(b"report", BAD, b"-o", b"r.html", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(b"tdxtrace: warning: bad\\xff.arrow: unfinished trace")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "bad\\xff.arrow: unfinished trace" in page


def test_a_capsule_keeps_a_counter_name_utf8_cannot_encode(trace: Path, tmp_path: Path) -> None:
    from replay_helpers import rewrite

    from tdxtrace.schema import SUMMARY_TRUTH

    odd = tmp_path / "odd.arrow"
    rewrite(trace, odd, summary=lambda meta: {**meta, SUMMARY_TRUTH: '{"\\udcff": 1}'})
    capsule = tmp_path / "odd.capsule.json"
    result = invoke("capsule", odd, "-o", capsule)
    assert result.exit_code == 0, result.output
    assert '"\\udcff": 1' in capsule.read_text(encoding="ascii")  # the same JSON value
