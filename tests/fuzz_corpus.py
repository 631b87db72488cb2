"""A corpus of damaged trace files, generated into a folder (nothing binary is committed).

:func:`build_corpus` writes a few small, good traces (finished with zstd, lz4 and no
compression; unfinished) and every kind of damage the reader must survive:

* truncation at every message boundary and inside every message (one byte in, the middle,
  one byte short), for a finished and an unfinished trace;
* bit flips sampled from each region of a finished file: the schema message, each batch's
  header and body, the summary batch, the footer and the trailing length and magic;
* absurd lengths written over a message's length prefix and a compressed buffer's size prefix;
* wrong magic, a stream without the file magic, a zero-length file, a directory, a FIFO;
* valid Arrow that is not a v1 trace (missing column, wrong type, a dictionary-encoded column
  with a huge dictionary, no tdxtrace metadata, an unknown schema version);
* valid Arrow that breaks the format's rules: nulls in not-null columns, ``seq`` with a gap,
  out-of-range codes (``kind`` 250, ``flow`` 99), time going backwards.

Each :class:`Case` says what must happen: ``"error"`` (one line naming the file),
``"partial"`` (a correct prefix of the events, with a warning), ``"full"`` (every event, with
or without warnings), ``"whole"`` (cut after the summary: every event, finished, with a
damaged-footer warning) or ``"any"`` (an error or a correct partial read; bit flips land
anywhere).
:func:`check_case` is the oracle shared by the corpus test and the hypothesis tests.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
from conftest import make_events
from polars.testing import assert_frame_equal

from tdxtrace.errors import TraceFormatError
from tdxtrace.schema import META_SCHEMA_VERSION, arrow_schema
from tdxtrace.trace import RunMetadata, Trace, TraceWriter, open_trace, write_events
from tdxtrace.trace.digest import digest_batches
from tdxtrace.trace.metadata import Summary
from tdxtrace.trace.writer import conform_events

EVENTS = 1000
BATCH_ROWS = 100
FLIPS_PER_REGION = 12
METADATA = RunMetadata(scenario_name="fault-storm", scenario_text='{"td":{"vcpus":4}}', seed=9,
                       policies={"frozen_spte": "local_retry"})
TRUTH = {"faults": 12}


@dataclass(frozen=True, eq=False)
class Case:
    name: str
    path: Path
    expect: str  # "error" | "partial" | "full" | "whole" | "any"
    base: str  # the good trace it was made from ("" when built from scratch)
    events: pl.DataFrame | None = None  # what a full read gives, when not the base's events


@dataclass(frozen=True)
class Base:
    """A good trace the damage starts from, and what reading it gives."""

    name: str
    path: Path
    data: bytes
    events: pl.DataFrame
    finished: bool


def message_ends(data: bytes) -> list[int]:
    """Byte offsets where the schema message and each record batch message end."""
    source = pa.BufferReader(data)
    source.seek(8)
    stream = ipc.open_stream(source)
    ends = [source.tell()]
    for _ in stream:
        ends.append(source.tell())
    return ends


def _header_end(data: bytes, start: int) -> int:
    """Where a message's flatbuffer header (after the continuation and length) ends."""
    (length,) = struct.unpack_from("<i", data, start + 4)
    return start + 8 + length


