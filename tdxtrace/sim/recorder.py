"""Event buffering: the emulator's rows become Arrow record batches of the v1 schema.

Rows are appended to one flat list (one ``extend`` per event) and turned into columns by strided
slicing (``flat[k::width]``, a C-level copy). Keeping tuples and transposing with ``zip(*rows)``
cost ~0.8 µs per event, more than the rest of the recording. Each column list becomes a polars
Series: ~11 ns per value against ~20 ns for ``pa.array``, with the same Arrow arrays (nulls
included), so the file's bytes do not change. That happens every CHUNK_ROWS rows, while the
rows' int objects are still in the CPU cache (~2 % faster than a whole batch at once); a batch
concatenates its chunks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from tdxtrace.codes import leaf_name, operand_id, operand_name
from tdxtrace.events import TRUTH_KIND_BASE
from tdxtrace.schema import arrow_schema

BATCH_ROWS = 65536
CHUNK_ROWS = 8192  # rows turned into columns at a time (a divisor of BATCH_ROWS)

# Tuple layout of a buffered row; "seq" and "truth" are derived when the batch is built.
_ROW_COLUMNS = ("ts_ns", "dur_ns", "kind", "flow", "sub", "corr", "td", "vcpu", "lp", "leaf",
                "status", "exit_reason", "gpa", "level", "rip", "arg0", "arg1", "arg2")
_WIDTH = len(_ROW_COLUMNS)
_SCHEMA = arrow_schema()
_TYPES = {f.name: f.type for f in _SCHEMA}
_POLARS_TYPES: dict[pa.DataType, type[pl.DataType]] = {
    pa.uint8(): pl.UInt8, pa.uint16(): pl.UInt16, pa.uint32(): pl.UInt32, pa.uint64(): pl.UInt64,
    pa.int32(): pl.Int32, pa.int64(): pl.Int64}
_ROW_POLARS_TYPES = tuple(_POLARS_TYPES[_TYPES[name]] for name in _ROW_COLUMNS)

BatchSink = Callable[[pa.RecordBatch], None]


def _clear_unused_bits(column: pa.Array) -> pa.Array:
    """``column`` with the bits past its end in its validity bitmap's last byte cleared.

    polars may leave them set where ``pa.array`` clears them, and the IPC file stores that
    byte: without this, a batch whose length is not a multiple of 8 (the last one) could
    differ in bytes from earlier tdxtrace versions, though not in content.
    """
    validity, data = column.buffers()
    if validity is None or not column.null_count or column.offset:
        return column  # (a rechunked polars Series converts at offset 0)
    n = len(column)
    bits = bytearray(validity.to_pybytes()[:(n + 7) // 8])
    bits[-1] &= (1 << (n % 8 or 8)) - 1
    return pa.Array.from_buffers(column.type, n, [pa.py_buffer(bytes(bits)), data],
                                 null_count=column.null_count)


class Clock(Protocol):
    """Anything with the current simulated time in ``now`` (the Simulator)."""

    now: int

# Counters every trace's truth carries, 0 when nothing happened (issues 3 and 4).
TRUTH_COUNTERS = ("busy_total", "cache_wb_resumes", "faults", "first_run_flushes", "hkid_leaks",
                  "local_retries", "mapgpa_bad_r11", "mapgpa_conversions", "mapgpa_giveups",
                  "mapgpa_retries",
                  "memory_fault_exits", "migrations", "pages_leaked",
                  "private_zaps_unexpected", "refaults", "sptes_zapped", "synthesized_exits",
                  "teardown_pages_leaked", "teardowns", "vms_bugged", "zaps",
                  "zero_step_incidents")


class EventLog:
    """Collects events, hands full batches to ``sink`` and keeps the ground-truth counters."""

    def __init__(self, sink: BatchSink, clock: Clock, batch_rows: int = BATCH_ROWS) -> None:
        self._sink = sink
        self._clock = clock  # read as clock.now: an attribute, not a call, on the hot path
        self._batch_rows = batch_rows
        self._flat: list[Any] = []
        self._chunks: list[list[pl.Series]] = [[] for _ in _ROW_COLUMNS]  # per column
        self._converted = 0  # rows in self._chunks, not yet in a batch
        self._moving = False  # rows are between the buffer, the chunks and the sink
        self._flat_limit = 0  # buffer length at which _limit() runs (_set_limit)
        self._stop_at = -1  # events a stop_check() waits for; -1: none
        self._stopped: list[bool] = []  # non-empty once they are reached
        self._next_seq = 0
        self._next_corr = 0
        self.counters: Counter[str] = Counter(dict.fromkeys(TRUTH_COUNTERS, 0))
        self.busy_by_leaf_operand: Counter[str] = Counter()
        self.per_td: dict[str, dict[int, int]] = {}
        if type(self).emit is not EventLog.emit:
            # A subclass watches emit (replay --until stops at an event): rows go through it.
            self.row = self._row_through_emit  # type: ignore[method-assign]
        self._set_limit()

    # --- ids and counters -----------------------------------------------------------------
    def new_corr(self) -> int:
        self._next_corr += 1
        return self._next_corr

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def count_busy(self, leaf: int, status: int) -> None:
        self.counters["busy_total"] += 1
        key = f"{leaf_name(leaf)}|{operand_name(operand_id(status))}"
        self.busy_by_leaf_operand[key] += 1

    def record_td_value(self, name: str, td: int, value: int) -> None:
        self.per_td.setdefault(name, {})[td] = value

    @property
    def events(self) -> int:
        return self._next_seq + self._converted + len(self._flat) // _WIDTH

    def stop_check(self, events: int) -> Callable[[], int]:
        """A check for the simulator's run loop, true once ``events`` events are emitted.

        The loop calls it after every step, so it is the C-level ``len`` of a list that the
        row path fills when the count is reached (the buffer limit is lowered to that point),
        not a Python function reading :attr:`events` (~100 ns less per step).
        """
        self._stop_at = events
        self._stopped.clear()
        self._set_limit()
        return self._stopped.__len__

    def _chunk_rows(self) -> int:
        """Rows of the next chunk: CHUNK_ROWS, cut where the batch ends."""
        return min(CHUNK_ROWS, self._batch_rows - self._converted)

    def _set_limit(self) -> None:
        """Run _limit() when the chunk is full, or earlier at the stop_check() count."""
        limit = self._chunk_rows() * _WIDTH
        if self._stop_at >= 0:
            stop = (self._stop_at - self._next_seq - self._converted) * _WIDTH
            if len(self._flat) >= stop:
                self._stopped.append(True)
                self._stop_at = -1
            else:
                limit = min(limit, stop)
        self._flat_limit = limit

    def _limit(self) -> None:
        if len(self._flat) >= self._chunk_rows() * _WIDTH:
            self._convert()
            if self._converted >= self._batch_rows:
                self.flush()
        self._set_limit()

    # --- events ---------------------------------------------------------------------------
    def emit(self, kind: int, *, flow: int = 0, sub: int = 0, corr: int | None = None,
             td: int | None = None, vcpu: int | None = None, lp: int | None = None,
             leaf: int | None = None, status: int | None = None,
             exit_reason: int | None = None, gpa: int | None = None, level: int | None = None,
             rip: int | None = None, arg0: int | None = None, arg1: int | None = None,
             arg2: int | None = None, dur: int = 0) -> None:
        flat = self._flat
        flat.extend((self._clock.now, dur, kind, flow, sub, corr, td, vcpu, lp, leaf, status,
                     exit_reason, gpa, level, rip, arg0, arg1, arg2))
        if len(flat) >= self._flat_limit:
            self._limit()

    def row(self, dur: int, kind: int, flow: int, sub: int, corr: int | None, td: int | None,
            vcpu: int | None, lp: int | None, leaf: int | None, status: int | None,
            exit_reason: int | None, gpa: int | None, level: int | None, rip: int | None,
            arg0: int | None, arg1: int | None, arg2: int | None) -> None:
        """:meth:`emit` with every field positional, in row order: for the hottest call sites.

        Binding 17 keywords costs ~110 ns per call, about a third of emit; a fault writes ~8
        rows. Anywhere else, emit's keywords read better.
        """
        flat = self._flat
        flat.extend((self._clock.now, dur, kind, flow, sub, corr, td, vcpu, lp, leaf, status,
                     exit_reason, gpa, level, rip, arg0, arg1, arg2))
        if len(flat) >= self._flat_limit:
            self._limit()

    def _row_through_emit(self, dur: int, kind: int, flow: int, sub: int, corr: int | None,
                          td: int | None, vcpu: int | None, lp: int | None, leaf: int | None,
                          status: int | None, exit_reason: int | None, gpa: int | None,
                          level: int | None, rip: int | None, arg0: int | None,
                          arg1: int | None, arg2: int | None) -> None:
        self.emit(kind, flow=flow, sub=sub, corr=corr, td=td, vcpu=vcpu, lp=lp, leaf=leaf,
                  status=status, exit_reason=exit_reason, gpa=gpa, level=level, rip=rip,
                  arg0=arg0, arg1=arg1, arg2=arg2, dur=dur)

    def _convert(self) -> None:
        """Turn the buffered rows into one more chunk of every column.

        The columns are built before anything changes, then committed in a few steps, so a
        Ctrl-C while building (most of the time spent here) leaves the rows in the buffer for
        :meth:`salvage`.
        """
        flat = self._flat
        columns = [pl.Series(name, flat[k::_WIDTH], _ROW_POLARS_TYPES[k])
                   for k, name in enumerate(_ROW_COLUMNS)]
        moving, self._moving = self._moving, True
        self._flat = []
        for chunks, column in zip(self._chunks, columns, strict=True):
            chunks.append(column)
        self._converted += len(flat) // _WIDTH
        self._moving = moving

    def salvage(self) -> bool:
        """After Ctrl-C or SIGTERM: flush the rows emitted since the last batch, so that an
        interrupted run keeps every event it wrote, not only its full batches.

        An emitted row is whole (one ``list.extend``), and conversions and flushes change
        nothing until their work is done; an interrupt in the few steps that commit it, or
        inside the sink (the batch may be half written), leaves rows half moved: then nothing
        more is written (False), and the trace ends at its last whole batch.
        """
        if self._moving:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        """Turn the buffered rows into one record batch and hand it to the sink."""
        if self._flat:
            self._convert()
        n = self._converted
        if not n:
            return
        arrays: dict[str, pa.Array] = {
            # pa.array(range(...)) walks Python ints (~80 ns/row); int_range does not.
            "seq": pl.int_range(self._next_seq, self._next_seq + n, dtype=pl.Int64,
                                eager=True).to_arrow(),
        }
        for k, name in enumerate(_ROW_COLUMNS):
            column = pl.concat(self._chunks[k], rechunk=True).to_arrow()
            arrays[name] = _clear_unused_bits(column) if n % 8 else column
        arrays["truth"] = pc.greater_equal(arrays["kind"], pa.scalar(TRUTH_KIND_BASE, pa.uint8()))
        batch = pa.RecordBatch.from_arrays([arrays[f.name] for f in _SCHEMA], schema=_SCHEMA)
        self._moving = True
        self._sink(batch)
        for chunks in self._chunks:
            chunks.clear()
        self._converted = 0
        self._next_seq += n
        self._set_limit()
        self._moving = False

    def truth(self) -> dict[str, Any]:
        """The ground-truth counters, JSON-ready, keys sorted for a stable summary."""
        out: dict[str, Any] = {k: int(v) for k, v in sorted(self.counters.items())}
        out["busy_by_leaf_operand"] = dict(sorted(self.busy_by_leaf_operand.items()))
        for name, per_td in sorted(self.per_td.items()):
            out[name] = [per_td[td] for td in sorted(per_td)]
        return out
