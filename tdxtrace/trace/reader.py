"""Reading traces: validate a file once, then hand out its events as polars or Arrow.

:func:`open_trace` refuses anything that is not a tdxtrace trace with one line naming the file
and the problem. Opening decodes and checks every batch (:mod:`tdxtrace.trace.checks`), so
later reads cannot meet damage the open did not report:

* an intact file (its Arrow footer is there) is read whole or refused: every batch must
  decode and keep the format's rules, the schema and its copy in the footer must agree, and
  a finished trace's events must match the digest in its summary. Without a summary the
  trace is *unfinished* (an interrupted run): every batch is read, with a warning;
* a file without its footer (the writer crashed, the file was cut short) is read as the Arrow
  IPC stream it contains, from byte 8 (after the ``ARROW1`` magic and its padding), up to the
  last complete, valid record batch; the trace is unfinished and the damaged tail is reported.

Rows that break only a soft rule (an unknown kind, time going backwards) are read and counted
in a warning. The file is memory-mapped and read by pyarrow, so nothing reads beyond its end
whatever a damaged header claims; polars never parses the file (see :mod:`.scan`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from tdxtrace.errors import TraceFormatError
from tdxtrace.schema import COLUMN_NAMES, SUMMARY_EVENTS, arrow_schema
from tdxtrace.trace.budget import decode_budget_bytes, decoded_bytes
from tdxtrace.trace.checks import BatchChecker, first_line, validate_schema
from tdxtrace.trace.metadata import RunMetadata, Summary
from tdxtrace.trace.scan import STREAM_START, stream_schema
from tdxtrace.trace.trace import Layout, Trace, frame_of

ARROW_MAGIC = b"ARROW1"
_STREAM_CONTINUATION = b"\xff\xff\xff\xff"  # how every message of an IPC stream starts
_STREAM_START = STREAM_START


def _unfinished(source: str, batches: int, events: int) -> str:
    plural = "batch" if batches == 1 else "batches"
    return (f"{source}: unfinished trace (no summary): {batches} complete {plural}, "
            f"{events} events read")


def _suspects(source: str, checker: BatchChecker) -> list[str]:
    return [f"{source}: {line}" for line in checker.suspect_rows()]


def open_trace(path: str | Path, *, keep_decoded: bool = False) -> Trace:
    """Open and validate a trace file; errors are :class:`TraceFormatError` naming the file.

    Every batch is decoded and checked once here (see :mod:`tdxtrace.trace.checks`); a finished
    trace's events must match its summary's digest. A damaged batch ends the readable part of
    the trace: the batches before it are kept and a warning says what was lost.

    ``keep_decoded``: keep the decoded batches in memory when they fit the decode budget
    (:mod:`tdxtrace.trace.budget`), so that queries (analyzers) read them instead of decoding
    the file a second time. Over the budget the trace reads its file as usual.
    """
    source = str(path)
    file = Path(path)
    keep_bytes = decode_budget_bytes() if keep_decoded else 0
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
        # As bytes: Arrow encodes a str path as UTF-8, which a name whose bytes are not UTF-8
        # (os.fsdecode made them surrogates) cannot be; the bytes are the name on disk.
        mapped = pa.memory_map(os.fsencode(file))
    except OSError as err:
        raise TraceFormatError(f"{source}: cannot read: {err.strerror or err}") from None
    if magic != ARROW_MAGIC:
        mapped.close()
        hint = ""
        if magic.startswith(_STREAM_CONTINUATION):
            # What pyarrow.ipc.new_stream (or polars' write_ipc_stream) writes: the same data,
            # without the file format's magic, footer and random access.
            hint = ("; it looks like an Arrow IPC stream, not the Arrow IPC file format "
                    "tdxtrace writes")
        raise TraceFormatError(f"{source}: not an Arrow IPC file (bad magic){hint}")
    with mapped:
        try:
            reader = ipc.open_file(mapped)
        except (pa.ArrowException, OSError, ValueError):
            return _open_footerless(file, source, mapped, info.st_size, keep_bytes)
        return _open_intact(file, source, reader, mapped, keep_bytes)


def _check_schema_copies(source: str, footer_schema: pa.Schema,
                         mapped: pa.MemoryMappedFile) -> None:
    """An Arrow file holds its schema twice; a flipped bit in either makes them differ.

    The run metadata lives there and no digest covers it, so this is what catches damage to it.
    """
    try:
        mapped.seek(_STREAM_START)
        start_schema = stream_schema(mapped)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise TraceFormatError(
            f"{source}: damaged Arrow IPC file (the schema at the start cannot be read: "
            f"{first_line(err)})") from None
    if not start_schema.equals(footer_schema, check_metadata=True):
        raise TraceFormatError(
            f"{source}: damaged Arrow IPC file (the schema at the start and its copy in the "
            "footer differ)")


def _open_intact(file: Path, source: str, reader: ipc.RecordBatchFileReader,
                 mapped: pa.MemoryMappedFile, keep_bytes: int) -> Trace:
    metadata = validate_schema(reader.schema, source)
    _check_schema_copies(source, reader.schema, mapped)
    expected = _expected_events(reader)
    if expected is not None and decoded_bytes(expected, COLUMN_NAMES) > keep_bytes:
        keep_bytes = 0  # known too big: do not fill memory up to the budget just to drop it
    with BatchChecker(keep_bytes) as checker:
        return _with_kept(_check_intact(file, source, reader, metadata, checker), checker)


def _expected_events(reader: ipc.RecordBatchFileReader) -> int | None:
    """The event count the summary (the last, empty batch) announces, if it can be read."""
    try:
        last = reader.get_batch_with_custom_metadata(reader.num_record_batches - 1)
        summary = Summary.from_arrow(last.custom_metadata, source="")
    except (pa.ArrowException, OSError, ValueError, TraceFormatError):
        return None  # an unfinished or damaged trace: the full check below says which
    return summary.events if summary is not None and last.batch.num_rows == 0 else None


def _check_intact(file: Path, source: str, reader: ipc.RecordBatchFileReader,
                  metadata: RunMetadata, checker: BatchChecker) -> Trace:
    """Every batch of a file with its footer must pass: the footer means the writer finished
    (or closed an interrupted run) cleanly, so damage came later, may be anywhere, and no
    batch can be vouched for without the whole file."""
    total = reader.num_record_batches
    summary: Summary | None = None
    for index in range(total):
        try:
            with_meta = reader.get_batch_with_custom_metadata(index)
            if with_meta.batch.num_rows == 0 and index == total - 1:
                summary = _summary(with_meta.custom_metadata, source)
                continue
            problem = checker.check(with_meta.batch)
        except (pa.ArrowException, OSError, ValueError) as err:
            problem = f"cannot be decoded: {first_line(err)}"
        if problem is not None:
            raise TraceFormatError(
                f"{source}: damaged trace: record batch {index} {problem} (the file was "
                "changed after it was written; an intact file is read whole or not at all)")
    warnings = []
    if summary is None:
        warnings.append(_unfinished(source, checker.batches, checker.events))
    else:
        _match_summary(source, summary, checker)
    warnings += _suspects(source, checker)
    data_batches = total - 1 if summary is not None else total
    return Trace(path=file, metadata=metadata, summary=summary, num_events=checker.events,
                 warnings=tuple(warnings), layout=Layout("file", data_batches))


def _match_summary(source: str, summary: Summary, checker: BatchChecker, also: str = "") -> None:
    """A finished trace's events must be the ones its summary vouches for: the same content
    (digest) and the same number. The digest covers the rows' values, not their count, so a
    summary whose count alone is wrong was altered too: its truth counters cannot be trusted
    either, whichever part of the file is damaged."""
    if summary.digest != checker.hexdigest():
        raise TraceFormatError(
            f"{source}: damaged trace: {also}the events' content digest does not match the "
            "summary's (a value was changed after the run was recorded)")
    if summary.events != checker.events:
        raise TraceFormatError(
            f"{source}: damaged trace: {also}the summary says {summary.events} events but "
            f"the file holds {checker.events} (the summary was changed after the run was "
            "recorded)")


def _with_kept(trace: Trace, checker: BatchChecker) -> Trace:
    """``trace`` reading the batches ``checker`` kept, if it kept them all."""
    if checker.kept is None:
        return trace
    table = pa.Table.from_batches(checker.kept, schema=arrow_schema()) if checker.kept else \
        arrow_schema().empty_table()
    return trace._with_frame(frame_of(table))


def _summary(custom_metadata: pa.KeyValueMetadata | None, source: str) -> Summary | None:
    """The summary in the last batch's metadata; an error when it is there but damaged."""
    summary = Summary.from_arrow(custom_metadata, source=f"{source}: damaged summary")
    if summary is None and custom_metadata:
        # Only the writer puts metadata on the empty last batch, and only a summary.
        raise TraceFormatError(f"{source}: damaged summary: {SUMMARY_EVENTS} is missing")
    return summary


