"""Run a scenario: the emulator's entry points for ``record``, ``replay`` and the benchmarks."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from tdxtrace.signals import signals_held
from tdxtrace.sim.recorder import BatchSink
from tdxtrace.sim.scenario import Scenario
from tdxtrace.sim.world import World
from tdxtrace.trace import RunMetadata, Summary, TraceWriter

Progress = Callable[[int, int], None]  # (simulated ns so far, simulated ns in all)


def run_scenario(scenario: Scenario, seed: int, sink: BatchSink,
                 progress: Progress | None = None, *,
                 keep_on_interrupt: bool = False) -> dict[str, Any]:
    """Run ``scenario`` with ``seed``, handing every record batch to ``sink``; returns truth.

    ``keep_on_interrupt``: on Ctrl-C or SIGTERM, hand the rows emitted since the last full
    batch to ``sink`` too (up to a batch of events), then re-raise; a second signal waits.
    """
    world = World(scenario, seed, _with_progress(sink, progress, scenario))
    try:
        with no_cyclic_gc():
            world.run()
    except KeyboardInterrupt:
        if keep_on_interrupt:
            with signals_held():
                world.log.salvage()
        raise
    return world.log.truth()


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while the simulation runs.

    The run allocates millions of short-lived tuples (heap entries, event rows); with the
    collector on, its generation-0 passes keep walking the growing row buffer and cost ~40% of
    the run (bench/bench_record.py). The model's objects form few cycles, and those are
    collected once the run ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _with_progress(sink: BatchSink, progress: Progress | None, scenario: Scenario) -> BatchSink:
    if progress is None:
        return sink
    total = int(scenario.run.duration_us) * 1000

    def forward(batch: pa.RecordBatch) -> None:
        sink(batch)
        progress(int(batch.column("ts_ns")[-1].as_py()), total)

    return forward


def metadata_for(scenario: Scenario, seed: int) -> RunMetadata:
    return RunMetadata(producer="emulator", scenario_name=scenario.name,
                       scenario_text=scenario.canonical(), seed=seed,
                       policies=scenario.policies())


class RecordInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped :func:`record`; ``kept`` says whether the path now holds the
    unfinished trace (not when no batch was written yet, or another file took the name)."""

    def __init__(self, kept: bool) -> None:
        super().__init__()
        self.kept = kept


def record(scenario: Scenario, seed: int, path: str | Path, *, force: bool = False,
           compression: str = "zstd", progress: Progress | None = None) -> Summary:
    """Record ``scenario`` to ``path`` (through a temporary file, published when finished)."""
    writer = TraceWriter(path, metadata_for(scenario, seed), compression=compression,
                         force=force)
    try:
        with writer:
            truth = run_scenario(scenario, seed, writer.write_batch, progress,
                                 keep_on_interrupt=True)
            return writer.close(truth)
    except KeyboardInterrupt as interrupt:
        raise RecordInterrupted(writer.published) from interrupt
