"""Benchmark `analyze`: all built-in analyzers together vs reading their columns (the limit).

    python bench/bench_analyze.py --trace FILE        # or --events N: build one in a temp dir
        [--repeat 3] [--breakdown] [--peak-rss]

(a) The analysis: every built-in analyzer (``load_analyzers(make_plugin_manager())``) run
    together by ``run_analyzers`` on the opened trace, as ``tdxtrace analyze`` does; events/s
    combined, against the target of 10 M events/s (issue 5), printed as a ratio. Opening the
    trace (which decodes and checks every batch and its digest) is timed on its own.
(b) The limit: ``pl.scan_ipc(FILE).select(<union of the analyzers' columns>).collect()``,
    i.e. decompressing every column some analyzer reads; analysis / limit, target <= 4.
(c) ``--peak-rss``: the analysis (open + analyzers) runs alone in a child process, and its
    peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) is printed next to the decompressed
    size of the columns read (rows x bytes per value, validity bitmaps included), as a ratio;
    then the limit's own peak RSS, for scale. Meant for a 100 M-event trace.

Timings are the fastest of ``--repeat`` runs, analysis and limit interleaved so that other work
on the machine slows both alike. Nothing is asserted: figures are printed beside their limits.
Traces from ``--events`` are built by make_big_trace.py (a mix of every built-in scenario,
repeated) and deleted afterwards.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pyarrow as pa

from tdxtrace.analysis import Analyzer, run_analyzers
from tdxtrace.errors import TdxtraceError
from tdxtrace.plugins import load_analyzers, make_plugin_manager
from tdxtrace.schema import FIELDS
from tdxtrace.trace import open_trace

TARGET_EVENTS_PER_S = 10e6
TARGET_RATIO = 4.0
MIB = 2**20


def builtin_analyzers() -> tuple[Analyzer, ...]:
    loaded = load_analyzers(make_plugin_manager())
    if loaded.failed:
        failed = "; ".join(f"{f.name}: {f.error}" for f in loaded.failed)
        raise TdxtraceError(f"plugins failed to load: {failed}")
    return loaded.analyzers


def columns_read(analyzers: Sequence[Analyzer]) -> list[str]:
    """The union of the analyzers' columns, plus ``truth`` (``observable()`` filters on it)."""
    wanted = {"truth"}.union(*(a.columns for a in analyzers))
    return [f.name for f in FIELDS if f.name in wanted]


def decompressed_bytes(rows: int, columns: Sequence[str]) -> int:
    """Bytes the columns take in memory once decoded: values plus validity bitmaps."""
    total_bits = 0
    for f in FIELDS:
        if f.name in columns:
            total_bits += f.type.bit_width + (1 if f.nullable else 0)
    return rows * total_bits // 8


def analyze_once(path: Path, analyzers: Sequence[Analyzer],
                 breakdown: bool) -> tuple[int, float, float, dict[str, float]]:
    """(events, open seconds, analysis seconds, per-analyzer seconds if ``breakdown``)."""
    start = time.perf_counter()
    trace = open_trace(path)
    opened = time.perf_counter()
    outcomes = run_analyzers(trace, analyzers)
    analyzed = time.perf_counter()
    failed = [f"{o.name}: {o.error}" for o in outcomes if not o.ok]
    if failed:
        raise TdxtraceError(f"analyzers failed: {'; '.join(failed)}")
    each: dict[str, float] = {}
    if breakdown:  # a second pass, one analyzer at a time (run_analyzers runs them in turn)
        for analyzer in analyzers:
            t0 = time.perf_counter()
            run_analyzers(trace, [analyzer])
            each[analyzer.name] = time.perf_counter() - t0
    return trace.num_events(), opened - start, analyzed - opened, each


def limit_once(path: Path, columns: Sequence[str]) -> tuple[int, float]:
    start = time.perf_counter()
    frame = pl.scan_ipc(path).select(columns).collect()
    return frame.height, time.perf_counter() - start


def rate(events: int, seconds: float) -> str:
    return f"{events / seconds / 1e6:.2f} M events/s"