def make_bases(folder: Path) -> dict[str, Base]:
    """Good traces: finished with each compression, and one interrupted run."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = make_events(EVENTS)
    events = conform_events(frame)
    bases: dict[str, Base] = {}
    for compression in ("zstd", "lz4", "none"):
        path = folder / f"finished-{compression}.arrow"
        write_events(path, frame, METADATA, truth=TRUTH, batch_rows=BATCH_ROWS,
                     compression=compression)
        bases[path.stem] = Base(path.stem, path, path.read_bytes(), _frame(events), True)
    path = folder / "unfinished.arrow"
    writer = TraceWriter(path, METADATA, batch_rows=BATCH_ROWS)
    for batch in events.slice(0, 700).to_batches(max_chunksize=BATCH_ROWS):
        writer.write_batch(batch)
    writer.close_unfinished()
    bases[path.stem] = Base(path.stem, path, path.read_bytes(), _frame(events.slice(0, 700)),
                            False)
    return bases


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / f"{name}.arrow"
    path.write_bytes(data)
    return path


def truncations(folder: Path, base: Base) -> list[Case]:
    """Cut at every message boundary and inside every message."""
    data, ends = base.data, message_ends(base.data)
    offsets = {1, 4, 7, 8, 9, len(data) - 1, len(data) - 6, len(data) - 10}
    start = 8
    for end in ends:
        offsets |= {end, end + 1, start + 4, (start + end) // 2, end - 1}
        start = end
    cases = []
    for offset in sorted(o for o in offsets if 0 < o < len(data)):
        path = _write(folder, f"{base.name}-cut-{offset}", data[:offset])
        # Before the schema ends nothing can be saved; after it, a prefix always can; once
        # the summary is whole, every event can (the reader checks them against its digest).
        whole = base.finished and offset >= ends[-1]  # a finished trace's last batch: summary
        expect = "error" if offset < ends[0] else "whole" if whole else "partial"
        cases.append(Case(path.stem, path, expect, base.name))
    return cases


def _regions(data: bytes) -> dict[str, tuple[int, int]]:
    ends = message_ends(data)
    regions = {"magic": (0, 8), "schema": (8, ends[0])}
    for i, (start, end) in enumerate(itertools.pairwise(ends[:-1])):
        header = _header_end(data, start)
        regions[f"batch{i}-header"] = (start, header)
        regions[f"batch{i}-body"] = (header, end)
    regions["summary"] = (ends[-2], ends[-1])
    regions["footer"] = (ends[-1], len(data) - 10)
    regions["trailer"] = (len(data) - 10, len(data))
    return regions


def bit_flips(folder: Path, base: Base, per_region: int = FLIPS_PER_REGION) -> list[Case]:
    """Single bit flips sampled (with a fixed seed) from every region of the file."""
    cases = []
    for number, (region, (start, end)) in enumerate(sorted(_regions(base.data).items())):
        rng = random.Random(f"{base.name}/{region}")
        bits = min(per_region, (end - start) * 8)
        for position in sorted(rng.sample(range(start * 8, end * 8), bits)):
            offset, bit = divmod(position, 8)
            data = bytearray(base.data)
            data[offset] ^= 1 << bit
            path = _write(folder, f"{base.name}-flip{number}-{region}-{offset}-{bit}", data)
            cases.append(Case(path.stem, path, "any", base.name))
    return cases


def absurd_lengths(folder: Path, base: Base) -> list[Case]:
    """Lengths that would make a trusting reader allocate far more than the file holds."""
    data, ends = base.data, message_ends(base.data)
    cases = []
    for i, start in enumerate(ends[:3]):
        for value in (0x7FFFFFFF, -8, 0):
            damaged = bytearray(data)
            struct.pack_into("<i", damaged, start + 4, value)  # the metadata length
            path = _write(folder, f"{base.name}-msglen{i}-{value}", damaged)
            cases.append(Case(path.stem, path, "any", base.name))
    header = _header_end(data, ends[0])
    for value in (1 << 62, 1 << 40, (1 << 56) + 13, -1):
        damaged = bytearray(data)
        # A compressed buffer starts with its uncompressed size (int64).
        struct.pack_into("<q", damaged, header, value)
        path = _write(folder, f"{base.name}-bufsize-{value}", damaged)
        cases.append(Case(path.stem, path, "any", base.name))
    damaged = bytearray(data)
    struct.pack_into("<i", damaged, len(data) - 10, 0x7FFFFFFF)  # the footer length
    path = _write(folder, f"{base.name}-footerlen", damaged)
    cases.append(Case(path.stem, path, "any", base.name))
    return cases


def _arrow_file(path: Path, schema: pa.Schema, batches: list[pa.RecordBatch],
                summary: Summary | None = None) -> Path:
    with ipc.new_file(str(path), schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
        if summary is not None:
            writer.write_batch(pa.RecordBatch.from_pylist([], schema=schema),
                               custom_metadata=summary.to_arrow())
    return path


def _v1_batch(schema: pa.Schema, rows: int = 50, **columns: pa.Array) -> pa.RecordBatch:
    table = conform_events(make_events(rows))
    arrays = [columns.get(name, table.column(name).combine_chunks()) for name in schema.names]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def foreign_files(folder: Path) -> list[Case]:
    """Files that are not traces, or not v1 traces: each must be one clear error."""
    schema = arrow_schema(METADATA.to_arrow())
    errors: list[Path] = []
    for name, data in (("empty", b""), ("magic-only", b"ARROW1"),
                       ("wrong-magic", b"ARROW2" + bytes(200)),
                       ("text", b"seq,ts_ns,kind\n0,0,1\n" * 50)):
        errors.append(_write(folder, name, data))
    (folder / "a-directory.arrow").mkdir()
    errors.append(folder / "a-directory.arrow")
    os.mkfifo(folder / "a-fifo.arrow")
    errors.append(folder / "a-fifo.arrow")
    good = _v1_batch(schema)
    with ipc.new_stream(str(folder / "stream-not-file.arrow"), schema) as stream:
        stream.write_batch(good)
    errors.append(folder / "stream-not-file.arrow")
    errors.append(_arrow_file(folder / "no-metadata.arrow", arrow_schema(), []))
    unknown = arrow_schema({**METADATA.to_arrow(), META_SCHEMA_VERSION: "7"})
    errors.append(_arrow_file(folder / "schema-v7.arrow", unknown, []))
    missing = schema.remove(schema.get_field_index("gpa"))
    errors.append(_arrow_file(folder / "missing-gpa.arrow", missing, []))
    index = schema.get_field_index("status")
    retyped = schema.set(index, pa.field("status", pa.float64()))
    errors.append(_arrow_file(folder / "float-status.arrow", retyped, []))
    # A dictionary-encoded kind column with a dictionary of two million entries.
    kind_type = pa.dictionary(pa.int32(), pa.int64())
    dict_schema = schema.set(schema.get_field_index("kind"), pa.field("kind", kind_type))
    dictionary = pa.DictionaryArray.from_arrays(
        pa.array([0] * 50, pa.int32()), pa.array(range(2_000_000), pa.int64()))
    errors.append(_arrow_file(folder / "huge-dictionary.arrow", dict_schema,
                              [_v1_batch(dict_schema, kind=dictionary)]))
    return [Case(p.stem, p, "error", "") for p in errors]


def _cut_before_footer(path: Path) -> bytes:
    data = path.read_bytes()
    return data[:message_ends(data)[-1]]


def rule_breakers(folder: Path) -> list[Case]:
    """Valid Arrow with the right schema and a matching digest whose second batch breaks a
    rule. A hard rule (nulls where none are allowed, ``seq`` not continuing) refuses an intact
    file, and ends the readable part of one cut short; a soft rule (unknown codes, time going
    backwards) is read in full with a warning."""
    schema = arrow_schema(METADATA.to_arrow())
    good = _v1_batch(schema)
    rest = conform_events(make_events(100)).slice(50).to_batches()[0]
    second = pa.RecordBatch.from_arrays(rest.columns, schema=schema)
    cases: list[Case] = []

    def add(name: str, expect: str, bad: pa.RecordBatch) -> None:
        table = pa.Table.from_batches([good, bad])
        summary = Summary(100, digest_batches([good, bad]), {})
        path = _arrow_file(folder / f"{name}.arrow", schema, [good, bad], summary)
        cases.append(Case(name, path, expect, "", _frame(table)))
        if expect == "error":
            # Cut short before the footer (a crashed importer): the batch before it is kept.
            cut = _write(folder, f"{name}-cut", _cut_before_footer(path))
            cases.append(Case(f"{name}-cut", cut, "partial", "", _frame(table)))

    def column(name: str, values: list[object]) -> pa.RecordBatch:
        array = pa.array(values, schema.field(name).type)
        return second.set_column(schema.get_field_index(name), schema.field(name), array)

    def nulls(name: str) -> pa.RecordBatch:
        values = second.column(name).to_pylist()
        return column(name, [None if i % 7 == 3 else v for i, v in enumerate(values)])

    for name in ("seq", "ts_ns", "dur_ns", "kind", "truth", "flow", "sub"):
        add(f"nulls-in-{name}", "error", nulls(name))
    seq = list(range(50, 100))
    add("seq-gap", "error", column("seq", seq[:10] + [s + 1 for s in seq[10:]]))
    add("seq-restarts", "error", column("seq", list(range(50))))
    kinds = second.column("kind").to_pylist()
    add("kind-250", "full", column("kind", [250 if i == 5 else k for i, k in enumerate(kinds)]))
    add("flow-99", "full", column("flow", [99] * 50))
    add("level-9", "full", column("level", [9] * 50))
    add("time-backwards", "full", column("ts_ns", [0] * 50))
    add("negative-duration", "full", column("dur_ns", [-5] * 50))
    return cases


def build_corpus(folder: Path) -> tuple[dict[str, Base], list[Case]]:
    """Write every case into ``folder``; returns the good traces and the cases."""
    bases = make_bases(folder / "bases")
    damaged = folder / "damaged"
    damaged.mkdir()
    cases: list[Case] = []
    for base in bases.values():
        cases += truncations(damaged, base)
        if base.finished:
            cases += bit_flips(damaged, base)
            cases += absurd_lengths(damaged, base)
    cases += foreign_files(damaged)
    cases += rule_breakers(damaged)
    return bases, cases


def expected_events(case: Case, bases: dict[str, Base]) -> pl.DataFrame:
    """What reading ``case`` in full would give (a damaged file gives a prefix of it)."""
    if case.events is not None:
        return case.events
    if case.base:
        return bases[case.base].events
    return _frame(conform_events(make_events(0)))


def check_case(case: Case, expected: pl.DataFrame) -> str:
    """Open and read ``case`` as a user would; return "error", "partial" or "full".

    Fails (AssertionError, or whatever escaped) unless the outcome keeps the guarantee: a
    one-line TraceFormatError naming the file, or events equal to the first rows of
    ``expected`` with a warning whenever rows are missing or the trace is unfinished.
    """
    try:
        trace = open_trace(case.path)
        events = trace.events().collect()
    except TraceFormatError as err:
        message = str(err)
        assert message.startswith(f"{case.path}: ") and "\n" not in message, message
        assert case.expect in ("error", "any"), f"{case.name}: unexpected error: {message}"
        return "error"
    assert case.expect != "error", f"{case.name}: read, expected an error"
    _check_read(case, trace, events, expected)
    return "full" if trace.finished and events.height == expected.height else "partial"


def _check_read(case: Case, trace: Trace, events: pl.DataFrame, expected: pl.DataFrame) -> None:
    assert events.height == trace.num_events() <= expected.height, case.name
    assert_frame_equal(events, expected.head(events.height))
    assert sum(batch.num_rows for batch in trace.iter_batches()) == events.height
    assert trace.metadata == METADATA, case.name
    if trace.finished:
        assert trace.summary is not None
        assert trace.summary.digest == Trace.from_frame(expected).summary.digest  # type: ignore[union-attr]
    if events.height < expected.height or not trace.finished:
        assert trace.warnings, f"{case.name}: rows missing or unfinished, but no warning"
    if case.expect == "partial":
        assert events.height < expected.height or not trace.finished, case.name
    if case.expect == "whole":  # only the footer is damaged
        assert events.height == expected.height and trace.finished, case.name
        assert any("damaged footer" in w for w in trace.warnings), trace.warnings
    if case.expect == "full":
        assert events.height == expected.height and trace.finished, case.name
        assert any(" events have " in w for w in trace.warnings), trace.warnings
