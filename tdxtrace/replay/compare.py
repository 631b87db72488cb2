"""Streaming comparison of a recorded trace with its replay, batch by batch.

The emulator *pushes* record batches into a sink; the recorded trace is *pulled* from the file
with :meth:`Trace.iter_batches`. :class:`StreamComparator` is that sink: for each replayed batch
it takes exactly as many recorded rows (re-chunking the recording to line up), compares the two
slices column by column with Arrow kernels and keeps neither afterwards, so memory stays at
about one batch per side whatever the length of the trace.

Rows are compared by position (row ``i`` of the recording against row ``i`` of the replay),
every v1 column, ``seq`` included. A deleted or inserted row therefore shows as a difference at
its own position; only the first difference is reported.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tdxtrace.schema import COLUMN_NAMES, arrow_schema
from tdxtrace.trace.digest import ContentDigest

_SCHEMA = arrow_schema()


@dataclass(frozen=True)
class Divergence:
    """The first place where the replay and the recording disagree.

    ``seq`` is the position of the first differing event (None when every event matches but
    something else does not, e.g. the summary). ``recorded``/``replayed`` are that row on each
    side (None when that side has no such row) and ``fields`` the columns that differ there.
    """

    seq: int | None
    reason: str
    fields: tuple[str, ...] = ()
    recorded: dict[str, Any] | None = None
    replayed: dict[str, Any] | None = None


class ReplayStopped(Exception):
    """Raised from the sink to stop the emulator once the outcome is known."""


class RowCursor:
    """Rows of a stream of record batches, handed out in slices of any length."""

    def __init__(self, batches: Iterator[pa.RecordBatch]) -> None:
        self._batches = batches
        self._pending: pa.RecordBatch | None = None  # rest of the batch being consumed
        self.exhausted = False

    def take(self, count: int) -> pa.Table:
        """The next ``count`` rows (fewer when the stream ends), as one table."""
        parts: list[pa.RecordBatch] = []
        wanted = count
        while wanted > 0:
            batch = self._next_batch()
            if batch is None:
                break
            if batch.num_rows > wanted:
                self._pending = batch.slice(wanted)
                batch = batch.slice(0, wanted)
            parts.append(batch)
            wanted -= batch.num_rows
        # Batches from a file carry the file's schema metadata; the comparison ignores it.
        return pa.Table.from_batches(
            [pa.RecordBatch.from_arrays(p.columns, schema=_SCHEMA) for p in parts],
            schema=_SCHEMA)

    def _next_batch(self) -> pa.RecordBatch | None:
        if self._pending is not None:
            batch, self._pending = self._pending, None
            return batch
        for batch in self._batches:
            if batch.num_rows:
                return batch
        self.exhausted = True
        return None

    def close(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()  # a generator holding the memory-mapped file releases it now


def _differs(recorded: pa.ChunkedArray, replayed: pa.ChunkedArray) -> pa.ChunkedArray:
    """Per row: True where the values differ (a null equals only a null)."""
    equal = pc.equal(recorded, replayed)  # null where either side is null
    both_null = pc.and_(pc.is_null(recorded), pc.is_null(replayed))
    return pc.invert(pc.fill_null(pc.or_kleene(equal, both_null), False))


def first_difference(recorded: pa.Table, replayed: pa.Table) -> tuple[int, tuple[str, ...]] | None:
    """The first row index where two equally long tables differ, and the columns differing there.

    Vectorized: one Arrow kernel pass per column that is not equal as a whole.
    """
    if recorded.num_rows != replayed.num_rows:
        raise ValueError("first_difference: tables of different lengths")
    if recorded.equals(replayed):
        return None
    masks: dict[str, pa.ChunkedArray] = {}
    for name in COLUMN_NAMES:
        if not recorded.column(name).equals(replayed.column(name)):
            masks[name] = _differs(recorded.column(name), replayed.column(name))
    if not masks:
        return None
    combined = None
    for mask in masks.values():
        combined = mask if combined is None else pc.or_(combined, mask)
    index = int(pc.index(combined, True).as_py())
    fields = tuple(name for name, mask in masks.items() if mask[index].as_py())
    return index, fields


def row_at(table: pa.Table, index: int) -> dict[str, Any]:
    """Row ``index`` of ``table`` as a dict of column -> Python value."""
    row: dict[str, Any] = table.slice(index, 1).to_pylist()[0]
    return row


class StreamComparator:
    """The emulator's sink during a replay: compares each batch with the recording's rows.

    ``limit`` compares only the first ``limit`` events (an unfinished trace's complete events,
    or ``--until``); later replayed rows are counted but not compared. On the first difference
    the divergence is kept and :class:`ReplayStopped` stops the emulator.
    """

    def __init__(self, recorded: Iterator[pa.RecordBatch], *, limit: int | None = None
                 ) -> None:
        self._cursor = RowCursor(recorded)
        self._limit = limit
        self._digest = ContentDigest()
        self.compared = 0  # events compared and equal
        self.replayed = 0  # events the replay produced so far
        self.divergence: Divergence | None = None

    def __call__(self, batch: pa.RecordBatch) -> None:
        start = self.replayed
        self.replayed += batch.num_rows
        if self.divergence is not None:
            raise ReplayStopped()
        count = batch.num_rows if self._limit is None else min(batch.num_rows,
                                                               self._limit - start)
        if count <= 0:
            return  # past the limit (the run stops at the limit's last event anyway)
        replayed_batch = pa.RecordBatch.from_arrays(batch.slice(0, count).columns,
                                                    schema=_SCHEMA)
        replayed = pa.Table.from_batches([replayed_batch])
        recorded = self._cursor.take(count)
        common = recorded.num_rows
        found = first_difference(recorded, replayed.slice(0, common))
        if found is not None:
            index, fields = found
            self._diverge(Divergence(
                start + index, "the events differ", fields,
                row_at(recorded, index), row_at(replayed, index)))
        if common < count:
            self._diverge(Divergence(
                start + common, f"the trace ends after {start + common} events; the replay "
                "continues", COLUMN_NAMES, None, row_at(replayed, common)))
        self._digest.update(replayed_batch)
        self.compared += count

    def _diverge(self, divergence: Divergence) -> None:
        self.divergence = divergence
        raise ReplayStopped()

    def finish(self) -> None:
        """After the replay ended: a recording with rows left over diverges at the first one."""
        try:
            if self.divergence is not None or (self._limit is not None
                                               and self.compared >= self._limit):
                return
            rest = self._cursor.take(1)
            if rest.num_rows:
                self.divergence = Divergence(
                    self.compared, f"the replay ends after {self.compared} events; the trace "
                    "continues", COLUMN_NAMES, row_at(rest, 0), None)
        finally:
            self._cursor.close()

    def close(self) -> None:
        self._cursor.close()

    def hexdigest(self) -> str:
        """The content digest of the events compared so far."""
        return self._digest.hexdigest()
