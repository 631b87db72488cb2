"""Benchmark `analyze`: all built-in analyzers together vs reading their columns (the limit).

    python bench/bench_analyze.py --trace FILE        # or --events N: build one in a temp dir
        [--repeat 3] [--breakdown] [--peak-rss]

(a) The analysis: every built-in analyzer (``load_analyzers(make_plugin_manager())``) run
    together by ``run_analyzers`` on a trace opened with ``open_trace(FILE)``: they decode the
    columns they read once and query that copy, two analyzers at a time (the default
    ``jobs``); events/s combined, against the target of 10 M events/s (issue 5), printed as
    a ratio; and the same one analyzer after the other (``jobs=1``, ``--jobs 1``), in
    alternating order. Opening the trace (which decodes and checks every batch and its
    digest) is timed on its own.
(a') What ``tdxtrace analyze`` does end to end: ``open_trace(FILE, keep_decoded=True)``
    (the batches decoded for the checks are kept, so the analyzers decode nothing again)
    then ``run_analyzers``.
(a'') The command itself, ``tdxtrace analyze FILE --format json``, in a fresh process: what
    a user waits for (Python start, imports, open, analyzers, JSON out, all on new memory).
(b) The limit: ``pl.scan_ipc(FILE).select(<union of the analyzers' columns>).collect()``,
    i.e. decompressing every column some analyzer reads; analysis / limit, target <= 4.
(c) ``--peak-rss``: the analysis (open + analyzers) runs alone in a child process, and its
    peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) is printed next to the decompressed
    size of the columns read (rows x bytes per value, validity bitmaps included), as a ratio;
    then the limit's own peak RSS, for scale. Meant for a 100 M-event trace. RSS counts the
    pages of the memory-mapped trace file that were touched (open_trace reads them all), so
    the file's size is a floor.

``--breakdown`` adds each analyzer alone: its time and the time to just decode its columns
(the sum of those reads, against the limit, is how close the analyzers can get to it while
each decodes the file on its own), or with ``--peak-rss`` its peak RSS in its own child.

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
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pyarrow as pa

from tdxtrace.analysis import Analyzer, AnalyzerOutcome, run_analyzers
from tdxtrace.analysis_threads import DEFAULT_JOBS
from tdxtrace.errors import TdxtraceError
from tdxtrace.plugins import load_analyzers, make_plugin_manager
from tdxtrace.schema import FIELDS
from tdxtrace.trace import Trace, open_trace

TARGET_EVENTS_PER_S = 10e6
TARGET_RATIO = 4.0
MIB = 2**20


def builtin_analyzers() -> tuple[Analyzer, ...]:
    """The analyzers of the built-in plugins (package tdxtrace_plugins), sorted by name;
    third-party plugins that happen to be installed are left out."""
    loaded = load_analyzers(make_plugin_manager())
    builtin = tuple(a for a in loaded.analyzers
                    if type(a).__module__.startswith("tdxtrace_plugins."))
    failed = [f"{f.name}: {f.error}" for f in loaded.failed
              if f.where.startswith("tdxtrace_plugins.")]
    if failed:
        raise TdxtraceError(f"built-in plugins failed to load: {'; '.join(failed)}")
    if not builtin:
        raise TdxtraceError("no built-in analyzers found (is tdxtrace installed?)")
    return builtin


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


def analyze_once(path: Path, analyzers: Sequence[Analyzer], breakdown: bool, serial_first: bool,
                 ) -> tuple[int, float, float, float, dict[str, tuple[float, float]], float]:
    """(events, open s, analysis s, ``tdxtrace analyze`` pipeline s, if ``breakdown``:
    name -> (analysis s, read-only s), analysis s with ``jobs=1``).

    The read-only time is ``trace.observable().select(columns).collect()`` with the
    analyzer's columns: what decoding them once costs, before any analysis. The analysis runs
    twice, as ``tdxtrace analyze`` does (two analyzers at a time, the default) and one
    analyzer after the other (``--jobs 1``), in the order ``serial_first`` says.
    """
    start = time.perf_counter()
    trace = open_trace(path)
    opened = time.perf_counter()
    serial = 0.0
    if serial_first:
        serial = _timed_analysis(trace, analyzers, jobs=1)
    analysis = _timed_analysis(trace, analyzers, jobs=DEFAULT_JOBS)
    if not serial_first:
        serial = _timed_analysis(trace, analyzers, jobs=1)
    each: dict[str, tuple[float, float]] = {}
    if breakdown:  # one analyzer at a time
        for analyzer in analyzers:
            t0 = time.perf_counter()
            run_analyzers(trace, [analyzer])
            t1 = time.perf_counter()
            trace.observable().select(analyzer.columns).collect()
            each[analyzer.name] = (t1 - t0, time.perf_counter() - t1)
    events = trace.num_events()
    del trace
    t0 = time.perf_counter()
    _check(run_analyzers(open_trace(path, keep_decoded=True), analyzers))
    piped = time.perf_counter() - t0
    return events, opened - start, analysis, piped, each, serial


def _timed_analysis(trace: Trace, analyzers: Sequence[Analyzer], jobs: int) -> float:
    start = time.perf_counter()
    _check(run_analyzers(trace, analyzers, jobs=jobs))
    return time.perf_counter() - start


def _check(outcomes: Sequence[AnalyzerOutcome]) -> None:
    failed = [f"{o.name}: {o.error}" for o in outcomes if not o.ok]
    if failed:
        raise TdxtraceError(f"analyzers failed: {'; '.join(failed)}")


def limit_once(path: Path, columns: Sequence[str]) -> tuple[int, float]:
    start = time.perf_counter()
    frame = pl.scan_ipc(path).select(columns).collect()
    return frame.height, time.perf_counter() - start


def command_once(path: Path) -> float:
    """``tdxtrace analyze FILE --format json`` in a fresh process, as a user runs it: wall s.

    Includes starting Python, the imports, open_trace and writing the JSON, and every page
    of memory is new to the process (the in-process runs above reuse pages freed by the run
    before, which makes them faster than any single command)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tdxtrace", "analyze", str(path),
                           "--format", "json"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise TdxtraceError(f"tdxtrace analyze failed: {done.stderr.strip()}")
    return time.perf_counter() - start


