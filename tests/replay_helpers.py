"""Shared helpers for the replay and capsule tests: record and replay short runs, alter traces."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
from click.testing import CliRunner, Result

from tdxtrace.cli import main
from tdxtrace.codes import Leaf
from tdxtrace.commands.replay_cmd import capsule_command, replay_command
from tdxtrace.events import Kind
from tdxtrace.schema import SUMMARY_DIGEST, SUMMARY_EVENTS
from tdxtrace.sim.emulator import record
from tdxtrace.sim.scenario import load_scenario
from tdxtrace.trace import open_trace
from tdxtrace.trace.digest import digest_batches

SHORT = "run.duration_us=1500"


def cli() -> click.Group:
    """The ``tdxtrace`` group with the replay commands (a no-op once they are registered)."""
    for command in (replay_command, capsule_command):
        if command.name not in main.commands:
            main.add_command(command)
    return main


def record_short(folder: Path, name: str, seed: int = 1, *overrides: str) -> Path:
    path = folder / f"{name}-{seed}.arrow"
    record(load_scenario(name, [SHORT, *overrides]), seed, path)
    return path


def record_storm(folder: Path) -> Path:
    """The fault-storm run the replay tests tamper with (seed 3, 1.5 ms, 8 vCPUs)."""
    return record_short(folder, "fault-storm", 3)


def invoke_replay(path: Path, *args: str) -> Result:
    """``tdxtrace replay PATH ARGS`` in-process."""
    return CliRunner().invoke(cli(), ["replay", str(path), *args])


def trace_rows(path: Path) -> pl.DataFrame:
    """Every event row of the trace at ``path``."""
    return open_trace(path).events().collect()


def page_aug_seq(rows: pl.DataFrame, nth: int = 40) -> int:
    """The seq of the ``nth`` TDH.MEM.PAGE.AUG SEAMCALL in ``rows``."""
    augs = rows.filter((pl.col("kind") == int(Kind.SEAMCALL))
                       & (pl.col("leaf") == int(Leaf.TDH_MEM_PAGE_AUG)))
    return int(augs["seq"][nth])


def rewrite(src: Path, dst: Path, *,
            table: Callable[[pa.Table], pa.Table] | None = None,
            metadata: Callable[[dict[str, str]], dict[str, str]] | None = None,
            summary: Callable[[dict[str, str]], dict[str, str]] | None = None,
            keep_summary: bool = True, batch_rows: int = 1000) -> Path:
    """Copy a trace file, changing its rows, run metadata or summary on the way.

    The summary's event count and digest are recomputed for the new rows (the reader refuses a
    trace whose events do not match its digest), so an altered trace looks exactly like one a
    different emulator recorded; ``summary`` then changes the summary itself.
    """
    reader = ipc.open_file(str(src))
    last = reader.num_record_batches - 1
    rows = pa.Table.from_batches([reader.get_batch(i) for i in range(last)],
                                 schema=reader.schema)
    summary_meta = {k.decode(): v.decode()
                    for k, v in reader.get_batch_with_custom_metadata(last).custom_metadata.items()}
    run_meta = {k.decode(): v.decode() for k, v in reader.schema.metadata.items()}
    if table is not None:
        rows = table(rows)
        summary_meta = {**summary_meta, SUMMARY_EVENTS: str(rows.num_rows),
                        SUMMARY_DIGEST: digest_batches(rows.to_batches())}
    if metadata is not None:
        run_meta = metadata(run_meta)
    if summary is not None:
        summary_meta = summary(summary_meta)
    schema = reader.schema.with_metadata(run_meta)
    with ipc.new_file(str(dst), schema) as writer:
        for batch in rows.cast(schema).to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
        if keep_summary:
            empty = pa.RecordBatch.from_arrays([pa.array([], f.type) for f in schema],
                                               schema=schema)
            writer.write_batch(empty, custom_metadata=summary_meta)
    return dst


def set_value(rows: pa.Table, column: str, index: int, value: object) -> pa.Table:
    values = rows.column(column).to_pylist()
    values[index] = value
    return set_column(rows, column, values)


def renumber(rows: pa.Table) -> pa.Table:
    return set_column(rows, "seq", list(range(rows.num_rows)))


def set_column(rows: pa.Table, column: str, values: list[object]) -> pa.Table:
    field = rows.schema.field(column)
    return rows.set_column(rows.schema.get_field_index(column), field,
                           pa.array(values, field.type))