def _open_footerless(file: Path, source: str, mapped: pa.MemoryMappedFile, size: int,
                     keep_bytes: int) -> Trace:
    damaged = f"{source}: damaged Arrow IPC file (cut short before the schema ended)"
    if size <= _STREAM_START:
        raise TraceFormatError(damaged)
    mapped.seek(_STREAM_START)
    try:
        stream = ipc.open_stream(mapped)
    except (pa.ArrowException, OSError, ValueError):
        raise TraceFormatError(damaged) from None
    metadata = validate_schema(stream.schema, source)
    with BatchChecker(keep_bytes) as checker:
        return _with_kept(_check_stream(file, source, mapped, size, stream, metadata, checker),
                          checker)


def _check_stream(file: Path, source: str, mapped: pa.MemoryMappedFile, size: int,
                  stream: ipc.RecordBatchStreamReader, metadata: RunMetadata,
                  checker: BatchChecker) -> Trace:
    end_of_complete = mapped.tell()
    problem: str | None = None
    summary: Summary | None = None
    while problem is None and summary is None:
        try:
            with_meta = stream.read_next_batch_with_custom_metadata()
        except StopIteration:
            break
        except (pa.ArrowException, OSError, ValueError):
            break  # a batch cut in the middle: everything before it is good
        if with_meta.batch.num_rows == 0 and with_meta.custom_metadata:
            # The writer's summary made it to disk; only what follows it (the footer) is
            # damaged, so the events can still be vouched for by the digest.
            summary = _summary(with_meta.custom_metadata, source)
            end_of_complete = mapped.tell()
            _check_nothing_follows(stream, source)
            continue
        problem = checker.check(with_meta.batch)
        if problem is None:
            end_of_complete = mapped.tell()
    tail = size - end_of_complete
    if summary is not None:
        return _footer_damaged(file, source, metadata, summary, checker, tail)
    warnings = [_unfinished(source, checker.batches, checker.events)]
    if problem is not None:
        warnings.append(f"{source}: record batch {checker.batches} is damaged ({problem}); "
                        "it and everything after it were ignored")
    warnings.append(
        f"{source}: damaged tail: the Arrow footer is missing (writer crashed or file cut "
        f"short); {tail} bytes after the last complete batch were ignored")
    warnings += _suspects(source, checker)
    return Trace(path=file, metadata=metadata, summary=None, num_events=checker.events,
                 warnings=tuple(warnings), layout=Layout("stream", checker.batches))