def rate(events: int, seconds: float) -> str:
    return f"{events / seconds / 1e6:.2f} M events/s"


def time_it(path: Path, repeat: int, breakdown: bool) -> None:
    analyzers = builtin_analyzers()
    columns = columns_read(analyzers)
    runs, limits, commands = [], [], []
    for i in range(repeat):
        runs.append(analyze_once(path, analyzers, breakdown and i == 0, i % 2 == 1))
        limits.append(limit_once(path, columns))
        commands.append(command_once(path))
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
    # The analyzers must decode at least these columns: the events/s target leaves only
    # what remains of its time after the limit for all the analyses' own work.
    allowed = events / TARGET_EVENTS_PER_S - t_limit
    left = (f"{allowed:.2f} s" if allowed > 0 else
            f"nothing (the limit alone is over it by {-allowed:.2f} s)")
    print(f"  the target leaves {left} beyond reading the columns; the analyses take "
          f"{t_analyze - t_limit:.2f} s beyond it")
    t_serial = min(r[5] for r in runs)
    print(f"  all analyzers one after the other (--jobs 1): {t_serial:.2f} s = "
          f"{rate(events, t_serial)}; / limit = {t_serial / t_limit:.2f}")
    t_total = t_open + t_analyze
    print(f"  open + analyzers: {t_total:.2f} s = {rate(events, t_total)}; "
          f"/ limit = {t_total / t_limit:.2f}")
    t_piped = min(r[3] for r in runs)
    print(f"  tdxtrace analyze (open keeping the decoded batches + analyzers): {t_piped:.2f} s"
          f" = {rate(events, t_piped)}; / limit = {t_piped / t_limit:.2f}")
    t_command = min(commands)
    print(f"  the command, `tdxtrace analyze FILE --format json` in a fresh process: "
          f"{t_command:.2f} s = {rate(events, t_command)}; / limit = {t_command / t_limit:.2f}")
    each = runs[0][4]
    if each:
        print("  one at a time (first run): analysis, and reading its columns alone")
        for name, (seconds, read) in each.items():
            print(f"    {name}: {seconds:.2f} s = {rate(events, seconds)}; read {read:.2f} s")
        floor = sum(read for _, read in each.values())
        print(f"    sum of the reads: {floor:.2f} s = {floor / t_limit:.2f} x the limit (each "
              "analyzer decodes its own columns)")


