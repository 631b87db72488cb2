"""The content digest, computed on several threads as open_trace does, is the writer's digest.

open_trace hashes large batches on worker threads, each owning a group of columns; every
column's streams must still see the batches in order, or a good trace would be called damaged
(and a damaged one might pass).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from conftest import make_events

from tdxtrace.errors import TraceFormatError
from tdxtrace.schema import COLUMN_NAMES, FIELDS, arrow_schema
from tdxtrace.trace import RunMetadata, open_trace
from tdxtrace.trace.digest import ContentDigest, digest_batches
from tdxtrace.trace.metadata import Summary
from tdxtrace.trace.writer import conform_events


@pytest.mark.parametrize("count", [1, 2, 3, len(COLUMN_NAMES), len(COLUMN_NAMES) + 2])
def test_column_groups_cover_every_column_once_and_share_the_bytes(count: int) -> None:
    groups = ContentDigest().column_groups(count)
    assert sorted(i for group in groups for i in group) == list(range(len(COLUMN_NAMES)))
    assert len(groups) == min(count, len(COLUMN_NAMES))
    width = {i: FIELDS[i].type.bit_width + 8 for i in range(len(FIELDS))}
    loads = [sum(width[i] for i in group) for group in groups]
    assert max(loads) - min(loads) <= max(width.values())  # no group much heavier


def test_feeding_column_groups_apart_gives_the_whole_digest() -> None:
    batches = conform_events(make_events(3000)).to_batches(max_chunksize=700)
    digest = ContentDigest()
    for group in digest.column_groups(2):  # one group entirely, then the other
        for batch in batches:
            digest.update(batch, group)
    assert digest.hexdigest() == digest_batches(batches)


def _written(path: Path, table: pa.Table, summary: Summary) -> Path:
    schema = arrow_schema(RunMetadata().to_arrow())
    with ipc.new_file(str(path), schema) as writer:
        for batch in table.cast(schema).to_batches(max_chunksize=9000):
            writer.write_batch(batch)
        writer.write_batch(pa.RecordBatch.from_pylist([], schema=schema),
                           custom_metadata=summary.to_arrow())
    return path


def test_large_batches_hashed_on_worker_threads_match_and_one_changed_value_is_caught(
        tmp_path: Path) -> None:
    # Batches of 9000 rows are hashed on the worker threads (smaller ones inline).
    table = conform_events(make_events(30_000))
    summary = Summary(table.num_rows, digest_batches(table.to_batches()), {})
    assert open_trace(_written(tmp_path / "good.arrow", table, summary)).summary == summary
    for column in ("ts_ns", "kind"):  # one column of each group
        assert {COLUMN_NAMES.index(column) in group
                for group in ContentDigest().column_groups(2)} == {True, False}
    for column in ("ts_ns", "kind"):
        values = table.column(column).to_pylist()
        values[25_000] ^= 1  # in the third batch
        changed = table.set_column(COLUMN_NAMES.index(column), column,
                                   pa.array(values, type=table.schema.field(column).type))
        bad = _written(tmp_path / f"{column}.arrow", changed, summary)
        with pytest.raises(TraceFormatError, match="content digest does not match"):
            open_trace(bad)
