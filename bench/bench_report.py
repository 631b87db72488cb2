"""Benchmark the report: rendering time from analyzer results, for traces of several sizes.

Rendering works on analyzer results (aggregates and downsampled series), never on raw events,
so its time and the page size should not grow with the trace. For each trace the analyzers run
once (not timed here: see bench_analyze.py), then the page is rendered ``--repeat`` times and
the fastest time is kept. The limit is the smallest trace's render time: the printed ratio
should stay close to 1; the page must stay under 2 MB.

    python bench/make_big_trace.py --events 1000000 -o /tmp/big1m.arrow
    python bench/make_big_trace.py --events 10000000 -o /tmp/big10m.arrow
    python bench/bench_report.py /tmp/big1m.arrow /tmp/big10m.arrow
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tdxtrace.analysis import run_analyzers
from tdxtrace.plugins import load_analyzers, make_plugin_manager
from tdxtrace.report import render_report
from tdxtrace.trace import open_trace

SIZE_LIMIT = 2 * 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    loaded = load_analyzers(make_plugin_manager())
    analyzers = {a.name: a for a in loaded.analyzers}
    baseline: float | None = None
    for path in args.traces:
        trace = open_trace(path)
        outcomes = run_analyzers(trace, loaded.analyzers)
        best = float("inf")
        html = ""
        for _ in range(args.repeat):
            start = time.perf_counter()
            html = render_report(trace, outcomes, analyzers=analyzers)
            best = min(best, time.perf_counter() - start)
        baseline = best if baseline is None else baseline
        size = len(html.encode())
        print(f"{path.name}: {trace.num_events()} events: render {best:.3f} s "
              f"(x{best / baseline:.2f} of the smallest trace), page {size / 1024:.0f} KiB "
              f"({size / SIZE_LIMIT:.2f} of the 2 MB limit)")


if __name__ == "__main__":
    main()
