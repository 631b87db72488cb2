"""Reproduce the teardown calibration of docs/calibration.md.

    python bench/calibrate_teardown.py [--memory-mb 64] [--seed 1]

For each published point of tdx-reference.md §8 ([TERM-v5]: 4 vCPU / 18 GB and 64 vCPU /
400 GB, late and early HKID release) it runs the built-in ``teardown`` scenario with one
prepopulated TD of ``--memory-mb`` and that many vCPUs, reads from the trace how long the
PRIVATE_PAGES phase took per page and how long the rest of the teardown took, extrapolates to
the published size (GB read as GiB, 4 KiB pages) and prints model vs published. Exit status 1
when a point is off by more than 25%.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdxtrace.events import Kind, Phase
from tdxtrace.sim.emulator import run_scenario
from tdxtrace.sim.scenario import load_scenario

GIB = 1 << 30
PAGE = 4096
TOLERANCE = 0.25
# (vCPUs, GB, policy, published seconds) from [TERM-v5] via tdx-reference.md §8.
PUBLISHED: tuple[tuple[int, int, str, float], ...] = (
    (4, 18, "late", 72.0), (4, 18, "early", 24.0),
    (64, 400, "late", 5539.0), (64, 400, "early", 467.0),
)


@dataclass(frozen=True)
class Point:
    vcpus: int
    gb: int
    policy: str
    published_s: float
    per_page_ns: float  # PRIVATE_PAGES phase length / pages, measured
    fixed_ns: int  # the rest of the teardown (release HKID, control pages), measured

    @property
    def model_s(self) -> float:
        return (self.fixed_ns + self.per_page_ns * self.gb * GIB / PAGE) / 1e9

    @property
    def residual(self) -> float:
        """(model - published) / published."""
        return self.model_s / self.published_s - 1.0


def measure(vcpus: int, policy: str, memory_mb: int, seed: int) -> tuple[float, int]:
    """(ns per private page, ns of everything else) of one teardown of a small TD."""
    scenario = load_scenario("teardown", [
        "td.count=1", f"td.vcpus={vcpus}", f"td.memory_mb={memory_mb}",
        f"policy.hkid_release='{policy}'", "run.duration_us=200"])
    batches: list[pa.RecordBatch] = []
    truth = run_scenario(scenario, seed, batches.append)
    frame = pl.from_arrow(pa.Table.from_batches(batches))
    assert isinstance(frame, pl.DataFrame)
    private = frame.filter(pl.col("sub") == int(Phase.PRIVATE_PAGES))
    pages = int(private.filter(pl.col("kind") == int(Kind.PHASE))["arg0"].sum())
    private_ns = int(private.filter(pl.col("kind") == int(Kind.PHASE_DONE))["dur_ns"].sum())
    total_ns = int(truth["teardown_ns"][0])
    return private_ns / pages, total_ns - private_ns


def calibrate(memory_mb: int = 64, seed: int = 1) -> list[Point]:
    points = []
    for vcpus, gb, policy, published in PUBLISHED:
        per_page, fixed = measure(vcpus, policy, memory_mb, seed)
        points.append(Point(vcpus, gb, policy, published, per_page, fixed))
    return points


def table(points: list[Point]) -> str:
    lines = [f"{'vCPUs':>5} {'GB':>4} {'policy':<6} {'ns/page':>8} {'fixed ms':>8} "
             f"{'model s':>8} {'published s':>11} {'residual':>8}"]
    for p in points:
        lines.append(f"{p.vcpus:>5} {p.gb:>4} {p.policy:<6} {p.per_page_ns:>8.0f} "
                     f"{p.fixed_ns / 1e6:>8.2f} {p.model_s:>8.1f} {p.published_s:>11.1f} "
                     f"{p.residual:>+8.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-mb", type=int, default=64,
                        help="private memory of the measured TD (default 64)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    points = calibrate(args.memory_mb, args.seed)
    print(f"teardown calibration: one TD of {args.memory_mb} MB, seed {args.seed}, "
          f"extrapolated by the measured per-page cost")
    print(table(points))
    worst = max(abs(p.residual) for p in points)
    print(f"worst residual {worst:.1%} (limit {TOLERANCE:.0%}; ratio {worst / TOLERANCE:.2f})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
