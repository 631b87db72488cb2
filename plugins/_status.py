"""TDX status classes as polars expressions, shared by the analyzers that count BUSYs.

A SEAMCALL status is a 64-bit RAX: the class in bits 63:32 (what KVM compares, masking with
TDX_SEAMCALL_STATUS_MASK) and the operand ID or other detail in bits 31:0. Dividing by 2^32
keeps the class as a small integer, which polars compares and groups faster than masked u64s.
"""

from __future__ import annotations

import polars as pl

from tdxtrace.codes import STATUS_MASK, Status

DIV = 1 << 32  # status // DIV = the class half; status % DIV = the operand ID
BUSY = int(Status.OPERAND_BUSY) // DIV
PREV_EPOCH = int(Status.PREVIOUS_TLB_EPOCH_BUSY) // DIV
INTERRUPTED = int(Status.INTERRUPTED_RESUMABLE) // DIV
# The call did not get its lock and did nothing: KVM retries it. Only these are contention.
CONTENTION_CLASSES = (BUSY, PREV_EPOCH)
# The call did part of its work and stopped (an interrupt was pending): KVM calls it again to
# resume, by design (CACHE.WB, tdx-reference.md section 4(c)). Not contention.
RESUME_CLASSES = (INTERRUPTED,)
RETRY_CLASSES = (*CONTENTION_CLASSES, *RESUME_CLASSES)  # every class busy_retry counts
assert BUSY * DIV == Status.OPERAND_BUSY & STATUS_MASK


def status_class(status: pl.Expr) -> pl.Expr:
    """The class half of a status (bits 63:32): BUSY, PREV_EPOCH, INTERRUPTED, ..."""
    return status // DIV


def is_operand_busy(status: pl.Expr) -> pl.Expr:
    """TDX_OPERAND_BUSY with any operand, compared on the class half as KVM does."""
    return (status_class(status) == BUSY).fill_null(False)
