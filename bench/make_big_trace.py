"""Build a big, realistic trace quickly: record a mix of built-in scenarios once, then repeat it.

    python bench/make_big_trace.py --events 10000000 -o /tmp/big.arrow [--seed 1]
        [--scenarios fault-storm,zap-under-load,...] [--compression zstd] [--force]

Recording 10 M events with the emulator takes minutes; the analyzer benchmark needs traces of
10 M and 100 M events. So each scenario of the mix is run once (its events kept in memory:
about half a million for the default mix), the runs are laid end to end into one *block*, and
the block is written again and again until the trace holds ``--events`` events. Each copy is
shifted so the trace stays well formed and every operation stays distinct:

* ``seq`` continues (0, 1, 2, ... without gaps) and ``ts_ns`` never decreases: each copy starts
  after the previous one's last event has ended;
* ``corr`` is shifted past the previous copy's ids, so no two operations share one;
* ``td`` is shifted past the previous copy's TDs, so each TD (and its vCPUs, faults and
  teardown) appears once: per-TD and per-vCPU analyses see as many TDs as there are copies.

The last copy is cut at exactly ``--events`` events (possibly in the middle of an operation,
as a run stopped by ``run.max_events`` is). The output is an ordinary finished trace written by
:class:`tdxtrace.trace.TraceWriter` (``NAME.partial`` renamed when done, summary with the
content digest), streamed one record batch at a time: memory stays at the block's size
whatever ``--events`` is. Its producer is ``make_big_trace`` (replay refuses it: there is no
one scenario to re-run) and its ground-truth counters are left empty, since copies cut short
would make them wrong.

Do not commit generated traces: write them under /tmp or a folder of your choice.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from tdxtrace.errors import TdxtraceError
from tdxtrace.sim.emulator import run_scenario
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.trace import RunMetadata, Summary, TraceWriter
from tdxtrace.trace.writer import DEFAULT_BATCH_ROWS

PRODUCER = "make_big_trace"
# Every built-in story, so that each built-in analyzer has work: faults and frozen-SPTE retries,
# zaps racing VP.ENTER, zero-step, MapGPA conversions, teardowns, memslot zaps, migrations.
DEFAULT_SCENARIOS = ("fault-storm", "zap-under-load", "zero-step", "mapgpa-convert", "teardown",
                     "memslot-churn", "migration")
GAP_NS = 1000  # between the end of one run and the start of the next
_SHIFTED = ("seq", "ts_ns", "corr", "td")


@dataclass(frozen=True)
class Block:
    """The recorded runs laid end to end, and how far one copy of them reaches."""

    batches: tuple[pa.RecordBatch, ...]  # v1 columns, seq 0..events-1
    events: int
    span_ns: int  # the next copy starts this much later
    corr_span: int  # ... with corr ids this much higher
    td_span: int  # ... and TD indices this much higher


def _max(column: pa.Array | pa.ChunkedArray, default: int) -> int:
    value = pc.max(column).as_py()
    return default if value is None else int(value)


def _shift(batch: pa.RecordBatch, offsets: dict[str, int]) -> pa.RecordBatch:
    """``batch`` with each column of ``offsets`` increased by its offset (nulls stay null)."""
    columns = [
        pc.add(batch.column(name), pa.scalar(offsets[name], field.type))
        if offsets.get(name) else batch.column(name)
        for name, field in zip(batch.schema.names, batch.schema, strict=True)
    ]
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def record_block(scenarios: Sequence[str], seed: int,
                 say: Callable[[str], None] = lambda _: None) -> Block:
    """Run each scenario once with ``seed`` and lay the runs end to end."""
    shifted: list[pa.RecordBatch] = []
    offsets = dict.fromkeys(_SHIFTED, 0)
    for name in scenarios:
        run: list[pa.RecordBatch] = []
        run_scenario(load_scenario(name), seed, run.append)
        table = pa.Table.from_batches(run)
        say(f"recorded {name}: {table.num_rows} events")
        if table.num_rows == 0:
            continue
        shifted += [_shift(b, offsets) for b in run if b.num_rows]
        end_ns = _max(pc.add(table.column("ts_ns"), table.column("dur_ns")), 0)
        offsets["seq"] += table.num_rows
        offsets["ts_ns"] += end_ns + GAP_NS
        offsets["corr"] += _max(table.column("corr"), 0) + 1
        offsets["td"] += _max(table.column("td"), -1) + 1
    if not shifted:
        raise TdxtraceError(f"scenarios {', '.join(scenarios)} recorded no events")
    # Re-cut into full-size batches: the runs' last batches are short.
    block = pa.Table.from_batches(shifted).combine_chunks()
    return Block(tuple(block.to_batches(max_chunksize=DEFAULT_BATCH_ROWS)), offsets["seq"],
                 offsets["ts_ns"], offsets["corr"], max(offsets["td"], 1))


def copies(block: Block, events: int) -> Iterator[pa.RecordBatch]:
    """Shifted copies of the block's batches, ``events`` rows in all."""
    left = events
    copy = 0
    while left > 0:
        offsets = {"seq": copy * block.events, "ts_ns": copy * block.span_ns,
                   "corr": copy * block.corr_span, "td": copy * block.td_span}
        for batch in block.batches:
            if left <= 0:
                return
            if batch.num_rows > left:
                batch = batch.slice(0, left)
            left -= batch.num_rows
            yield _shift(batch, offsets)
        copy += 1


def write_big_trace(path: str | Path, events: int, *, scenarios: Sequence[str] = DEFAULT_SCENARIOS,
                    seed: int = 1, compression: str = "zstd", force: bool = False,
                    say: Callable[[str], None] = lambda _: None) -> Summary:
    """Write a finished trace of exactly ``events`` events built from ``scenarios``."""
    if events < 1:
        raise TdxtraceError(f"--events must be at least 1, got {events}")
    block = record_block(scenarios, seed, say)
    metadata = RunMetadata(producer=PRODUCER, scenario_name="+".join(scenarios), seed=seed)
    with TraceWriter(path, metadata, compression=compression, force=force) as writer:
        step = max(events // 10, 1)
        for batch in copies(block, events):
            before = writer.events_written
            writer.write_batch(batch)
            if writer.events_written // step != before // step:
                say(f"written {writer.events_written} / {events} events")
        return writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, required=True, help="events in the trace")
    parser.add_argument("-o", "--output", type=Path, required=True, help="trace file to write")
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                        help="comma-separated built-in scenario names or TOML files")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--compression", default="zstd", choices=("zstd", "lz4", "none"))
    parser.add_argument("--force", action="store_true", help="overwrite the output")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    say = (lambda text: print(text, file=sys.stderr)) if sys.stderr.isatty() else (lambda _: None)
    try:
        summary = write_big_trace(args.output, args.events, scenarios=names, seed=args.seed,
                                  compression=args.compression, force=args.force, say=say)
    except TdxtraceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    size = args.output.stat().st_size
    print(f"{args.output}: {summary.events} events, {size / 2**20:.1f} MiB "
          f"({size / summary.events:.1f} bytes/event), {summary.digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
