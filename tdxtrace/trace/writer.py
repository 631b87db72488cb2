"""Writing traces: Arrow IPC files with run metadata up front and a summary at the end.

Layout of a finished trace ``NAME`` (Arrow IPC *file* format, see ``schemas/README.md``):

* the schema, with the run metadata (:class:`RunMetadata`, ``tdxtrace.*`` keys) as its custom
  metadata; record batches of at most ``batch_rows`` events, compressed (zstd by default);
* then one **zero-row** record batch whose custom metadata is the :class:`Summary` (event
  count, content digest, ground-truth counters).

Why a zero-row batch and not the file footer: pyarrow takes the footer's custom metadata when
the writer *opens*, before the counts are known. A reader finds the summary in the last batch
(``RecordBatchFileReader.get_batch_with_custom_metadata``). A file without it is *unfinished*.

The writer writes a temporary ``.NAME.<random>.partial`` in the same folder (unique per run, so
concurrent runs cannot mix their files), fsyncs it, and gives it the name ``NAME`` only when
closed, so a crash never leaves a file that looks whole. Without ``force`` the name is claimed
atomically: if ``NAME`` appeared meanwhile, the run fails rather than overwrite it (see
:mod:`tdxtrace.outputs`). It does no per-row Python work: batches are validated by their
column types, null counts and first/last ``seq``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from tdxtrace.errors import OutputError, TdxtraceError, TraceFormatError
from tdxtrace.outputs import check_output, create_temp, os_reason, publish
from tdxtrace.schema import COLUMN_NAMES, FIELDS, SCHEMA_VERSION, arrow_schema
from tdxtrace.signals import signals_held
from tdxtrace.trace.digest import ContentDigest
from tdxtrace.trace.metadata import RunMetadata, Summary

DEFAULT_BATCH_ROWS = 65536
COMPRESSIONS: dict[str, str | None] = {"zstd": "zstd", "lz4": "lz4", "none": None}
_EXPECTED_TYPES = tuple(f.type for f in FIELDS)
_NOT_NULL = tuple(i for i, f in enumerate(FIELDS) if not f.nullable)


class TraceWriter:
    """Write one trace file; use as a context manager or call :meth:`close` yourself."""

    def __init__(self, path: str | Path, metadata: RunMetadata, *, compression: str = "zstd",
                 batch_rows: int = DEFAULT_BATCH_ROWS, force: bool = False) -> None:
        if compression not in COMPRESSIONS:
            raise TdxtraceError(
                f"unknown compression {compression!r} (choose {', '.join(COMPRESSIONS)})")
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        self.path = Path(path)
        self.batch_rows = batch_rows
        self._force = force
        self.published = False  # whether ``path`` now holds this writer's file
        # Checked now so a bad output fails before the run, and again when publishing.
        check_output(self.path, force=force)
        if not self.path.parent.is_dir():
            problem = "is not a folder" if self.path.parent.exists() else "does not exist"
            raise OutputError(f"{self.path}: folder {self.path.parent} {problem}")
        self._schema = arrow_schema(metadata.to_arrow())
        self._digest = ContentDigest()
        self._events = 0
        self._batches = 0
        self._open = False
        fd, self.partial_path = create_temp(self.path)
        os.close(fd)  # Arrow opens the file by name
        try:
            # By its bytes: a folder name that is not UTF-8 (a surrogate escape in the str)
            # would make Arrow's str path raise UnicodeEncodeError and leave the file behind.
            self._sink = pa.OSFile(os.fsencode(self.partial_path), "wb")
        except OSError as err:
            self.partial_path.unlink(missing_ok=True)
            raise OutputError(f"{self.path}: cannot write: {os_reason(err)}") from err
        try:
            options = ipc.IpcWriteOptions(compression=COMPRESSIONS[compression])
            self._writer = ipc.new_file(self._sink, self._schema, options=options)
        except OSError as err:
            self._sink.close()
            self.partial_path.unlink(missing_ok=True)
            raise OutputError(f"{self.path}: cannot write: {os_reason(err)}") from err
        self._open = True

    @property
    def events_written(self) -> int:
        """Events written so far (the next event's ``seq``)."""
        return self._events

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Append a batch of v1 events whose ``seq`` continues from the previous batch."""
        self._check_open()
        self._validate(batch)
        if batch.num_rows == 0:
            return  # a zero-row batch is reserved for the summary
        # Re-attach the writer's schema (run metadata, field docs): zero-copy.
        batch = pa.RecordBatch.from_arrays(batch.columns, schema=self._schema)
        # Ctrl-C and SIGTERM wait for the batch (a few ms): Python runs a signal handler as
        # soon as the C call that wrote the batch returns, before the batch is counted, and
        # an interrupted run that believes nothing was written removes a trace that holds a
        # complete batch.
        with signals_held():
            for start in range(0, batch.num_rows, self.batch_rows):
                chunk = batch.slice(start, self.batch_rows)
                try:
                    self._writer.write_batch(chunk)
                except OSError as err:
                    self._fail(err)
                self._batches += 1
            self._digest.update(batch)
            self._events += batch.num_rows

    def close(self, truth: dict[str, Any] | None = None) -> Summary:
        """Write the summary, close, fsync and publish the temporary file as ``NAME``."""
        self._check_open()
        summary = Summary(self._events, self._digest.hexdigest(), dict(truth or {}))
        summary_meta = summary.to_arrow()  # fails here, writer still open, if truth isn't JSON
        empty = pa.RecordBatch.from_arrays(
            [pa.array([], type=f.type) for f in self._schema], schema=self._schema)
        with signals_held():
            try:
                self._writer.write_batch(empty, custom_metadata=summary_meta)
            except OSError as err:
                self._fail(err)
            self._finish()
        return summary

    def close_unfinished(self) -> Path:
        """Close without a summary (an interrupted run) and publish; readers say unfinished."""
        self._check_open()
        with signals_held():
            self._finish()
        return self.path

    def abort(self) -> None:
        """Give up: close and remove the temporary file; ``NAME`` is left untouched."""
        if not self._open:
            return
        self._open = False
        for closer in (self._writer.close, self._sink.close):
            # Already closed or broken: either way the partial file is removed next.
            with contextlib.suppress(Exception):
                closer()
        self.partial_path.unlink(missing_ok=True)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._open:
            return
        if exc_type is None:
            self.close()
            return
        # Held for the whole clean-up: a second Ctrl-C right after the first (a user pressing
        # it twice) would otherwise cut it short and leave the temporary file behind.
        with signals_held():
            # An unfinished trace never replaces a file: not the finished trace that --force
            # was to replace (the same scenario and seed record the partial again), nor one
            # that took the name during the run.
            if self._batches and not os.path.lexists(self.path):
                # If this fails too, the original exception matters more (the partial is gone).
                with contextlib.suppress(OutputError):
                    self.close_unfinished()
            else:
                self.abort()

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._open:
            raise ValueError(f"{self.path}: the trace writer is already closed")

    def _validate(self, batch: pa.RecordBatch) -> None:
        if tuple(batch.schema.names) != COLUMN_NAMES:
            raise TraceFormatError(
                f"{self.path}: batch columns {batch.schema.names} are not the v{SCHEMA_VERSION} "
                f"columns {list(COLUMN_NAMES)}")
        types = tuple(batch.schema.types)
        if types != _EXPECTED_TYPES:
            pairs = zip(types, _EXPECTED_TYPES, strict=True)
            i = next(i for i, (got, want) in enumerate(pairs) if got != want)
            raise TraceFormatError(
                f"{self.path}: batch column {COLUMN_NAMES[i]} has type {types[i]}, "
                f"expected {_EXPECTED_TYPES[i]}")
        for i in _NOT_NULL:
            if batch.column(i).null_count:
                raise TraceFormatError(
                    f"{self.path}: batch column {COLUMN_NAMES[i]} has nulls; it must not")
        if batch.num_rows == 0:
            return
        seq = batch.column(0)
        first, last = seq[0].as_py(), seq[batch.num_rows - 1].as_py()
        if first != self._events or last != self._events + batch.num_rows - 1:
            raise TraceFormatError(
                f"{self.path}: batch seq runs {first}..{last}, expected "
                f"{self._events}..{self._events + batch.num_rows - 1}")

    def _finish(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
            fd = os.open(self.partial_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            self._fail(err)
        try:
            publish(self.partial_path, self.path, force=self._force)
            self.published = True
        finally:  # published, or refused (the name appeared meanwhile) and the file removed
            self._open = False

    def _fail(self, err: OSError) -> NoReturn:
        self.abort()
        raise OutputError(f"{self.path}: cannot write: {os_reason(err)}") from err


def conform_events(frame: pl.DataFrame | pa.Table, *, source: str = "events") -> pa.Table:
    """Cast a frame of events to the v1 schema, filling what may be left out.

    Missing nullable columns become null; ``seq`` becomes 0, 1, 2, ...; ``dur_ns``, ``flow``
    and ``sub`` become 0; ``truth`` becomes ``kind >= 100``. ``ts_ns`` and ``kind`` are
    required. Errors (unknown column, failed cast, nulls where none are allowed, a ``seq``
    with gaps) name ``source`` and the column.
    """
    table = frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame
    names = table.column_names
    for name in names:
        if name not in COLUMN_NAMES:
            raise TraceFormatError(
                f"{source}: column {name} is not part of trace format v{SCHEMA_VERSION}")
    rows = table.num_rows
    columns: list[pa.ChunkedArray | pa.Array] = []
    for f in FIELDS:
        if f.name in names:
            column = table.column(f.name)
            try:
                column = column.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                reason = str(err).splitlines()[0]
                raise TraceFormatError(
                    f"{source}: column {f.name} cannot be cast to {f.type}: {reason}") from None
        elif f.name == "seq":
            column = pl.int_range(0, rows, dtype=pl.Int64, eager=True).to_arrow()
        elif f.name == "truth":
            if "kind" not in names:
                raise TraceFormatError(f"{source}: missing column kind")
            column = pc.greater_equal(table.column("kind").cast(pa.int64()), 100)
        elif f.name in ("dur_ns", "flow", "sub"):
            column = pa.repeat(pa.scalar(0, f.type), rows)
        elif f.nullable:
            column = pa.nulls(rows, f.type)
        else:
            raise TraceFormatError(f"{source}: missing column {f.name}")
        if not f.nullable and column.null_count:
            raise TraceFormatError(
                f"{source}: column {f.name} has {column.null_count} null values; "
                "it must not be null")
        columns.append(column)
    result = pa.Table.from_arrays(columns, schema=arrow_schema())
    if "seq" in names and rows:
        expected = pl.int_range(0, rows, dtype=pl.Int64, eager=True).to_arrow()
        matches = pc.equal(result.column("seq"), expected)
        if not pc.all(matches).as_py():
            row = pc.index(matches, False).as_py()
            raise TraceFormatError(
                f"{source}: column seq must be 0, 1, 2, ... without gaps "
                f"(row {row} has {result.column('seq')[row].as_py()})")
    return result


def write_events(path: str | Path, frame: pl.DataFrame | pa.Table, metadata: RunMetadata, *,
                 truth: dict[str, Any] | None = None, force: bool = False,
                 compression: str = "zstd", batch_rows: int = DEFAULT_BATCH_ROWS) -> Summary:
    """Write a whole frame of events as a finished trace (for tests and importers)."""
    table = conform_events(frame)
    with TraceWriter(path, metadata, compression=compression, batch_rows=batch_rows,
                     force=force) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
        return writer.close(truth)
