"""Checking a trace's record batches before anything else reads them.

Arrow IPC carries no checksums and trusts the lengths and offsets written in its headers. A
bit flipped in a file can make a decoder allocate exabytes, read out of bounds or, worse, decode
wrong numbers without complaint; polars' own IPC reader even aborts the process on some of
these. So :func:`tdxtrace.trace.open_trace` decodes every batch once with pyarrow (which
bounds every read by the file's size and reports damage as an exception) and hands each one to
:class:`BatchChecker`, which

* validates the decoded arrays in full (offsets, lengths, buffer sizes);
* applies the format v1 rules, vectorized. What every writer guarantees (no nulls in the
  not-null columns, ``seq`` continues 0, 1, 2, ...) ends the readable part of the trace when
  broken; the softer rules (``kind``, ``flow`` and ``level`` hold known codes, ``truth``
  agrees with ``kind``, ``ts_ns`` never decreases, ``dur_ns`` is not negative) give a
  warning that counts the rows breaking them;
* feeds the content digest, so a finished trace's events can be compared with its summary,
  which is the only way to catch a flipped bit that still decodes.

:func:`validate_schema` checks the schema first: the run metadata, then every column's name
and type. Only batches that passed are ever given to polars. Memory stays at about one batch,
unless the caller asks to keep them (within a byte budget) to save decoding the file again.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from tdxtrace.errors import TraceFormatError
from tdxtrace.events import TRUTH_KIND_BASE, Flow, Kind
from tdxtrace.schema import COLUMN_NAMES, FIELDS, arrow_schema
from tdxtrace.trace.digest import ContentDigest
from tdxtrace.trace.metadata import RunMetadata

_V1 = arrow_schema()
_NOT_NULL = tuple(f.name for f in FIELDS if not f.nullable)
_KINDS = sorted(int(k) for k in Kind)
_FLOWS = sorted(int(f) for f in Flow)
_MAX_LEVEL = 4  # SEPT.ADD names non-leaf levels: 3 (512G) and, with 5-level EPT, 4
_IN_FLIGHT = 2  # batches decoded but not yet hashed
_HASH_THREADS = 2  # hashing threads, each with its share of the columns
_HASH_IN_WORKER_ROWS = 8192  # smaller batches are hashed at once: handing over costs more


def first_line(err: BaseException) -> str:
    """An exception's first line of text, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _seq_breaks(seq_start: int) -> pl.Expr:
    """True on the rows where ``seq`` does not continue 0, 1, 2, ... from ``seq_start``."""
    return pl.col("seq") != pl.int_range(seq_start, seq_start + pl.len(), dtype=pl.Int64)


def _suspect_rules(last_ts: int) -> dict[str, pl.Expr]:
    """Rules whose breach is reported but does not stop the read: the values are what the file
    holds (a newer tdxtrace may add kinds; an importer may get times wrong), so analyzers
    can still use the rest. Each expression is true on the rows that break the rule."""
    kind = pl.col("kind")
    ts = pl.col("ts_ns")
    return {
        "kind": ~kind.is_in(_KINDS),
        "flow": ~pl.col("flow").is_in(_FLOWS),
        "level": pl.col("level").fill_null(0) > _MAX_LEVEL,
        "truth": pl.col("truth") != (kind >= TRUTH_KIND_BASE),
        # The previous batch's last time carries over, so the rule holds across batches too.
        "ts_ns": ts < ts.shift(1, fill_value=last_ts),
        "dur_ns": pl.col("dur_ns") < 0,
    }


_SUSPECT_TEXT = {
    "kind": "a kind this tdxtrace does not know (a newer producer, or damage)",
    "flow": "a flow this tdxtrace does not know (a newer producer, or damage)",
    "level": f"a level above {_MAX_LEVEL} (the top of 5-level EPT)",
    "truth": "a truth flag that disagrees with their kind (truth kinds are >= 100)",
    "ts_ns": "a ts_ns before the previous event's, or negative",
    "dur_ns": "a negative dur_ns",
}


@dataclass
class _Suspect:
    rows: int = 0
    first_event: int = 0
    first_value: object = None


