"""The content digest of a trace: a hash of its events, not of its bytes.

Two traces with the same events have the same digest whatever their batch sizes or compression
(zstd, lz4 or none), so replay and ``tdxtrace info`` can compare runs by content. The digest is
defined column by column so a reader in another language can recompute it without decoding rows:

* For each of the v1 columns, in schema order (all of them, even for a trace with no rows),
  two SHA-256 streams over all rows in ``seq`` order:

  - **values**: each row's value as fixed-width little-endian bytes of the column's type (bool:
    one byte, 0 or 1; a null is written as 0 of the type's width);
  - **validity**: one byte per row, 1 when the value is present, 0 when it is null.

* The digest is SHA-256 of the concatenation ``values_0 || validity_0 || values_1 || ...`` of
  the 32-byte stream digests, written ``"sha256:<hex>"``.

Values and validity are kept in separate streams (rather than interleaved in one stream per
column) so that feeding a column batch by batch gives the same bytes as feeding it whole.
The work is done on Arrow buffers; there is no per-row Python.
"""

from __future__ import annotations

import array
import hashlib
import sys
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from tdxtrace.schema import COLUMN_NAMES, FIELDS

# array.array type codes for byte swapping on big-endian hosts, by value width.
_SWAP_CODES = {2: "H", 4: "I", 8: "Q"}


def _fixed_width_values(column: pa.Array) -> memoryview:
    """The column's values as little-endian fixed-width bytes, nulls as 0 (zero-copy if can)."""
    if column.null_count:
        column = pc.fill_null(column, pa.scalar(0 if column.type != pa.bool_() else False,
                                                column.type))
    if column.type == pa.bool_():
        # Booleans are bit-packed in Arrow; the digest wants one byte per row.
        column = pc.cast(column, pa.uint8())
    width = column.type.bit_width // 8
    data = column.buffers()[1]
    assert data is not None  # fixed-width arrays always have a values buffer
    start = column.offset * width
    view = memoryview(data)[start:start + len(column) * width]
    if sys.byteorder == "big" and width > 1:
        swapped = array.array(_SWAP_CODES[width], view.tobytes())
        swapped.byteswap()
        return memoryview(swapped).cast("B")
    return view


def _validity(column: pa.Array, all_valid: bytes) -> memoryview | bytes:
    if not column.null_count:
        return all_valid
    flags = pc.cast(column.is_valid(), pa.uint8())
    data = flags.buffers()[1]
    assert data is not None
    return memoryview(data)[flags.offset:flags.offset + len(flags)]


class ContentDigest:
    """Incremental content digest: feed record batches in order, then read :meth:`hexdigest`."""

    def __init__(self, columns: Sequence[str] = COLUMN_NAMES) -> None:
        # The column list is fixed up front so an empty trace still has a well-defined digest.
        self._names = tuple(columns)
        self._values = [hashlib.sha256() for _ in self._names]
        self._validity = [hashlib.sha256() for _ in self._names]

    def column_groups(self, count: int) -> list[tuple[int, ...]]:
        """The digest's column indexes split into ``count`` groups of about equal bytes per
        row, for :meth:`update` in parallel: one thread per group, each feeding its columns'
        streams in batch order (hashlib releases the GIL on large buffers)."""
        widths = {f.name: f.type.bit_width for f in FIELDS}
        groups: list[list[int]] = [[] for _ in range(count)]
        load = [0] * count
        by_width = sorted(range(len(self._names)), key=lambda i: -widths[self._names[i]])
        for index in by_width:  # widest first, each to the lightest group: near-even
            lightest = load.index(min(load))
            groups[lightest].append(index)
            load[lightest] += widths[self._names[index]] + 8  # + the validity byte
        return [tuple(sorted(group)) for group in groups if group]

    def update(self, batch: pa.RecordBatch, columns: Sequence[int] | None = None) -> None:
        """Add one batch's rows; its columns must be the digest's columns, in order.

        ``columns``: only these column indexes (default: all). Each column's streams must
        see every batch, in order; different columns may be fed from different threads."""
        if tuple(batch.schema.names) != self._names:
            raise ValueError(
                f"ContentDigest.update: batch columns {batch.schema.names} are not "
                f"{list(self._names)}")
        if batch.num_rows == 0:
            return
        all_valid = b"\x01" * batch.num_rows
        for i in range(len(self._names)) if columns is None else columns:
            column = batch.column(i)
            self._values[i].update(_fixed_width_values(column))
            self._validity[i].update(_validity(column, all_valid))

    def hexdigest(self) -> str:
        """``"sha256:<hex>"`` over everything fed so far (it can still be updated afterwards)."""
        final = hashlib.sha256()
        for values, validity in zip(self._values, self._validity, strict=True):
            final.update(values.digest())
            final.update(validity.digest())
        return "sha256:" + final.hexdigest()


def digest_batches(batches: Iterable[pa.RecordBatch]) -> str:
    """The content digest of the given batches, fed in order."""
    digest = ContentDigest()
    for batch in batches:
        digest.update(batch)
    return digest.hexdigest()
