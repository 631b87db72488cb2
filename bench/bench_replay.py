"""Benchmark `replay`: time to replay a trace relative to the time it took to record it.

Both sides run the same scenario and seed through the same emulator; recording writes the
Arrow file, replay opens it (which checks every batch and the digest), re-runs the emulator and
compares batch by batch. The limit is the record time: replay should cost about the same
(target ratio <= 1.2), since comparing Arrow batches is far cheaper than simulating them.
Each side is timed several times, interleaved, and the fastest run is kept.

    python bench/bench_replay.py [--scenario fault-storm] [--set run.duration_us=40000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tdxtrace.replay import plan_from_metadata, replay_trace
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.trace import open_trace

TARGET_RATIO = 1.2


def time_record(scenario_name: str, overrides: list[str], out: Path) -> tuple[int, float]:
    scenario = load_scenario(scenario_name, overrides)
    start = time.perf_counter()
    summary = record(scenario, 1, out, force=True)
    return summary.events, time.perf_counter() - start


def time_replay(path: Path) -> tuple[int, float]:
    start = time.perf_counter()
    trace = open_trace(path)
    plan = plan_from_metadata(trace.metadata, str(path), force=False)
    result, _ = replay_trace(trace, plan)
    elapsed = time.perf_counter() - start
    if not result.identical:
        raise SystemExit(f"replay diverged: {result.divergence}")
    return result.events, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="fault-storm")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.arrow"
        records, replays = [], []
        for _ in range(args.repeat):  # interleaved, so a busy machine slows both alike
            records.append(time_record(args.scenario, args.overrides, path))
            replays.append(time_replay(path))
    events = records[0][0]
    t_record = min(t for _, t in records)
    t_replay = min(t for _, t in replays)
    print(f"record {args.scenario}: {events} events in {t_record:.2f} s "
          f"({events / t_record / 1e3:.0f} k events/s)")
    print(f"replay (open + re-run + compare): {t_replay:.2f} s "
          f"({events / t_replay / 1e3:.0f} k events/s)")
    ratio = t_replay / t_record
    print(f"replay / record = {ratio:.2f} (target <= {TARGET_RATIO}: "
          f"{'ok' if ratio <= TARGET_RATIO else 'over'})")


if __name__ == "__main__":
    main()