def time_it(path: Path, repeat: int, breakdown: bool) -> None:
    analyzers = builtin_analyzers()
    columns = columns_read(analyzers)
    runs, limits = [], []
    for i in range(repeat):
        runs.append(analyze_once(path, analyzers, breakdown and i == 0))
        limits.append(limit_once(path, columns))
    events = runs[0][0]
    t_open = min(r[1] for r in runs)
    t_analyze = min(r[2] for r in runs)
    t_limit = min(t for _, t in limits)
    names = ", ".join(a.name for a in analyzers)
    print(f"trace: {path} ({events} events, {path.stat().st_size / MIB:.1f} MiB)")
    print(f"analyzers ({len(analyzers)}): {names}")
    print(f"columns read ({len(columns)}): {', '.join(columns)}")
    print(f"best of {repeat}:")
    print(f"  open_trace (check every batch + digest): {t_open:.2f} s = {rate(events, t_open)}")
    print(f"  all analyzers: {t_analyze:.2f} s = {rate(events, t_analyze)} "
          f"(target 10 M events/s: ratio {events / t_analyze / TARGET_EVENTS_PER_S:.2f})")
    print(f"  limit, scan_ipc(...).select(columns read).collect(): {t_limit:.2f} s = "
          f"{rate(events, t_limit)}")
    ratio = t_analyze / t_limit
    print(f"  analyzers / limit = {ratio:.2f} (target <= {TARGET_RATIO:g}: "
          f"{'ok' if ratio <= TARGET_RATIO else 'over'})")
    t_total = t_open + t_analyze
    print(f"  open + analyzers: {t_total:.2f} s = {rate(events, t_total)}; "
          f"/ limit = {t_total / t_limit:.2f}")
    for name, seconds in runs[0][3].items():
        print(f"    {name}: {seconds:.2f} s = {rate(events, seconds)}")


def child(path: Path, what: str) -> None:
    """Run in a child process: the analysis or the limit, then report timing and own RSS."""
    analyzers = builtin_analyzers()
    if what == "analyze":
        events, t_open, t_analyze, _ = analyze_once(path, analyzers, False)
        seconds = t_open + t_analyze
    else:
        events, seconds = limit_once(path, columns_read(analyzers))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{events} {seconds:.3f} {peak_kib}")


def run_child(path: Path, what: str) -> tuple[int, float, int]:
    done = subprocess.run([sys.executable, __file__, "--trace", str(path), "--child", what],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TdxtraceError(f"the {what} child failed: {done.stderr.strip().splitlines()[-1:]}")
    events, seconds, peak_kib = done.stdout.split()
    return int(events), float(seconds), int(peak_kib)


def peak_rss(path: Path) -> None:
    columns = columns_read(builtin_analyzers())
    # First child: RUSAGE_CHILDREN then holds exactly its peak.
    events, seconds, _ = run_child(path, "analyze")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    size = decompressed_bytes(events, columns)
    print(f"trace: {path} ({events} events, {path.stat().st_size / MIB:.1f} MiB)")
    print(f"decompressed size of the {len(columns)} columns read: {size / MIB:,.0f} MiB "
          f"({size / events:.1f} bytes/event incl. validity)")
    print(f"open + all analyzers in a child: {seconds:.1f} s = {rate(events, seconds)}, "
          f"peak RSS {peak / MIB:,.0f} MiB = {peak / size:.2f} x the decompressed columns")
    _, l_seconds, l_peak_kib = run_child(path, "limit")
    l_peak = l_peak_kib * 1024
    print(f"limit (scan_ipc ... collect) in a child: {l_seconds:.1f} s, peak RSS "
          f"{l_peak / MIB:,.0f} MiB = {l_peak / size:.2f} x the decompressed columns")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="an existing trace file")
    source.add_argument("--events", type=int, help="build a trace of N events in a temp dir")
    parser.add_argument("--repeat", type=int, default=3, help="timing runs (fastest kept)")
    parser.add_argument("--breakdown", action="store_true", help="also time each analyzer")
    parser.add_argument("--peak-rss", action="store_true",
                        help="measure peak RSS of the analysis in a child process")
    parser.add_argument("--child", choices=("analyze", "limit"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_analyze.") as tmp:
            path = args.trace
            if path is None:
                from make_big_trace import write_big_trace  # bench/ is on sys.path

                path = Path(tmp) / "big.arrow"
                write_big_trace(path, args.events)
            if args.child:
                child(path, args.child)
            elif args.peak_rss:
                peak_rss(path)
            else:
                time_it(path, max(args.repeat, 1), args.breakdown)
    except (TdxtraceError, pa.ArrowException, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
