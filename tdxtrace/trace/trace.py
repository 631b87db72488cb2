"""The :class:`Trace` object: a checked trace's metadata and events, wherever they are.

Events may be in a trace file (read through :mod:`.scan`, never parsed by polars), in memory
as an Arrow table (``Trace.from_frame``), or decoded once into a polars frame that several
queries share (``Trace.decoded``, or ``open_trace(..., keep_decoded=True)``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
import pyarrow as pa

from tdxtrace.schema import COLUMN_NAMES, arrow_schema
from tdxtrace.trace.digest import digest_batches
from tdxtrace.trace.metadata import RunMetadata, Summary
from tdxtrace.trace.scan import read_batches, scan_batches
from tdxtrace.trace.writer import DEFAULT_BATCH_ROWS, conform_events

T = TypeVar("T")


@dataclass(frozen=True)
class Layout:
    """Where a trace's batches are: an intact Arrow file, a footer-less file, or memory."""

    # "file": an intact file; "stream": a footer-less file; "memory": a table;
    # "decoded": some columns of another trace, decoded once (Trace.decoded).
    kind: str
    data_batches: int  # batches to read, counted from the start (stream: non-empty ones)
    table: pa.Table | None = None  # kind == "memory"
    frame: pl.DataFrame | None = None  # kind == "decoded"
    source: Trace | None = None  # kind == "decoded": where iter_batches reads


class Trace:
    """A validated trace: run metadata, the summary if finished, and the events."""

    def __init__(self, *, path: Path | None, metadata: RunMetadata, summary: Summary | None,
                 num_events: int, warnings: tuple[str, ...], layout: Layout) -> None:
        self.path = path
        self.metadata = metadata
        self.summary = summary
        self.finished = summary is not None
        self.warnings = warnings
        self._num_events = num_events
        self._layout = layout
        self._shared: dict[str, Any] = {}
        self._shared_lock = threading.RLock()  # a build may ask for another shared value

    def __repr__(self) -> str:
        where = str(self.path) if self.path else "in memory"
        state = "finished" if self.finished else "unfinished"
        return f"<Trace {where}: {self._num_events} events, {state}>"

    @property
    def in_memory(self) -> bool:
        """Whether the events are held in memory (decoded, or built from a frame), not read
        from the file on every query."""
        return self._layout.kind in ("decoded", "memory")

    def num_events(self) -> int:
        """Events in the trace (for an unfinished trace: the events that could be read)."""
        return self._num_events

    def events(self) -> pl.LazyFrame:
        """Every row (observable and truth), the v1 columns, in ``seq`` order."""
        layout = self._layout
        if layout.kind == "memory":
            assert layout.table is not None
            return frame_of(layout.table).lazy()
        if layout.kind == "decoded":
            assert layout.frame is not None
            return layout.frame.lazy()
        assert self.path is not None
        return scan_batches(self.path, layout.kind == "stream", layout.data_batches)

    def observable(self) -> pl.LazyFrame:
        """The rows a real host could have recorded (``truth`` is false)."""
        return self.events().filter(~pl.col("truth"))

    def shared(self, key: str, build: Callable[[Trace], T]) -> T:
        """``build(self)``, computed once and then shared by every caller that asks for ``key``.

        For what several analyzers derive alike (the built-in ones pair each TD_EXIT with its
        TD_ENTRY this way). Only a trace held in memory (``decoded``, ``from_frame``) keeps the
        value; a trace read from its file builds it on every call, since keeping it could hold
        gigabytes across analyzers that stream the file to save memory. ``key`` names the
        value and how it was built (say ``"my_plugin.thing"``): one key, one ``build``.
        A ``build`` may itself ask for other shared values (not for its own key).
        """
        if not self.in_memory:
            return build(self)
        with self._shared_lock:  # analyzers under --timeout run in threads
            if key not in self._shared:
                self._shared[key] = build(self)
            value: T = self._shared[key]
            return value

    def iter_batches(self) -> Iterator[pa.RecordBatch]:
        """The non-empty record batches in order, v1 columns (the summary batch is skipped)."""
        layout = self._layout
        if layout.kind == "decoded":
            assert layout.source is not None
            yield from layout.source.iter_batches()
            return
        if layout.kind == "memory":
            assert layout.table is not None
            yield from layout.table.to_batches(max_chunksize=DEFAULT_BATCH_ROWS)
            return
        assert self.path is not None
        yield from read_batches(self.path, layout.kind == "stream", layout.data_batches)

    def decoded(self, columns: Sequence[str]) -> Trace:
        """This trace with ``columns`` decoded once into memory, for several queries to share.

        ``events()`` of the result has only ``columns`` (in schema order): a query for any
        other column fails. Everything else (metadata, summary, warnings, ``iter_batches``)
        is this trace's.
        """
        wanted = [name for name in COLUMN_NAMES if name in set(columns)]
        layout = self._layout
        if layout.kind == "decoded" and layout.frame is not None and set(wanted) <= set(
                layout.frame.columns):
            return self._with_frame(layout.frame.select(wanted))  # already in memory
        if layout.kind in ("file", "stream"):
            # Straight from pyarrow (multi-threaded decompression), not through the polars
            # IO source: one full read, so no pushdown to gain and ~2x faster.
            assert self.path is not None
            batches = list(read_batches(self.path, layout.kind == "stream",
                                        layout.data_batches, wanted))
            frame = frame_of(pa.Table.from_batches(batches) if batches else
                           arrow_schema().empty_table().select(wanted))
        else:
            frame = self.events().select(wanted).collect()
        return self._with_frame(frame)

    def _with_frame(self, frame: pl.DataFrame) -> Trace:
        """This trace answering queries from ``frame``: its events, already decoded."""
        return Trace(path=self.path, metadata=self.metadata, summary=self.summary,
                     num_events=self._num_events, warnings=self.warnings,
                     layout=Layout("decoded", 0, frame=frame, source=self))

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, metadata: RunMetadata | None = None) -> Trace:
        """An in-memory, finished trace from a frame of events (see ``conform_events``)."""
        table = conform_events(frame, source="frame")
        summary = Summary(table.num_rows, digest_batches(table.to_batches()), {})
        return cls(path=None, metadata=metadata or RunMetadata(), summary=summary,
                   num_events=table.num_rows, warnings=(),
                   layout=Layout("memory", 0, table))


def frame_of(table: pa.Table) -> pl.DataFrame:
    """``table`` as a polars frame, zero-copy: its batches stay chunks (no rechunk copy)."""
    frame = pl.from_arrow(table, rechunk=False)
    assert isinstance(frame, pl.DataFrame)
    return frame
