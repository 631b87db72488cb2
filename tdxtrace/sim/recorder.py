"""Event buffering: the emulator's rows become Arrow record batches of the v1 schema.

Rows are appended to one flat list (one ``extend`` per event) and turned into columns only when
a batch is full, by strided slicing (``flat[k::width]``, a C-level copy). Keeping tuples and
transposing with ``zip(*rows)`` cost ~0.8 µs per event, more than the rest of the recording.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from tdxtrace.codes import leaf_name, operand_id, operand_name
from tdxtrace.events import TRUTH_KIND_BASE
from tdxtrace.schema import arrow_schema

BATCH_ROWS = 65536

# Tuple layout of a buffered row; "seq" and "truth" are derived when the batch is built.
_ROW_COLUMNS = ("ts_ns", "dur_ns", "kind", "flow", "sub", "corr", "td", "vcpu", "lp", "leaf",
                "status", "exit_reason", "gpa", "level", "rip", "arg0", "arg1", "arg2")
_WIDTH = len(_ROW_COLUMNS)
_SCHEMA = arrow_schema()
_TYPES = {f.name: f.type for f in _SCHEMA}

BatchSink = Callable[[pa.RecordBatch], None]


class Clock(Protocol):
    """Anything with the current simulated time in ``now`` (the Simulator)."""

    now: int

# Counters every trace's truth carries, 0 when nothing happened (issues 3 and 4).
TRUTH_COUNTERS = ("busy_total", "faults", "hkid_leaks", "local_retries", "mapgpa_bad_r11",
                  "mapgpa_conversions", "mapgpa_giveups", "mapgpa_retries", "migrations",
                  "private_zaps_unexpected", "refaults", "sptes_zapped", "synthesized_exits",
                  "teardowns", "vms_bugged", "zaps", "zero_step_incidents")


class EventLog:
    """Collects events, hands full batches to ``sink`` and keeps the ground-truth counters."""

    def __init__(self, sink: BatchSink, clock: Clock, batch_rows: int = BATCH_ROWS) -> None:
        self._sink = sink
        self._clock = clock  # read as clock.now: an attribute, not a call, on the hot path
        self._flat: list[Any] = []
        self._flat_limit = batch_rows * _WIDTH
        self._next_seq = 0
        self._next_corr = 0
        self.counters: Counter[str] = Counter(dict.fromkeys(TRUTH_COUNTERS, 0))
        self.busy_by_leaf_operand: Counter[str] = Counter()
        self.per_td: dict[str, dict[int, int]] = {}

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
        return self._next_seq + len(self._flat) // _WIDTH

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
            self.flush()

    def flush(self) -> None:
        """Turn the buffered rows into one record batch and hand it to the sink."""
        flat = self._flat
        if not flat:
            return
        self._flat = []
        n = len(flat) // _WIDTH
        arrays: dict[str, pa.Array] = {
            "seq": pa.array(range(self._next_seq, self._next_seq + n), pa.int64()),
        }
        for k, name in enumerate(_ROW_COLUMNS):
            arrays[name] = pa.array(flat[k::_WIDTH], _TYPES[name])
        arrays["truth"] = pc.greater_equal(arrays["kind"], pa.scalar(TRUTH_KIND_BASE, pa.uint8()))
        self._next_seq += n
        batch = pa.RecordBatch.from_arrays([arrays[f.name] for f in _SCHEMA], schema=_SCHEMA)
        self._sink(batch)

    def truth(self) -> dict[str, Any]:
        """The ground-truth counters, JSON-ready, keys sorted for a stable summary."""
        out: dict[str, Any] = {k: int(v) for k, v in sorted(self.counters.items())}
        out["busy_by_leaf_operand"] = dict(sorted(self.busy_by_leaf_operand.items()))
        for name, per_td in sorted(self.per_td.items()):
            out[name] = [per_td[td] for td in sorted(per_td)]
        return out
