"""Interrupted runs: Ctrl-C or SIGTERM keeps what was recorded, and says so.

``record`` is run in a child process on a scenario far too long to finish; once its first
batches are on disk (the ``.partial`` file has grown past them) it gets SIGINT or SIGTERM. It
must exit 130 with a message saying the trace is unfinished, leave the trace under its final
name and no ``.partial``, and ``info``, ``analyze`` and ``report`` must read the trace and
mark it unfinished. A ``report`` interrupted part way leaves no HTML, whole or half.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import default_sigint

LONG = ("--set", "run.duration_us=3600000000")  # an hour of simulated time: never finishes
FIRST_BATCHES_BYTES = 200_000  # the schema is ~5 KB; one batch of 64 Ki events is more
WAIT_S = 60


def _tdxtrace(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tdxtrace", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=WAIT_S)


def _start(args: list[str | Path], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tdxtrace", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out waiting for the child"
        time.sleep(0.05)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str, int]]:
    """Record the long scenario three times, stopped by SIGINT, by SIGTERM, and by SIGINT
    twice in quick succession (a user pressing Ctrl-C twice)."""
    runs = {}
    for sig, twice in ((signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)):
        name = f"{sig.name} twice" if twice else sig.name
        folder = tmp_path_factory.mktemp(name.replace(" ", "-"))
        out = folder / "run.arrow"
        child = _start(["record", "fault-storm", *LONG, "-o", out], folder)
        def grown(folder: Path = folder) -> bool:  # the run's own .run.arrow.<random>.partial
            return any(_size(p) > FIRST_BATCHES_BYTES for p in folder.glob(".run.arrow.*.partial"))

        _wait_for(grown, child)
        child.send_signal(sig)
        if twice:
            # The second lands while the first unwinds the run (freeing millions of rows),
            # before any clean-up code: it used to abort the clean-up.
            time.sleep(0.005)
            child.send_signal(sig)
        _, stderr = child.communicate(timeout=WAIT_S)
        runs[name] = (out, stderr, child.returncode)
    return runs


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGINT twice"])
def test_an_interrupted_record_keeps_an_unfinished_trace_and_says_so(
        interrupted: dict[str, tuple[Path, str, int]], sig: str) -> None:
    out, stderr, code = interrupted[sig]
    assert code == 130
    assert stderr.strip().endswith(f"tdxtrace: interrupted: {out} keeps the events recorded "
                                   "so far and is marked unfinished")
    assert "Traceback" not in stderr
    assert out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["run.arrow"]  # no .partial


def test_an_interrupted_record_with_force_keeps_the_trace_it_was_to_replace(
        tmp_path: Path) -> None:
    out = tmp_path / "run.arrow"
    assert _tdxtrace("record", "zero-step", "--set", "run.duration_us=500", "-o", out,
                     cwd=tmp_path).returncode == 0
    before = out.read_bytes()
    child = _start(["record", "fault-storm", *LONG, "-o", out, "--force"], tmp_path)

    def grown() -> bool:
        return any(_size(p) > FIRST_BATCHES_BYTES for p in tmp_path.glob(".run.arrow.*.partial"))

    _wait_for(grown, child)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=WAIT_S)
    assert child.returncode == 130
    assert stderr.strip().endswith(f"tdxtrace: interrupted: {out} is left as it was; the "
                                   "events recorded so far were not kept (an unfinished trace "
                                   "never replaces a file)")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.arrow"]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_info_analyze_and_report_read_the_interrupted_trace_and_mark_it_unfinished(
        interrupted: dict[str, tuple[Path, str, int]], sig: str) -> None:
    out = interrupted[sig][0]
    folder = out.parent
    info = _tdxtrace("info", "--json", out, cwd=folder)
    assert info.returncode == 0, info.stderr
    facts = json.loads(info.stdout)
    assert facts["finished"] is False and facts["digest"] is None
    assert facts["events"] >= 65536 and facts["scenario"] == "fault-storm"
    batches = -(-facts["events"] // 65536)
    assert facts["warnings"] == [f"{out}: unfinished trace (no summary): {batches} complete "
                                 f"{'batch' if batches == 1 else 'batches'}, "
                                 f"{facts['events']} events read"]
    analyze = _tdxtrace("analyze", "--format", "json", "-a", "seamcall_latency",
                        "-a", "busy_retry", out, cwd=folder)
    assert analyze.returncode == 0, analyze.stderr
    assert analyze.stderr == f"tdxtrace: warning: {facts['warnings'][0]}\n"
    assert set(json.loads(analyze.stdout)) == {"busy_retry", "seamcall_latency"}
    html = folder / "run.html"
    report = _tdxtrace("report", "-a", "seamcall_latency", "-o", html, out, cwd=folder)
    assert report.returncode == 0, report.stderr
    assert "unfinished" in report.stderr
    assert "Unfinished trace:" in html.read_text(encoding="utf-8")
    (folder / "run.html").unlink()


SLOW_PLUGIN = '''
import time
from pathlib import Path

from tdxtrace import hookimpl
from tdxtrace.analysis import Analyzer, AnalyzerResult


class Slow(Analyzer):
    name = "slow"
    description = "takes its time, so the report can be interrupted"

    def analyze(self, trace):
        Path("analysis-started").write_text("yes")
        time.sleep(120)
        return AnalyzerResult(metrics={})


@hookimpl
def register_analyzers():
    return [Slow()]
'''


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_report_leaves_no_html(
        interrupted: dict[str, tuple[Path, str, int]], tmp_path: Path,
        sig: signal.Signals) -> None:
    trace = interrupted["SIGINT"][0]
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "slow.py").write_text(SLOW_PLUGIN)
    html = tmp_path / "out" / "report.html"
    child = _start(["report", trace, "--plugins-dir", plugins, "-o", html], tmp_path)
    _wait_for((tmp_path / "analysis-started").exists, child)
    child.send_signal(sig)
    _, stderr = child.communicate(timeout=WAIT_S)
    assert child.returncode != 0
    if sig == signal.SIGINT:
        assert child.returncode == 130 and stderr.endswith("tdxtrace: interrupted\n")
    assert "Traceback" not in stderr
    assert not html.exists()
    leftovers = list(html.parent.iterdir()) if html.parent.exists() else []
    assert leftovers == []


def test_a_report_interrupted_while_writing_leaves_no_html(
        interrupted: dict[str, tuple[Path, str, int]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The signal cannot be timed to land inside the write, so it is injected there: the HTML
    # is half written when Ctrl-C arrives.
    from click.testing import CliRunner

    import tdxtrace.outputs as outputs_module
    from tdxtrace.cli import main

    real_fdopen = os.fdopen

    def interrupted_fdopen(fd: int, *args: object, **kwargs: object) -> object:
        handle = real_fdopen(fd, *args, **kwargs)  # type: ignore[call-overload]

        class HalfWriter:
            def __enter__(self) -> HalfWriter:
                return self

            def __exit__(self, *exc: object) -> None:
                handle.close()

            def write(self, text: str) -> int:
                handle.write(text[:len(text) // 2])
                handle.flush()
                raise KeyboardInterrupt

        return HalfWriter()

    monkeypatch.setattr(outputs_module.os, "fdopen", interrupted_fdopen)
    html = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", str(interrupted["SIGINT"][0]), "-a",
                                       "seamcall_latency", "-o", str(html)])
    assert result.exit_code == 130
    assert result.stderr.endswith("tdxtrace: interrupted\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("sigint_delivered")
def test_ctrl_c_while_a_trace_is_being_finished_waits_for_the_rename(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The signal lands inside close(), between writing the footer and the rename: it is
    # held until the file is whole under its final name, then delivered.
    from conftest import make_events

    import tdxtrace.trace.writer as writer_module
    from tdxtrace.trace import RunMetadata, TraceWriter, open_trace
    from tdxtrace.trace.writer import conform_events

    real_fsync = os.fsync

    def fsync_with_ctrl_c(fd: int) -> None:
        signal.raise_signal(signal.SIGINT)
        real_fsync(fd)

    out = tmp_path / "run.arrow"
    writer = TraceWriter(out, RunMetadata())
    writer.write_batch(conform_events(make_events(100)).to_batches()[0])
    monkeypatch.setattr(writer_module.os, "fsync", fsync_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        writer.close()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.arrow"]
    trace = open_trace(out)
    assert trace.finished and trace.num_events() == 100
