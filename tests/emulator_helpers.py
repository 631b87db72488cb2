"""Run the emulator in memory for behaviour tests (no files involved)."""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa

from tdxtrace.sim.emulator import run_scenario
from tdxtrace.sim.scenario import load_scenario


def run(name: str, *overrides: str, seed: int = 1) -> tuple[pl.DataFrame, dict[str, Any]]:
    """All events of ``name`` with ``overrides`` as one frame, plus the truth counters."""
    batches: list[pa.RecordBatch] = []
    truth = run_scenario(load_scenario(name, list(overrides)), seed, batches.append)
    if not batches:
        return pl.DataFrame(), truth
    return pl.from_arrow(pa.Table.from_batches(batches)), truth  # type: ignore[return-value]
