"""Writing and reading traces: round trip, metadata, digest, writer safety."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from tdxtrace.errors import OutputError, TraceFormatError
from tdxtrace.schema import COLUMN_NAMES, FIELDS, arrow_schema
from tdxtrace.trace import RunMetadata, Trace, TraceWriter, open_trace, write_events
from tdxtrace.trace.metadata import Summary
from tdxtrace.trace.writer import conform_events

META = RunMetadata(scenario_name="zero-step", scenario_text='{"name":"zéro"}', seed=7,
                   policies={"hkid_release": "late"})


def _polars_dtype(arrow_type: pa.DataType) -> pl.DataType:
    return pl.from_arrow(pa.array([], type=arrow_type)).dtype  # type: ignore[union-attr]


def _values(arrow_type: pa.DataType) -> st.SearchStrategy[object]:
    if arrow_type == pa.bool_():
        return st.booleans()
    width = arrow_type.bit_width
    if pa.types.is_signed_integer(arrow_type):
        return st.integers(-(1 << (width - 1)), (1 << (width - 1)) - 1)
    return st.integers(0, (1 << width) - 1)


@st.composite
def event_frames(draw: st.DrawFn) -> pl.DataFrame:
    """Frames with every v1 column (seq sometimes left out), nulls where the schema allows."""
    rows = draw(st.integers(0, 40))
    data: dict[str, pl.Series] = {}
    for f in FIELDS:
        if f.name == "seq" and draw(st.booleans()):
            continue
        if f.name == "seq":
            values: list[object] = list(range(rows))
        else:
            element = _values(f.type)
            if f.nullable:
                element = st.one_of(st.none(), element)
            values = draw(st.lists(element, min_size=rows, max_size=rows))
        data[f.name] = pl.Series(f.name, values, dtype=_polars_dtype(f.type))
    return pl.DataFrame(data)


@settings(max_examples=40, deadline=None)
@given(frame=event_frames(), batch_rows=st.integers(1, 50),
       compression=st.sampled_from(["zstd", "lz4", "none"]))
def test_events_metadata_and_summary_survive_a_round_trip(
        frame: pl.DataFrame, batch_rows: int, compression: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.arrow"
        summary = write_events(path, frame, META, truth={"zero_step_armed": 2},
                               batch_rows=batch_rows, compression=compression)
        trace = open_trace(path)
        # Arbitrary values may break the soft rules (unknown kinds, time going backwards):
        # that is reported, but nothing is damaged and every event is read.
        assert trace.finished
        assert all(" events have " in warning for warning in trace.warnings), trace.warnings
        assert trace.metadata == META
        assert trace.summary == summary == Summary(frame.height, summary.digest,
                                                   {"zero_step_armed": 2})
        assert trace.num_events() == frame.height
        events = trace.events().collect()
        assert events.columns == list(COLUMN_NAMES)
        assert events["seq"].to_list() == list(range(frame.height))
        assert_frame_equal(events.select(frame.columns), frame)
        batches = list(trace.iter_batches())
        assert all(0 < batch.num_rows <= batch_rows for batch in batches)
        assert sum(batch.num_rows for batch in batches) == frame.height
        # Same events in memory: same digest, whatever the batching and compression on disk.
        assert Trace.from_frame(frame).summary == Summary(frame.height, summary.digest, {})
        assert_frame_equal(trace.observable().collect(), events.filter(~pl.col("truth")))


def test_digest_ignores_batch_size_and_compression(tmp_path: Path,
                                                   events_frame: pl.DataFrame) -> None:
    small = write_events(tmp_path / "a.arrow", events_frame, META, batch_rows=7)
    large = write_events(tmp_path / "b.arrow", events_frame, META, compression="lz4")
    assert (tmp_path / "a.arrow").read_bytes() != (tmp_path / "b.arrow").read_bytes()
    assert small.digest == large.digest
    assert small.digest.startswith("sha256:") and len(small.digest) == len("sha256:") + 64


@pytest.mark.parametrize("column", [f.name for f in FIELDS if f.name != "seq"])
def test_digest_changes_when_one_field_of_one_row_changes(events_frame: pl.DataFrame,
                                                          column: str) -> None:
    table = conform_events(events_frame)
    base = Trace.from_frame(pl.from_arrow(table)).summary  # type: ignore[arg-type]
    values = table.column(column).to_pylist()
    row = 501
    if values[row] is None:
        values[row] = 0  # null -> 0 must count as a change (validity is hashed)
    elif isinstance(values[row], bool):
        values[row] = not values[row]
    else:
        values[row] = values[row] ^ 1
    changed = table.set_column(table.schema.get_field_index(column), column,
                               pa.array(values, type=table.schema.field(column).type))
    other = Trace.from_frame(pl.from_arrow(changed)).summary  # type: ignore[arg-type]
    assert base is not None and other is not None
    assert other.digest != base.digest


def test_identical_writes_give_identical_bytes(tmp_path: Path,
                                               events_frame: pl.DataFrame) -> None:
    write_events(tmp_path / "a.arrow", events_frame, META, truth={"b": 1, "a": 2})
    write_events(tmp_path / "b.arrow", events_frame, META, truth={"a": 2, "b": 1})
    assert (tmp_path / "a.arrow").read_bytes() == (tmp_path / "b.arrow").read_bytes()


def test_metadata_without_seed_or_scenario_round_trips(tmp_path: Path) -> None:
    imported = RunMetadata(producer="perf-import", policies={})
    write_events(tmp_path / "t.arrow", pl.DataFrame({"ts_ns": [5], "kind": [1]}), imported)
    trace = open_trace(tmp_path / "t.arrow")
    assert trace.metadata == imported
    assert trace.metadata.seed is None


def test_a_trace_with_no_events_is_finished_and_scans(tmp_path: Path) -> None:
    path = tmp_path / "empty.arrow"
    summary = write_events(path, pl.DataFrame({"ts_ns": [], "kind": []}), META)
    trace = open_trace(path)
    assert trace.finished and summary.events == 0 == trace.num_events()
    assert trace.events().collect().shape == (0, len(COLUMN_NAMES))
    assert list(trace.iter_batches()) == []


def test_file_names_with_glob_characters_are_read_literally(tmp_path: Path,
                                                            events_frame: pl.DataFrame) -> None:
    path = tmp_path / "run[1]*.arrow"
    write_events(path, events_frame, META)
    assert open_trace(path).events().select(pl.len()).collect().item() == 1000


def test_from_frame_fills_defaults_and_derives_truth_from_kind() -> None:
    trace = Trace.from_frame(pl.DataFrame({"ts_ns": [0, 10], "kind": [1, 100]}))
    events = trace.events().collect()
    assert events["seq"].to_list() == [0, 1]
    assert events["truth"].to_list() == [False, True]
    assert events.select("dur_ns", "flow", "sub").rows() == [(0, 0, 0), (0, 0, 0)]
    assert events["gpa"].null_count() == 2
    assert trace.observable().collect().height == 1
    assert trace.finished and trace.metadata == RunMetadata()


@pytest.mark.parametrize(("frame", "message"), [
    (pl.DataFrame({"ts_ns": [0], "kind": [1], "vpcu": [0]}), "column vpcu is not part"),
    (pl.DataFrame({"ts_ns": [0]}), "missing column kind"),
    (pl.DataFrame({"kind": [1]}), "missing column ts_ns"),
    (pl.DataFrame({"ts_ns": [None], "kind": [1]}), "column ts_ns has 1 null values"),
    (pl.DataFrame({"ts_ns": [0], "kind": [300]}), "column kind cannot be cast to uint8"),
    (pl.DataFrame({"seq": [0, 2], "ts_ns": [0, 1], "kind": [1, 1]}),
     "column seq must be 0, 1, 2, ... without gaps (row 1 has 2)"),
])
def test_from_frame_rejects_bad_frames(frame: pl.DataFrame, message: str) -> None:
    with pytest.raises(TraceFormatError, match=f"^frame: {message}".replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        Trace.from_frame(frame)


def _batch(start: int, rows: int) -> pa.RecordBatch:
    table = conform_events(pl.DataFrame({"ts_ns": list(range(rows)), "kind": [1] * rows}))
    seq = pa.array(range(start, start + rows), type=pa.int64())
    return table.set_column(0, "seq", seq).to_batches()[0]


def test_writer_refuses_an_existing_file_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "run.arrow"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputError, match=f"^{path}: already exists"):
        TraceWriter(path, META)
    assert path.read_bytes() == b"keep me"
    with TraceWriter(path, META, force=True) as writer:
        writer.write_batch(_batch(0, 3))
    assert open_trace(path).num_events() == 3


def test_writer_reports_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        TraceWriter(tmp_path / "nope" / "run.arrow", META)


def test_writer_keeps_the_name_free_until_close(tmp_path: Path) -> None:
    path = tmp_path / "run.arrow"
    writer = TraceWriter(path, META)
    writer.write_batch(_batch(0, 10))
    writer.write_batch(_batch(10, 5))
    partial = writer.partial_path
    assert not path.exists() and partial.parent == tmp_path and partial.exists()
    assert partial.name.startswith(".run.arrow.") and partial.name.endswith(".partial")
    assert writer.events_written == 15
    summary = writer.close({"faults": 1})
    assert path.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run.arrow"]
    assert summary.events == 15 and open_trace(path).summary == summary


@pytest.mark.parametrize(("batch", "message"), [
    (_batch(1, 3), r"batch seq runs 1\.\.3, expected 0\.\.2"),
    (_batch(0, 3).drop_columns(["arg2"]), "batch columns"),
    (pa.RecordBatch.from_arrays(
        [*_batch(0, 3).columns[:-1], pa.array([1, 2, 3], type=pa.int64())],
        names=list(COLUMN_NAMES)), "batch column arg2 has type int64, expected uint64"),
    (pa.RecordBatch.from_arrays(
        [*_batch(0, 3).columns[:2], pa.array([1, None, 3], type=pa.int64()),
         *_batch(0, 3).columns[3:]], names=list(COLUMN_NAMES)), "batch column dur_ns has nulls"),
])
def test_writer_rejects_bad_batches(tmp_path: Path, batch: pa.RecordBatch, message: str) -> None:
    with TraceWriter(tmp_path / "run.arrow", META) as writer:
        with pytest.raises(TraceFormatError, match=message):
            writer.write_batch(batch)
        writer.abort()
    assert list(tmp_path.iterdir()) == []


_DISK_FULL = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
import polars as pl
from tdxtrace.errors import OutputError
from tdxtrace.trace import RunMetadata, write_events
events = pl.DataFrame({"ts_ns": range(100_000), "kind": [1] * 100_000})
try:
    write_events(sys.argv[1], events, RunMetadata(), compression="none")
except OutputError as err:
    print(err)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE/SIGXFSZ semantics")
def test_a_full_disk_is_an_output_error_and_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "run.arrow"
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": package_root}
    done = subprocess.run([sys.executable, "-c", _DISK_FULL, str(path)], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.startswith(f"{path}: cannot write: File too large")
    assert list(tmp_path.iterdir()) == []


def test_the_file_schema_is_v1_with_run_metadata_and_field_docs(
        trace_file: Path, run_metadata: RunMetadata) -> None:
    with pa.memory_map(str(trace_file)) as source:
        schema = ipc.open_file(source).schema
    assert schema.equals(arrow_schema(run_metadata.to_arrow()), check_metadata=True)
