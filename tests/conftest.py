"""Shared fixtures: a small, deterministic frame of events and a trace file written from it."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from tdxtrace.events import Kind
from tdxtrace.trace import RunMetadata, write_events

_KINDS = [int(k) for k in Kind]


def make_events(rows: int) -> pl.DataFrame:
    """``rows`` events cycling through every kind, with nulls in the nullable columns."""
    i = pl.col("i")
    kind = pl.Series("kinds", _KINDS, dtype=pl.UInt8)
    return pl.DataFrame({"i": pl.int_range(0, rows, dtype=pl.Int64, eager=True)}).select(
        ts_ns=i * 250,
        dur_ns=i % 7 * 100,
        kind=pl.lit(kind).gather(i % len(_KINDS)),
        flow=(i % 8).cast(pl.UInt8),
        corr=pl.when(i % 5 == 0).then(None).otherwise(i // 5),
        td=pl.lit(0, dtype=pl.Int32),
        vcpu=pl.when(i % 3 == 0).then(None).otherwise(i % 4).cast(pl.Int32),
        gpa=(i * 4096).cast(pl.UInt64),
        # TDX_OPERAND_BUSY | operand id: exercises the top bit of a uint64 column.
        status=pl.when(i % 2 == 0).then(None).otherwise(i.cast(pl.UInt64) + 0x8000020000000000),
    ).with_columns(truth=pl.col("kind") >= 100)


@pytest.fixture
def run_metadata() -> RunMetadata:
    return RunMetadata(scenario_name="fault-storm", scenario_text='{"vcpus":4}', seed=42,
                       policies={"frozen_spte": "local_retry", "zap_busy": "kick_retry_once"})


@pytest.fixture
def events_frame() -> pl.DataFrame:
    return make_events(1000)


@pytest.fixture
def trace_file(tmp_path: Path, events_frame: pl.DataFrame, run_metadata: RunMetadata) -> Path:
    """A finished trace of 1000 events in batches of 100, with ground-truth counters."""
    path = tmp_path / "run.arrow"
    write_events(path, events_frame, run_metadata, truth={"zero_step_armed": 3},
                 batch_rows=100)
    return path


def default_sigint() -> None:
    """A child's ``preexec_fn``: SIGINT back to its default. A shell running the tests in the
    background (``&``, ``nohup``) leaves SIGINT ignored, and a Python started so never turns
    it into KeyboardInterrupt: a test of Ctrl-C would then fail for the wrong reason."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def sigint_delivered() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in this process for the test, even when the shell that
    started pytest left SIGINT ignored (see :func:`default_sigint`)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
