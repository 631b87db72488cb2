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

import os
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path

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
    return register_io_source(source, schema=polars_schema(), is_pure=True,
                              explain_name="tdxtrace", explain_detail=shown(path))