def _footer_damaged(file: Path, source: str, metadata: RunMetadata, summary: Summary,
                    checker: BatchChecker, tail: int) -> Trace:
    """A finished trace whose footer was damaged or cut off after the summary batch: whole
    if its events match the summary, as an intact file must."""
    _match_summary(source, summary, checker, also="the Arrow footer is damaged too; ")
    footer = (f"the {tail} bytes after the summary are not a valid Arrow footer (the file "
              "was changed after it was written)" if tail else "the Arrow footer is missing "
              "(the file was cut short)")
    # The digest covers the events only; the run metadata's one check is its copy in the
    # footer, which is gone: say so, since replay would blame the emulator for altered seeds.
    warnings = [f"{source}: damaged footer: {footer}; every event was read and matches the "
                "summary's digest, but the run metadata (scenario, seed) cannot be checked"]
    warnings += _suspects(source, checker)
    return Trace(path=file, metadata=metadata, summary=summary, num_events=checker.events,
                 warnings=tuple(warnings), layout=Layout("stream", checker.batches))


def _check_nothing_follows(stream: ipc.RecordBatchStreamReader, source: str) -> None:
    """The summary is the writer's last batch: another batch after it means the file was
    assembled or altered, and no digest vouches for what follows."""
    try:
        stream.read_next_batch()
    except (StopIteration, pa.ArrowException, OSError, ValueError):
        return  # the end of the stream, or the damage that took the footer
    raise TraceFormatError(f"{source}: damaged trace: record batches follow the summary (the "
                           "file was changed after it was written)")
