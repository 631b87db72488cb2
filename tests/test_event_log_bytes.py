"""EventLog builds its columns through polars for speed; the bytes must be pa.array's.

A trace's bytes are part of the determinism contract (same scenario + seed + version =>
byte-identical file), and earlier versions built every column with ``pa.array``. polars may
leave the unused bits of a validity bitmap's last byte set where ``pa.array`` clears them, and
the IPC file stores that byte, so batches of any length, with nulls anywhere, are compared
serialized against the same rows built the old way.
"""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tdxtrace.events import TRUTH_KIND_BASE
from tdxtrace.schema import arrow_schema
from tdxtrace.sim.recorder import EventLog

_ROW = ("ts_ns", "dur_ns", "kind", "flow", "sub", "corr", "td", "vcpu", "lp", "leaf", "status",
        "exit_reason", "gpa", "level", "rip", "arg0", "arg1", "arg2")
_U64 = [0, 1, 4096, 0x80000000000005A0, 0xFFFFFFFFFFFFFFFF, 0x8000020000000000]


def _random_rows(rng: random.Random, count: int, p_null: float) -> list[dict[str, Any]]:
    def maybe(value: int) -> int | None:
        return None if rng.random() < p_null else value

    return [dict(kind=rng.choice([1, 2, 7, 100, 103]), flow=rng.randrange(8),
                 sub=rng.randrange(300), corr=maybe(rng.randrange(1 << 40)),
                 td=maybe(rng.randrange(3)), vcpu=maybe(rng.randrange(8)),
                 lp=maybe(rng.randrange(10)), leaf=maybe(rng.randrange(50)),
                 status=maybe(rng.choice(_U64)), exit_reason=maybe(rng.choice([48, 0xFFFFFFFF])),
                 gpa=maybe(rng.randrange(1 << 40) << 12), level=maybe(rng.randrange(4)),
                 rip=maybe(rng.choice(_U64)), arg0=maybe(rng.choice(_U64)),
                 arg1=maybe(rng.choice(_U64)), arg2=maybe(rng.randrange(1 << 20)),
                 dur=rng.randrange(1 << 20)) for _ in range(count)]


def _reference_batch(rows: list[dict[str, Any]], first_seq: int, times: list[int]) -> bytes:
    schema = arrow_schema()
    types = {f.name: f.type for f in schema}
    values = {"ts_ns": times, "dur_ns": [r["dur"] for r in rows]}
    for name in _ROW[2:]:
        values[name] = [r[name] for r in rows]
    arrays = {name: pa.array(values[name], types[name]) for name in _ROW}
    arrays["seq"] = pa.array(range(first_seq, first_seq + len(rows)), pa.int64())
    arrays["truth"] = pc.greater_equal(arrays["kind"], pa.scalar(TRUTH_KIND_BASE, pa.uint8()))
    batch = pa.RecordBatch.from_arrays([arrays[f.name] for f in schema], schema=schema)
    return bytes(batch.serialize().to_pybytes())


@pytest.mark.parametrize("seed", range(12))
def test_batches_are_byte_identical_to_pa_array_ones(seed: int) -> None:
    rng = random.Random(seed)
    batch_rows = rng.choice([1, 3, 7, 8, 9, 100, 8192, 8193, 20000])
    rows = _random_rows(rng, rng.randint(1, 20000 if batch_rows >= 100 else 200),
                        rng.choice([0.0, 0.01, 0.3, 1.0]))
    if seed % 3 == 0:  # nulls only in the last few rows: the bitmap's last byte matters
        for row in rows[:-rng.randint(1, 7)]:
            for name in ("td", "lp", "gpa", "status"):
                row[name] = 1 if row[name] is None else row[name]
    flushes = {i for i in range(len(rows)) if rng.random() < 0.001}  # replay --until flushes
    got: list[pa.RecordBatch] = []
    clock = SimpleNamespace(now=0)
    log = EventLog(got.append, clock, batch_rows=batch_rows)
    cuts = [0]
    for i, row in enumerate(rows):
        clock.now = i * 7
        log.emit(**row)
        if (i + 1 - cuts[-1]) == batch_rows:
            cuts.append(i + 1)
        if i in flushes:
            log.flush()
            if cuts[-1] != i + 1:
                cuts.append(i + 1)
    log.flush()
    if cuts[-1] != len(rows):
        cuts.append(len(rows))
    expected = [_reference_batch(rows[a:b], a, [i * 7 for i in range(a, b)])
                for a, b in itertools.pairwise(cuts)]
    assert [bytes(b.serialize().to_pybytes()) for b in got] == expected
