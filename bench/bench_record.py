"""Benchmark `record`: emulator events/s end to end vs a bare event loop (the limit).

The limit is a bare discrete-event loop (a heap of timed callbacks, like the emulator's kernel)
that emits the same number of events of the same shape through the same EventLog and the same
TraceWriter, with no model behind them. Printed as a ratio; targets (issue 3): >= 300k events/s
and >= 0.35 of the bare loop.

    python bench/bench_record.py [--events 1000000]
"""

from __future__ import annotations

import argparse
import heapq
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from tdxtrace.events import Kind
from tdxtrace.sim.emulator import metadata_for, no_cyclic_gc, record
from tdxtrace.sim.recorder import EventLog
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.trace import TraceWriter

SCENARIO = "fault-storm"


def emulator_run(events: int, out: Path) -> tuple[int, float]:
    scenario = load_scenario(SCENARIO, [f"run.max_events={events}",
                                        "run.duration_us=3600000000"])
    start = time.perf_counter()
    summary = record(scenario, 1, out, force=True)
    return summary.events, time.perf_counter() - start


def bare_loop(events: int, out: Path) -> tuple[int, float]:
    scenario = load_scenario(SCENARIO)
    start = time.perf_counter()
    # Same conditions as the emulator's run: cyclic GC paused.
    with TraceWriter(out, metadata_for(scenario, 1), force=True) as writer, no_cyclic_gc():
        clock = SimpleNamespace(now=0)
        log = EventLog(writer.write_batch, clock)
        heap: list[tuple[int, int, int]] = [(i * 10, i, i % 8) for i in range(8)]
        heapq.heapify(heap)
        seq = 8
        while log.events < events:
            when, _, vcpu = heapq.heappop(heap)
            clock.now = when
            log.emit(Kind.SEAMCALL, flow=2, corr=seq, td=0, vcpu=vcpu, lp=vcpu, leaf=6,
                     status=0, gpa=seq << 12, level=0, dur=3000)
            seq += 1
            heapq.heappush(heap, (when + 1000 + seq % 7, seq, vcpu))
        log.flush()
        summary = writer.close(log.truth())
    return summary.events, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n_emu, t_emu = emulator_run(args.events, Path(tmp) / "emu.arrow")
        n_bare, t_bare = bare_loop(n_emu, Path(tmp) / "bare.arrow")
    emu_rate, bare_rate = n_emu / t_emu, n_bare / t_bare
    print(f"record {SCENARIO}: {n_emu} events in {t_emu:.2f} s = {emu_rate / 1e3:.0f} k events/s"
          f" (target 300 k: ratio {emu_rate / 300e3:.2f})")
    print(f"bare event loop, same writer: {n_bare} events in {t_bare:.2f} s = "
          f"{bare_rate / 1e3:.0f} k events/s")
    print(f"emulator / bare loop = {emu_rate / bare_rate:.2f} (target >= 0.35)")


if __name__ == "__main__":
    main()
