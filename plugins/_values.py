"""Raw trace values as the signed integers the analyzers compute with, for any valid trace.

The schema stores counts, GPAs and statuses as uint64 and LPs as int32. A finished trace from
another producer (a converter from a real host, or a hand edit with a fresh digest) may hold
any value those types allow, and a strict cast of one absurd value (a call count of 2^63, an
LP of -1) would fail the whole analyzer and lose all its figures. These conversions never
fail: an absurd count is capped, a value with no signed meaning becomes null (unknown).
"""

from __future__ import annotations

import polars as pl

# 2^40 pages of 4 KiB is 4 PiB: no TD comes near it, and sums of capped counts cannot
# overflow Int64.
MAX_COUNT = 1 << 40


def count(value: pl.Expr) -> pl.Expr:
    """A uint64 count (calls, pages, SPTEs) as Int64, capped at MAX_COUNT."""
    return value.clip(upper_bound=MAX_COUNT).cast(pl.Int64)


def signed(value: pl.Expr) -> pl.Expr:
    """A uint64 (a GPA) as Int64, null when it is 2^63 or more (no signed meaning)."""
    return value.cast(pl.Int64, strict=False)


def u64(value: int) -> pl.Expr:
    """A UInt64 literal, so comparisons with a 64-bit column (a status, a GPA) never overflow
    Int64."""
    return pl.lit(value, dtype=pl.UInt64)


def unsigned(value: pl.Expr) -> pl.Expr:
    """An int32 id (an LP) as UInt64, null when negative (unknown)."""
    return value.cast(pl.UInt64, strict=False)