def child(path: Path, what: str) -> None:
    """Run in a child process: the analysis (``analyze`` or ``analyze:NAME`` for one
    analyzer) or the limit, then print events, seconds and its own peak RSS in KiB."""
    sampler = AnonSampler()
    analyzers = builtin_analyzers()
    if what.startswith("analyze"):
        only = what.partition(":")[2]
        chosen = [a for a in analyzers if a.name == only] if only else list(analyzers)
        # As tdxtrace analyze runs it (over the decode budget, nothing is kept).
        start = time.perf_counter()
        trace = open_trace(path, keep_decoded=True)
        _check(run_analyzers(trace, chosen))
        events, seconds = trace.num_events(), time.perf_counter() - start
    else:
        events, seconds = limit_once(path, columns_read(analyzers))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{events} {seconds:.3f} {peak_kib} {sampler.stop()}")


class AnonSampler:
    """Samples RssAnon (/proc/self/status, Linux) in a thread: the peak without the pages of
    memory-mapped files, which ru_maxrss counts too. 0 where /proc is not available."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.peak_kib = 0
        self._done = threading.Event()
        self._every_s = every_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                status = Path("/proc/self/status").read_text()
            except OSError:
                return
            for line in status.splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            self._done.wait(self._every_s)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak_kib


def run_child(path: Path, what: str) -> tuple[int, float, int, int]:
    """(events, seconds, peak RSS KiB, peak anonymous RSS KiB) of a child run."""
    done = subprocess.run([sys.executable, __file__, "--trace", str(path), "--child", what],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TdxtraceError(f"the {what} child failed: {done.stderr.strip().splitlines()[-1:]}")
    events, seconds, peak_kib, anon_kib = done.stdout.split()
    return int(events), float(seconds), int(peak_kib), int(anon_kib)


def peak_rss(path: Path, breakdown: bool) -> None:
    analyzers = builtin_analyzers()
    columns = columns_read(analyzers)
    # First child: RUSAGE_CHILDREN then holds exactly its peak.
    events, seconds, _, anon_kib = run_child(path, "analyze")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    size = decompressed_bytes(events, columns)
    print(f"trace: {path} ({events} events, {path.stat().st_size / MIB:.1f} MiB)")
    print(f"decompressed size of the {len(columns)} columns read: {size / MIB:,.0f} MiB "
          f"({size / events:.1f} bytes/event incl. validity)")
    print(f"open + all analyzers in a child: {seconds:.1f} s = {rate(events, seconds)}, "
          f"peak RSS {peak / MIB:,.0f} MiB = {peak / size:.2f} x the decompressed columns "
          f"(anonymous memory alone: {_mib(anon_kib)} = {anon_kib * 1024 / size:.2f} x)")
    _, l_seconds, l_peak_kib, l_anon_kib = run_child(path, "limit")
    print(f"limit (scan_ipc ... collect) in a child: {l_seconds:.1f} s, peak RSS "
          f"{_mib(l_peak_kib)} = {l_peak_kib * 1024 / size:.2f} x the decompressed columns "
          f"(anonymous: {_mib(l_anon_kib)})")
    if breakdown:
        print("one analyzer per child (open_trace included):")
        for analyzer in analyzers:
            _, a_seconds, a_peak_kib, a_anon_kib = run_child(path, f"analyze:{analyzer.name}")
            print(f"  {analyzer.name}: {a_seconds:.1f} s, peak RSS {_mib(a_peak_kib)} = "
                  f"{a_peak_kib * 1024 / size:.2f} x (anonymous: {_mib(a_anon_kib)})")


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="an existing trace file")
    source.add_argument("--events", type=int, help="build a trace of N events in a temp dir")
    parser.add_argument("--repeat", type=int, default=3, help="timing runs (fastest kept)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also each analyzer alone (with --peak-rss: each in a child)")
    parser.add_argument("--peak-rss", action="store_true",
                        help="measure peak RSS of the analysis in a child process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
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
                peak_rss(path, args.breakdown)
            else:
                time_it(path, max(args.repeat, 1), args.breakdown)
    except (TdxtraceError, pa.ArrowException, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
