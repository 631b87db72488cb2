"""The trace writer when a run is interrupted or fails: what is left on disk, under what name.

An unfinished trace keeps the complete batches written (readers mark it unfinished), never
replaces a file, and a run that wrote nothing leaves nothing.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from test_trace_io import META, _batch

from tdxtrace.trace import TraceWriter, open_trace


def test_an_exception_after_some_batches_leaves_an_unfinished_trace(tmp_path: Path) -> None:
    path = tmp_path / "run.arrow"
    with pytest.raises(KeyboardInterrupt), TraceWriter(path, META) as writer:
        writer.write_batch(_batch(0, 4))
        raise KeyboardInterrupt
    trace = open_trace(path)
    assert not trace.finished and trace.num_events() == 4


def test_an_interrupted_forced_run_leaves_the_file_it_was_to_replace(tmp_path: Path) -> None:
    # --force replaces a finished trace only with a finished one: an unfinished run is
    # discarded (the same scenario and seed record it again) and the old trace stays.
    path = tmp_path / "run.arrow"
    with TraceWriter(path, META) as writer:
        writer.write_batch(_batch(0, 5))
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt), TraceWriter(path, META, force=True) as writer:
        writer.write_batch(_batch(0, 4))
        raise KeyboardInterrupt
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.arrow"]  # no partial left


class _CtrlCAsTheWriteReturns:
    """The Arrow writer, with a Ctrl-C arriving just as each batch write returns."""

    def __init__(self, writer: ipc.RecordBatchFileWriter) -> None:
        self._writer = writer

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler at once, right here

    def __getattr__(self, name: str) -> object:
        return getattr(self._writer, name)


@pytest.mark.usefixtures("sigint_delivered")
def test_ctrl_c_while_the_first_batch_is_written_keeps_that_batch(tmp_path: Path) -> None:
    # Python ran the handler as soon as the write returned, before the batch was counted: the
    # writer believed nothing was on disk and removed a trace holding a complete batch.
    path = tmp_path / "run.arrow"
    with pytest.raises(KeyboardInterrupt), TraceWriter(path, META) as writer:
        writer._writer = _CtrlCAsTheWriteReturns(writer._writer)  # type: ignore[assignment]
        writer.write_batch(_batch(0, 4))
        pytest.fail("the Ctrl-C was lost")
    trace = open_trace(path)
    assert not trace.finished and trace.num_events() == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.arrow"]


def test_an_exception_before_any_batch_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), TraceWriter(tmp_path / "run.arrow", META):
        raise RuntimeError("scenario failed")
    assert list(tmp_path.iterdir()) == []
