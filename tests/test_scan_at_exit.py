"""A query that stops early on a trace read from its file does not kill the process at exit.

Polars pulls the trace's IO source on its own threads and may still be fetching the next
batch when ``head()`` has its rows; if the interpreter shut down meanwhile, that thread's call
into Python aborted the process (SIGABRT, exit 134) after the command had printed its answer:
``tdxtrace replay TRACE --until SEQ`` did, for any SEQ early in a trace of three batches or more.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.trace import open_trace


@pytest.fixture(scope="module")
def three_batches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "storm.arrow"
    record(load_scenario("fault-storm", []), 1, path)
    assert open_trace(path).num_events() > 2 * 65536  # the default batch: three or more
    return path


def _exit_codes(*argv: str, runs: int = 3) -> list[int]:
    return [subprocess.run([sys.executable, *argv], capture_output=True, check=False).returncode
            for _ in range(runs)]


def test_replay_until_an_early_event_exits_cleanly(three_batches: Path) -> None:
    assert _exit_codes("-m", "tdxtrace", "replay", str(three_batches), "--until", "3") == [0] * 3


def test_a_head_query_on_a_streamed_trace_exits_cleanly(three_batches: Path) -> None:
    query = ("import polars as pl, sys; from tdxtrace.trace import open_trace; "
             "t = open_trace(sys.argv[1]); "
             "assert t.events().filter(pl.col('seq') == 3).head(1).collect().height == 1")
    assert _exit_codes("-c", query, str(three_batches)) == [0] * 3