class BatchChecker:
    """Check data batches in file order; remembers what the next batch must continue.

    :meth:`check` refuses a batch that breaks what every writer guarantees (decodable, valid
    arrays, no nulls where none are allowed, ``seq`` continuing): the trace ends before it.
    Rows that break a softer rule are counted and reported by :meth:`suspect_rows`.
    """

    def __init__(self, keep_bytes: int = 0) -> None:
        self.events = 0  # rows of the batches that passed
        self.batches = 0  # non-empty batches that passed
        # With keep_bytes > 0 the batches that passed are kept (decoded, v1 columns) while
        # their size stays within keep_bytes, so the trace need not be decoded again; past
        # it, none are (None).
        self.kept: list[pa.RecordBatch] | None = [] if keep_bytes > 0 else None
        self._keep_left = keep_bytes
        self._last_ts = 0
        self._digest = ContentDigest()
        self._suspects: dict[str, _Suspect] = {}
        # Hashing costs twice as much as decoding and checking; hashlib releases the GIL, so
        # workers hash batch i while this thread decodes batch i + 1. Each worker owns a
        # group of columns and takes the batches in order (one thread each); at most
        # _IN_FLIGHT batches wait, which bounds the memory.
        self._groups = self._digest.column_groups(_HASH_THREADS)
        self._hashers = [ThreadPoolExecutor(max_workers=1, thread_name_prefix="tdxtrace-digest")
                         for _ in self._groups]
        self._pending: deque[list[Future[None]]] = deque()

    def hexdigest(self) -> str:
        """The content digest of the batches that passed (waits for the hashing to finish)."""
        self._drain(0)
        return self._digest.hexdigest()

    def close(self) -> None:
        """Stop the hashing threads (the digest is not needed, or was read)."""
        for hasher in self._hashers:
            hasher.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchChecker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            for future in self._pending.popleft():
                future.result()

    def suspect_rows(self) -> list[str]:
        """One line per soft rule that rows broke, e.g. ``3 events have a negative dur_ns``."""
        return [f"{s.rows} events have {_SUSPECT_TEXT[name]} (the first is event "
                f"{s.first_event}, {name} = {s.first_value})"
                for name, s in self._suspects.items()]

    def check(self, batch: pa.RecordBatch) -> str | None:
        """Why ``batch`` is unusable, or None after accepting it (it must have v1 columns)."""
        if batch.num_rows == 0:
            return None
        try:
            batch.validate(full=True)
        except (pa.ArrowException, ValueError) as err:
            return f"invalid Arrow data: {first_line(err)}"
        # The file's own field metadata may be damaged (polars panics on bad UTF-8 in it):
        # from here on the batch carries the v1 schema as the code defines it.
        batch = pa.RecordBatch.from_arrays(batch.select(COLUMN_NAMES).columns, schema=_V1)
        for name in _NOT_NULL:
            nulls = batch.column(name).null_count
            if nulls:
                return f"column {name} has {nulls} null values; it must not be null"
        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)
        seq_rule = _seq_breaks(self.events)
        rules = _suspect_rules(self._last_ts)
        # One pass for every rule: the count of rows breaking each.
        counts = frame.select(seq_rule.sum().alias("seq"),
                              *[rule.sum().alias(name) for name, rule in rules.items()])
        broken = counts.row(0, named=True)
        if broken.pop("seq"):
            row = frame.with_row_index("_row").filter(seq_rule).row(0)
            return (f"seq does not continue the count 0, 1, 2, ...: event {self.events + row[0]}"
                    f" has seq {row[1]}")
        self._note_suspects(frame, rules, broken)
        if batch.num_rows >= _HASH_IN_WORKER_ROWS:
            self._drain(_IN_FLIGHT - 1)
            self._pending.append([hasher.submit(self._digest.update, batch, group)
                                  for hasher, group in zip(self._hashers, self._groups,
                                                           strict=True)])
        else:
            self._drain(0)  # the digest takes batches in order
            self._digest.update(batch)
        if self.kept is not None:
            self._keep_left -= batch.nbytes
            if self._keep_left < 0:
                self.kept = None
            else:
                self.kept.append(batch)
        self.events += batch.num_rows
        self.batches += 1
        self._last_ts = batch.column("ts_ns")[batch.num_rows - 1].as_py()
        return None

    def _note_suspects(self, frame: pl.DataFrame, rules: dict[str, pl.Expr],
                       broken: dict[str, int]) -> None:
        for name, rows in broken.items():
            if not rows:
                continue
            suspect = self._suspects.get(name)
            if suspect is None:
                # Only the first offender is looked up: a few rows of work, once per rule.
                first = frame.filter(rules[name]).row(0, named=True)
                suspect = self._suspects[name] = _Suspect(0, first["seq"], first[name])
            suspect.rows += rows


def validate_schema(schema: pa.Schema, source: str) -> RunMetadata:
    """Run metadata first (so an unknown version is reported as such), then the columns."""
    metadata = RunMetadata.from_arrow(schema.metadata, source=source)
    try:
        names = schema.names
    except UnicodeDecodeError:
        raise TraceFormatError(f"{source}: damaged schema: a column name is not UTF-8") from None
    for f in FIELDS:
        if f.name not in names:
            raise TraceFormatError(f"{source}: missing column {f.name}")
        actual = schema.field(f.name).type
        if actual != f.type:
            raise TraceFormatError(
                f"{source}: column {f.name} has type {actual}, expected {f.type}")
    return metadata
