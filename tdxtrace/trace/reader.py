"""Reading traces: validate a file once, then hand out its events as polars or Arrow.

:func:`open_trace` refuses anything that is not a tdxtrace trace with one line naming the file
and the problem. It accepts damaged traces when something can be saved from them:

* no summary batch (the run was interrupted): *unfinished*, every batch is read;
* no Arrow footer (the writer crashed, the file was cut short): the file is read as the Arrow
  IPC stream it contains, from byte 8 (after the ``ARROW1`` magic and its padding), up to the
  last complete record batch; the trace is unfinished and the damaged tail is reported.

The file is memory-mapped, so nothing reads beyond its end whatever a damaged header claims.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from tdxtrace.errors import TraceFormatError
from tdxtrace.schema import COLUMN_NAMES, FIELDS, arrow_schema
from tdxtrace.trace.digest import digest_batches
from tdxtrace.trace.metadata import RunMetadata, Summary
from tdxtrace.trace.writer import DEFAULT_BATCH_ROWS, conform_events

ARROW_MAGIC = b"ARROW1"
_STREAM_START = 8  # the file magic padded to 8 bytes; the IPC stream follows


@dataclass(frozen=True)
class _Layout:
    """Where a trace's batches are: an intact Arrow file, a footer-less file, or memory."""

    kind: str  # "file" | "stream" | "memory"
    data_batches: int  # complete batches to read (file/stream: counted from the start)
    table: pa.Table | None = None  # kind == "memory"


class Trace:
    """A validated trace: run metadata, the summary if finished, and the events."""

    def __init__(self, *, path: Path | None, metadata: RunMetadata, summary: Summary | None,
                 num_events: int, warnings: tuple[str, ...], layout: _Layout) -> None:
        self.path = path
        self.metadata = metadata
        self.summary = summary
        self.finished = summary is not None
        self.warnings = warnings
        self._num_events = num_events
        self._layout = layout

    def __repr__(self) -> str:
        where = str(self.path) if self.path else "in memory"
        state = "finished" if self.finished else "unfinished"
        return f"<Trace {where}: {self._num_events} events, {state}>"

    def num_events(self) -> int:
        """Events in the trace (for an unfinished trace: the events that could be read)."""
        return self._num_events

    def events(self) -> pl.LazyFrame:
        """Every row (observable and truth), the v1 columns, in ``seq`` order."""
        layout = self._layout
        if layout.kind == "memory":
            assert layout.table is not None
            return _frame(layout.table).lazy()
        if layout.kind == "file":
            assert self.path is not None
            # glob/hive off: a file name with [ or * or key=value folders is just a name.
            return pl.scan_ipc(self.path, glob=False, hive_partitioning=False).select(
                COLUMN_NAMES)
        table = pa.Table.from_batches(list(self.iter_batches()), schema=arrow_schema())
        return _frame(table).lazy()

    def observable(self) -> pl.LazyFrame:
        """The rows a real host could have recorded (``truth`` is false)."""
        return self.events().filter(~pl.col("truth"))

    def iter_batches(self) -> Iterator[pa.RecordBatch]:
        """The non-empty record batches in order, v1 columns (the summary batch is skipped)."""
        layout = self._layout
        if layout.kind == "memory":
            assert layout.table is not None
            yield from layout.table.to_batches(max_chunksize=DEFAULT_BATCH_ROWS)
            return
        assert self.path is not None
        index = 0
        try:
            with pa.memory_map(str(self.path)) as source:
                if layout.kind == "file":
                    reader = ipc.open_file(source)
                    batches: Iterator[pa.RecordBatch] = (
                        reader.get_batch(i) for i in range(layout.data_batches))
                else:
                    source.seek(_STREAM_START)
                    batches = _stream_data_batches(ipc.open_stream(source), layout.data_batches)
                for batch in batches:
                    if batch.num_rows:
                        yield _v1_columns(batch)
                    index += 1
        except (pa.ArrowException, OSError) as err:
            # Damage inside a batch the footer vouched for (a flipped bit, a file changed
            # since it was opened): name the file and the batch, not Arrow's internals.
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TraceFormatError(
                f"{self.path}: record batch {index} cannot be read: {reason}") from None

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, metadata: RunMetadata | None = None) -> Trace:
        """An in-memory, finished trace from a frame of events (see ``conform_events``)."""
        table = conform_events(frame, source="frame")
        summary = Summary(table.num_rows, digest_batches(table.to_batches()), {})
        return cls(path=None, metadata=metadata or RunMetadata(), summary=summary,
                   num_events=table.num_rows, warnings=(),
                   layout=_Layout("memory", 0, table))


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def _v1_columns(batch: pa.RecordBatch) -> pa.RecordBatch:
    return batch if tuple(batch.schema.names) == COLUMN_NAMES else batch.select(COLUMN_NAMES)


