"""Naming for busy_retry's tables: flows, leaves, operands, status classes.

Applied to small, aggregated frames only: a Python map over a column's distinct values.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from tdxtrace.codes import LEAF_NAMES, OPERAND_NAMES, STATUS_CLASS_NAMES
from tdxtrace.events import Flow

from ._status import BUSY, DIV


def flow_name(v: int) -> str:
    return Flow(v).name.lower() if v in Flow._value2member_map_ else str(v)


def operand_name(status: int) -> str:
    low = status % DIV
    if status // DIV != BUSY:
        return "-" if low == 0 else f"0x{low:X}"
    return OPERAND_NAMES.get(low, f"0x{low:X}")


def class_name(status: int) -> str:
    return STATUS_CLASS_NAMES.get(status - status % DIV, f"0x{status - status % DIV:X}")


def named(frame: pl.DataFrame, column: str, namer: Callable[[int], str], alias: str) -> pl.Expr:
    values = [v for v in frame[column].unique().to_list() if v is not None]
    mapping = {v: namer(v) for v in values}
    return pl.col(column).replace_strict(mapping, default="?", return_dtype=pl.String).alias(
        alias)


def leaf_name(v: int) -> str:
    return LEAF_NAMES.get(v, f"LEAF_{v}")
