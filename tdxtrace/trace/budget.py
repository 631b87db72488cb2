"""How much decoded trace data may be held in memory to be shared (``TDXTRACE_DECODE_BUDGET_MB``).

Decoding a trace once and letting every query read that copy is several times faster than
decoding the file per query, but holds the decompressed columns in memory (about 100 bytes per
event). Within the budget, :func:`tdxtrace.trace.open_trace` keeps the batches it checked and
:func:`tdxtrace.analysis.run_analyzers` shares one decode; above it, every query streams the
file, so peak memory stays well under the decompressed size however large the trace.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tdxtrace.errors import TdxtraceError
from tdxtrace.schema import FIELDS

DECODE_BUDGET_ENV = "TDXTRACE_DECODE_BUDGET_MB"
_DEFAULT_DECODE_BUDGET_MB = 2048
_FIELD_BYTES: dict[str, int] = {f.name: max(1, int(f.type.bit_width) // 8) for f in FIELDS}


def decode_budget_bytes() -> int:
    """The budget in bytes; a value that is not a whole number of megabytes (0 or more) is an
    error: 0 is how to ask for no shared decode, and a negative number is a typo, not that."""
    text = os.environ.get(DECODE_BUDGET_ENV, "")
    if not text:
        return _DEFAULT_DECODE_BUDGET_MB << 20
    try:
        megabytes = int(text)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise TdxtraceError(f"{DECODE_BUDGET_ENV}={text!r}: expected a whole number of "
                            "megabytes, 0 or more")
    return megabytes << 20


def decoded_bytes(events: int, columns: Iterable[str]) -> int:
    """Decoded size of ``events`` rows of ``columns``: value bytes plus one validity byte each
    (a bound: Arrow packs validity and booleans in bits)."""
    return events * sum(_FIELD_BYTES.get(name, 8) + 1 for name in columns)
