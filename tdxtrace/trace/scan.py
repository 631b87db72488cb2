"""Reading a checked trace file's batches, as Arrow or as a polars LazyFrame.

Polars never parses a trace file itself. Its IPC reader trusts the lengths written in the
file: on a damaged file it can raise a ``PanicException`` (which is not an ``Exception``) or
abort the whole process on an absurd allocation, and it does not always read the bytes pyarrow
read when the file was checked. So the frame handed to analyzers is a polars IO source fed by
pyarrow, which reads only the batches :func:`tdxtrace.trace.open_trace` checked, decodes only
the columns a query uses (``included_fields``), and turns any damage found since into a
:class:`TraceFormatError` naming the file and the batch.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from types import TracebackType

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
from polars.io.plugins import register_io_source

from tdxtrace.errors import TraceFormatError, shown
from tdxtrace.schema import COLUMN_NAMES, arrow_schema
from tdxtrace.trace.checks import first_line

STREAM_START = 8  # the file magic padded to 8 bytes; an IPC stream follows


@cache
def polars_schema() -> pl.Schema:
    """The v1 columns as polars types."""
    frame = pl.from_arrow(arrow_schema().empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame.schema


@cache
def _v1_subset(columns: tuple[str, ...]) -> pa.Schema:
    schema = arrow_schema()
    return pa.schema([schema.field(name) for name in columns])


def read_batches(path: Path, footerless: bool, count: int,
                 columns: Sequence[str] = COLUMN_NAMES) -> Iterator[pa.RecordBatch]:
    """The first ``count`` batches of an intact file (``footerless``: the first ``count``
    non-empty batches of its stream), non-empty ones only, with ``columns`` in that order."""
    index = 0
    try:
        with pa.memory_map(os.fsencode(path)) as source:  # bytes: see reader.open_trace
            if footerless:
                source.seek(STREAM_START)
                stream = ipc.open_stream(source, options=_options(stream_schema(source),
                                                                  columns))
                batches = _non_empty(stream, count)
            else:
                reader = ipc.open_file(source)
                reader = ipc.open_file(source, options=_options(reader.schema, columns))
                batches = (reader.get_batch(i) for i in range(count))
            for batch in batches:
                if batch.num_rows:
                    # Columns in the asked order, under the v1 schema as the code defines it:
                    # the file's field metadata is not vouched for, and polars panics on
                    # invalid UTF-8 there.
                    yield pa.RecordBatch.from_arrays(batch.select(list(columns)).columns,
                                                     schema=_v1_subset(tuple(columns)))
                index += 1
    except (pa.ArrowException, OSError, ValueError) as err:
        # Checked when the trace was opened, so the file changed since: name it and the batch.
        raise TraceFormatError(
            f"{path}: record batch {index} cannot be read (the file changed after it was "
            f"opened?): {first_line(err)}") from None


def stream_schema(source: pa.MemoryMappedFile) -> pa.Schema:
    """The schema at the start of the stream; leaves ``source`` where it was."""
    where = source.tell()
    schema = ipc.read_schema(ipc.read_message(source))
    source.seek(where)
    return schema


def _options(schema: pa.Schema, columns: Sequence[str]) -> ipc.IpcReadOptions:
    # Decode only what is asked for (a file may also hold columns other than v1's).
    fields = sorted(schema.get_field_index(name) for name in columns)
    return ipc.IpcReadOptions(included_fields=fields)


def _non_empty(reader: ipc.RecordBatchStreamReader, count: int) -> Iterator[pa.RecordBatch]:
    """The first ``count`` non-empty batches; never reads past them into a damaged tail."""
    seen = 0
    while seen < count:
        batch = reader.read_next_batch()
        if batch.num_rows:
            seen += 1
            yield batch


class _Fetches:
    """The batches polars is fetching from trace files right now, on its own threads.

    Polars pulls an IO source from its worker threads and may still be fetching a batch
    after a query that stopped early (``head()``, a short ``limit``) returned. A thread that
    calls into Python while the interpreter shuts down kills the process (SIGABRT,
    "exception not rethrown"), after the command had printed its answer. So at exit no new
    fetch starts and the ones in flight are waited for.
    """

    def __init__(self) -> None:
        self._idle = threading.Condition()
        self._running = 0
        self._stopping = False

    def __enter__(self) -> None:
        with self._idle:
            if self._stopping:
                raise StopIteration  # shutting down: the source ends here
            self._running += 1

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._idle:
            self._running -= 1
            self._idle.notify_all()

    def stop_and_wait(self, timeout: float = 30.0) -> None:
        with self._idle:
            self._stopping = True
            self._idle.wait_for(lambda: self._running == 0, timeout)


_FETCHES = _Fetches()
atexit.register(_FETCHES.stop_and_wait)


class _Guarded(Iterator[pl.DataFrame]):
    """``frames``, each fetched inside :data:`_FETCHES`."""

    def __init__(self, frames: Iterator[pl.DataFrame]) -> None:
        self._frames = frames

    def __next__(self) -> pl.DataFrame:
        with _FETCHES:
            return next(self._frames)


def scan_batches(path: Path, footerless: bool, count: int) -> pl.LazyFrame:
    """A LazyFrame over :func:`read_batches`, with projection, filter and limit pushed down."""

    def source(with_columns: list[str] | None, predicate: pl.Expr | None,
               n_rows: int | None, batch_size: int | None) -> Iterator[pl.DataFrame]:
        columns = COLUMN_NAMES if with_columns is None else tuple(with_columns)
        left = n_rows
        for batch in read_batches(path, footerless, count, columns):
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            if predicate is not None:
                kept = frame.filter(predicate)
                if kept.height < frame.height:
                    # A contiguous run of kept rows comes back as a zero-copy slice that would
                    # keep the whole decoded batch alive; copy the few rows kept instead.
                    kept = kept.select(pl.all().gather(pl.int_range(pl.len())))
                frame = kept
            if left is not None:
                frame = frame.head(left)
                left -= frame.height
            yield frame
            if left is not None and left <= 0:
                return

    # shown(): polars keeps the detail as Rust text, which cannot hold a non-UTF-8 name.
    def guarded(with_columns: list[str] | None, predicate: pl.Expr | None,
                n_rows: int | None, batch_size: int | None) -> Iterator[pl.DataFrame]:
        return _Guarded(source(with_columns, predicate, n_rows, batch_size))

    return register_io_source(guarded, schema=polars_schema(), is_pure=True,
                              explain_name="tdxtrace", explain_detail=shown(path))
