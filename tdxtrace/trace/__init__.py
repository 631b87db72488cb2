"""Trace files: write them (:class:`TraceWriter`), open them (:func:`open_trace`), use them
(:class:`Trace`). The file layout is described in :mod:`tdxtrace.trace.writer` and
``schemas/README.md``.
"""

from __future__ import annotations

from tdxtrace.trace.metadata import RunMetadata, Summary
from tdxtrace.trace.reader import open_trace
from tdxtrace.trace.trace import Trace
from tdxtrace.trace.writer import TraceWriter, write_events

__all__ = ["RunMetadata", "Summary", "Trace", "TraceWriter", "open_trace", "write_events"]