def _stream_data_batches(reader: ipc.RecordBatchStreamReader,
                         count: int) -> Iterator[pa.RecordBatch]:
    """The first ``count`` non-empty batches; never reads past them into a damaged tail."""
    seen = 0
    while seen < count:
        batch = reader.read_next_batch()
        if batch.num_rows:
            seen += 1
            yield batch


def _validate_schema(schema: pa.Schema, source: str) -> RunMetadata:
    """Run metadata first (so an unknown version is reported as such), then the columns."""
    metadata = RunMetadata.from_arrow(schema.metadata, source=source)
    for f in FIELDS:
        if f.name not in schema.names:
            raise TraceFormatError(f"{source}: missing column {f.name}")
        actual = schema.field(f.name).type
        if actual != f.type:
            raise TraceFormatError(
                f"{source}: column {f.name} has type {actual}, expected {f.type}")
    return metadata


def _unfinished(source: str, batches: int, events: int) -> str:
    return (f"{source}: unfinished trace (no summary): {batches} complete batches, "
            f"{events} events read")


def open_trace(path: str | Path) -> Trace:
    """Open and validate a trace file; errors are :class:`TraceFormatError` naming the file."""
    source = str(path)
    file = Path(path)
    try:
        info = file.stat()
    except FileNotFoundError:
        raise TraceFormatError(f"{source}: does not exist") from None
    except OSError as err:
        raise TraceFormatError(f"{source}: cannot read: {err.strerror or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise TraceFormatError(f"{source}: is a directory, not a trace file")
    if not stat.S_ISREG(info.st_mode):
        # A FIFO or device would block or never end; traces are regular files.
        raise TraceFormatError(f"{source}: not a regular file")
    if info.st_size == 0:
        raise TraceFormatError(f"{source}: empty file")
    try:
        with open(file, "rb") as handle:
            magic = handle.read(len(ARROW_MAGIC))
    except OSError as err:
        raise TraceFormatError(f"{source}: cannot read: {err.strerror or err}") from None
    if magic != ARROW_MAGIC:
        raise TraceFormatError(f"{source}: not an Arrow IPC file (bad magic)")
    with pa.memory_map(str(file)) as mapped:
        try:
            reader = ipc.open_file(mapped)
        except (pa.ArrowException, OSError):
            return _open_footerless(file, source, mapped, info.st_size)
        return _open_intact(file, source, reader)


def _open_intact(file: Path, source: str, reader: ipc.RecordBatchFileReader) -> Trace:
    metadata = _validate_schema(reader.schema, source)
    total = reader.num_record_batches
    summary = None
    data_batches = total
    if total:
        last = reader.get_batch_with_custom_metadata(total - 1)
        if last.batch.num_rows == 0:
            summary = Summary.from_arrow(last.custom_metadata, source=source)
            if summary is not None:
                data_batches = total - 1
    events = reader.count_rows()  # from the batches' headers; no data is decompressed
    warnings: list[str] = []
    if summary is None:
        warnings.append(_unfinished(source, data_batches, events))
    elif summary.events != events:
        warnings.append(f"{source}: the summary says {summary.events} events but the file "
                        f"holds {events}")
    return Trace(path=file, metadata=metadata, summary=summary, num_events=events,
                 warnings=tuple(warnings), layout=_Layout("file", data_batches))


def _open_footerless(file: Path, source: str, mapped: pa.MemoryMappedFile, size: int) -> Trace:
    damaged = f"{source}: damaged Arrow IPC file (cut short before the schema ended)"
    if size <= _STREAM_START:
        raise TraceFormatError(damaged)
    mapped.seek(_STREAM_START)
    try:
        stream = ipc.open_stream(mapped)
    except (pa.ArrowException, OSError):
        raise TraceFormatError(damaged) from None
    metadata = _validate_schema(stream.schema, source)
    batches = events = 0
    end_of_complete = mapped.tell()
    while True:
        try:
            batch = stream.read_next_batch()
        except StopIteration:
            break
        except (pa.ArrowException, OSError):
            break  # a batch cut in the middle: everything before it is good
        end_of_complete = mapped.tell()
        if batch.num_rows:
            batches += 1
            events += batch.num_rows
    tail = size - end_of_complete
    warnings = (
        _unfinished(source, batches, events),
        f"{source}: damaged tail: the Arrow footer is missing (writer crashed or file cut "
        f"short); {tail} bytes after the last complete batch were ignored",
    )
    return Trace(path=file, metadata=metadata, summary=None, num_events=events,
                 warnings=warnings, layout=_Layout("stream", batches))
