"""Damaged, unfinished and foreign files: what can be saved is read, the rest is one clear line."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from fuzz_corpus import message_ends
from polars.testing import assert_frame_equal

from tdxtrace.errors import TraceFormatError
from tdxtrace.schema import FIELDS, META_SCHEMA_VERSION, META_SEED, arrow_schema
from tdxtrace.trace import RunMetadata, TraceWriter, open_trace
from tdxtrace.trace.digest import digest_batches
from tdxtrace.trace.metadata import Summary
from tdxtrace.trace.writer import conform_events


def _cut_points(path: Path) -> list[tuple[int, int | None]]:
    """(cut offset, complete data batches expected; None = nothing readable)."""
    ends = message_ends(path.read_bytes())  # schema, 10 data batches, summary
    size = path.stat().st_size
    points: list[tuple[int, int | None]] = [(7, None), (9, None), (ends[0] - 1, None)]
    for k, end in enumerate(ends[:-1]):
        points.append((end, k))  # exactly at a batch boundary
        following = ends[k + 1]
        points += [(end + 1, k), ((end + following) // 2, k), (following - 1, k)]
    data_batches = len(ends) - 2
    points += [(ends[-1], data_batches), (ends[-1] + 4, data_batches),
               (size - 10, data_batches), (size - 1, data_batches)]
    return points


def test_a_file_cut_anywhere_keeps_every_complete_batch(tmp_path: Path, trace_file: Path) -> None:
    data = trace_file.read_bytes()
    full = open_trace(trace_file).events().collect()
    points = _cut_points(trace_file)
    assert len(points) >= 30
    summary_end = message_ends(data)[-1]
    cut = tmp_path / "cut.arrow"
    for offset, batches in points:
        cut.write_bytes(data[:offset])
        if batches is None:
            with pytest.raises(TraceFormatError, match=f"^{cut}: damaged Arrow IPC file"):
                open_trace(cut)
            continue
        trace = open_trace(cut)
        if offset >= summary_end:  # only the footer is lost: the summary vouches for all
            assert trace.finished and trace.num_events() == batches * 100, offset
            assert trace.warnings[0].startswith(f"{cut}: damaged footer: "), trace.warnings
            assert_frame_equal(trace.events().collect(), full)
            continue
        assert not trace.finished and trace.summary is None, offset
        plural = "batch" if batches == 1 else "batches"
        assert trace.warnings[0] == (f"{cut}: unfinished trace (no summary): {batches} "
                                     f"complete {plural}, {batches * 100} events read")
        assert trace.warnings[1].startswith(f"{cut}: damaged tail: the Arrow footer is missing")
        assert trace.num_events() == batches * 100
        assert len(list(trace.iter_batches())) == batches
        assert_frame_equal(trace.events().collect(), full.head(batches * 100))


def test_close_unfinished_gives_an_unfinished_trace_with_every_batch(
        tmp_path: Path, events_frame: pl.DataFrame, run_metadata: RunMetadata) -> None:
    path = tmp_path / "run.arrow"
    table = conform_events(events_frame)
    writer = TraceWriter(path, run_metadata)
    for batch in table.to_batches(max_chunksize=400):
        writer.write_batch(batch)
    assert writer.close_unfinished() == path
    trace = open_trace(path)
    assert not trace.finished and trace.summary is None
    assert trace.warnings == (
        f"{path}: unfinished trace (no summary): 3 complete batches, 1000 events read",)
    assert trace.metadata == run_metadata
    assert_frame_equal(trace.events().collect(), pl.from_arrow(table))  # type: ignore[arg-type]


def _summary_with_wrong_count(path: Path) -> Path:
    """A finished trace of 3 events whose summary has their digest but says 5."""
    schema = arrow_schema(RunMetadata().to_arrow())
    batch = conform_events(pl.DataFrame({"ts_ns": [0, 1, 2], "kind": [1, 1, 1]}))
    digest = digest_batches(batch.to_batches())  # right events, wrong count
    with ipc.new_file(str(path), schema) as writer:
        writer.write_table(batch.cast(schema))
        writer.write_batch(pa.RecordBatch.from_pylist([], schema=schema),
                           custom_metadata=Summary(5, digest, {}).to_arrow())
    return path


@pytest.mark.parametrize("footer", ["intact", "cut off"])
def test_a_summary_whose_count_disagrees_with_the_batches_refuses_the_file(
        tmp_path: Path, footer: str) -> None:
    # The digest covers the rows' values, not their number: a summary that matches the
    # digest but miscounts was altered, and the same answer holds whatever else is damaged.
    path = _summary_with_wrong_count(tmp_path / "run.arrow")
    also = ""
    if footer == "cut off":
        data = path.read_bytes()
        path.write_bytes(data[:message_ends(data)[-1]])
        also = "the Arrow footer is damaged too; "
    with pytest.raises(TraceFormatError, match=(
            f"^{path}: damaged trace: {also}the summary says 5 events but the file holds 3 "
            r"\(the summary was changed")):
        open_trace(path)


def test_batches_after_the_summary_of_a_footerless_file_refuse_it(tmp_path: Path) -> None:
    # Batches after the summary: no digest vouches for them, and the writer never writes any.
    schema = arrow_schema(RunMetadata().to_arrow())
    events = conform_events(pl.DataFrame({"ts_ns": [0, 1, 2], "kind": [1, 1, 1]})).cast(schema)
    first, more = events.slice(0, 2).to_batches()[0], events.slice(2).to_batches()[0]
    path = tmp_path / "run.arrow"
    with ipc.new_file(str(path), schema) as writer:
        writer.write_batch(first)
        writer.write_batch(pa.RecordBatch.from_pylist([], schema=schema),
                           custom_metadata=Summary(2, digest_batches([first]), {}).to_arrow())
        writer.write_batch(more)
    data = path.read_bytes()
    path.write_bytes(data[:message_ends(data)[-1]])  # no footer
    with pytest.raises(TraceFormatError, match=f"^{path}: damaged trace: record batches follow "
                                               "the summary"):
        open_trace(path)


def test_a_footer_cut_off_exactly_says_the_metadata_cannot_be_checked(
        tmp_path: Path, trace_file: Path) -> None:
    data = trace_file.read_bytes()
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(data[:message_ends(data)[-1]])
    trace = open_trace(cut)
    assert trace.finished and trace.warnings == (
        f"{cut}: damaged footer: the Arrow footer is missing (the file was cut short); every "
        "event was read and matches the summary's digest, but the run metadata (scenario, "
        "seed) cannot be checked",)


def _arrow_file(path: Path, schema: pa.Schema) -> Path:
    with ipc.new_file(str(path), schema) as writer:
        writer.write_table(schema.empty_table())
    return path


def _v1_schema(**meta: str) -> pa.Schema:
    return arrow_schema({**RunMetadata().to_arrow(), **meta})


def _without(schema: pa.Schema, column: str) -> pa.Schema:
    return schema.remove(schema.get_field_index(column))


def _retyped(schema: pa.Schema, column: str, new_type: pa.DataType) -> pa.Schema:
    index = schema.get_field_index(column)
    return schema.set(index, schema.field(index).with_type(new_type))


def _bad_files(tmp: Path) -> list[tuple[Path, str]]:
    fifo = tmp / "fifo.arrow"
    os.mkfifo(fifo)
    (tmp / "folder.arrow").mkdir()
    (tmp / "empty.arrow").write_bytes(b"")
    (tmp / "garbage.arrow").write_bytes(b"PAR1 this is not an arrow file at all\n" * 20)
    (tmp / "magic-only.arrow").write_bytes(b"ARROW1")
    table = pa.table({"x": [1, 2]})
    with ipc.new_stream(str(tmp / "stream.arrow"), table.schema) as writer:
        writer.write_table(table)
    return [
        (tmp / "missing.arrow", "does not exist"),
        (tmp / "folder.arrow", "is a directory, not a trace file"),
        (fifo, "not a regular file"),
        (tmp / "empty.arrow", "empty file"),
        (tmp / "garbage.arrow", "not an Arrow IPC file (bad magic)"),
        (tmp / "stream.arrow", "not an Arrow IPC file (bad magic); it looks like an Arrow IPC "
                               "stream, not the Arrow IPC file format tdxtrace writes"),
        (tmp / "magic-only.arrow", "damaged Arrow IPC file (cut short before the schema ended)"),
        (_arrow_file(tmp / "plain.arrow", table.schema),
         "not a tdxtrace trace (no tdxtrace.format metadata)"),
        (_arrow_file(tmp / "v99.arrow", _v1_schema(**{META_SCHEMA_VERSION: "99"})),
         "schema version 99 is not supported (this tdxtrace reads 1)"),
        (_arrow_file(tmp / "other.arrow", _v1_schema(**{"tdxtrace.format": "perfetto"})),
         "not a tdxtrace trace (tdxtrace.format is 'perfetto')"),
        (_arrow_file(tmp / "seed.arrow", _v1_schema(**{META_SEED: "forty-two"})),
         "metadata tdxtrace.seed is 'forty-two', expected a decimal integer"),
        (_arrow_file(tmp / "no-gpa.arrow", _without(_v1_schema(), "gpa")),
         "missing column gpa"),
        (_arrow_file(tmp / "int-gpa.arrow", _retyped(_v1_schema(), "gpa", pa.int64())),
         "column gpa has type int64, expected uint64"),
    ]


def test_unreadable_files_give_one_line_naming_the_file_and_the_problem(tmp_path: Path) -> None:
    for path, problem in _bad_files(tmp_path):
        with pytest.raises(TraceFormatError) as caught:
            open_trace(path)
        assert str(caught.value) == f"{path}: {problem}"


def test_every_v1_column_is_checked(tmp_path: Path) -> None:
    for f in FIELDS:
        path = _arrow_file(tmp_path / f"no-{f.name}.arrow", _without(_v1_schema(), f.name))
        with pytest.raises(TraceFormatError, match=f"missing column {f.name}$"):
            open_trace(path)


def _damage_batch_3(path: Path, out: Path) -> Path:
    ends = message_ends(path.read_bytes())
    data = bytearray(path.read_bytes())
    middle = (ends[3] + ends[4]) // 2
    data[middle:ends[4]] = b"\xff" * (ends[4] - middle)  # the tail of batch 3's body
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("finished", [True, False])
def test_a_damaged_batch_in_an_intact_file_refuses_the_file(
        tmp_path: Path, events_frame: pl.DataFrame, run_metadata: RunMetadata,
        finished: bool) -> None:
    path = tmp_path / "run.arrow"
    writer = TraceWriter(path, run_metadata, batch_rows=100)
    for batch in conform_events(events_frame).to_batches(max_chunksize=100):
        writer.write_batch(batch)
    writer.close() if finished else writer.close_unfinished()
    damaged = _damage_batch_3(path, tmp_path / "damaged.arrow")
    # Every batch is decoded and checked when the file is opened. With its footer intact the
    # file was written completely, so the damage came later and may be anywhere: the batches
    # before it cannot be vouched for either.
    with pytest.raises(TraceFormatError, match=f"^{damaged}: damaged trace: record batch 3 "
                       r"cannot be decoded: .*; an intact file is read whole or not at all\)$"):
        open_trace(damaged)
