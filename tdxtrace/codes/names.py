"""Names for the TDX vocabulary's values, both ways: plain ``dict[int, str]`` tables for
vectorized use (``polars.Expr.replace_strict``), and functions that name a raw status, leaf or
exit reason (or parse one) for messages and reports.
"""

from __future__ import annotations

import re

from tdxtrace.codes.values import (
    EXIT_REASON_INVALID,
    EXIT_REASON_STATUS_CLASSES,
    MODULE_NON_RECOVERABLE_TD,
    MODULE_NON_RECOVERABLE_TD_WRONG_APIC_MODE,
    OPERAND_MASK,
    PG_LEVEL_1G,
    PG_LEVEL_4K,
    STATUS_MASK,
    TDX_ERROR,
    ExitReason,
    Leaf,
    OperandId,
    Status,
    TdcallLeaf,
    TdvmcallLeaf,
    TdvmcallStatus,
    UnknownCodeError,
)


def _dotted(name: str) -> str:
    return name.replace("_", ".")


LEAF_NAMES: dict[int, str] = {int(m): _dotted(m.name) for m in Leaf}
TDCALL_LEAF_NAMES: dict[int, str] = {int(m): _dotted(m.name) for m in TdcallLeaf}
OPERAND_NAMES: dict[int, str] = {int(m): m.name for m in OperandId}
# Exact statuses (including the SW codes with low bits) and, separately, the classes that a
# status masked with STATUS_MASK can equal; the module-table variants get their own names.
STATUS_NAMES: dict[int, str] = {int(m): f"TDX_{m.name}" for m in Status}
STATUS_CLASS_NAMES: dict[int, str] = {
    **{v: n for v, n in STATUS_NAMES.items() if v & OPERAND_MASK == 0},
    MODULE_NON_RECOVERABLE_TD: "TDX_MODULE_NON_RECOVERABLE_TD",
    MODULE_NON_RECOVERABLE_TD_WRONG_APIC_MODE: "TDX_MODULE_NON_RECOVERABLE_TD_WRONG_APIC_MODE",
}
EXIT_REASON_NAMES: dict[int, str] = {
    **{int(m): m.name for m in ExitReason}, EXIT_REASON_INVALID: "INVALID(-1)",
}
# "Instruction" TDVMCALLs use the VMX exit reason as their leaf [KVM-new].
INSTRUCTION_TDVMCALLS = (
    ExitReason.CPUID, ExitReason.HLT, ExitReason.IO_INSTRUCTION, ExitReason.MSR_READ,
    ExitReason.MSR_WRITE, ExitReason.EPT_VIOLATION,
)
TDVMCALL_NAMES: dict[int, str] = {
    **{int(m): m.name for m in INSTRUCTION_TDVMCALLS},
    **{int(m): m.name for m in TdvmcallLeaf},
}
TDVMCALL_STATUS_NAMES: dict[int, str] = {int(m): m.name for m in TdvmcallStatus}

_STATUS_BY_NAME: dict[str, int] = {
    **{m.name: int(m) for m in Status},
    "MODULE_NON_RECOVERABLE_TD": MODULE_NON_RECOVERABLE_TD,
    "MODULE_NON_RECOVERABLE_TD_WRONG_APIC_MODE": MODULE_NON_RECOVERABLE_TD_WRONG_APIC_MODE,
}
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")
_DECIMAL = re.compile(r"[0-9]+")


# --- helpers -------------------------------------------------------------------------------


def _number(text: str) -> int | None:
    # Hex needs its 0x; decimal may have leading zeros ("06"), which int(text, 0) refuses.
    if _HEX.fullmatch(text):
        return int(text, 16)
    return int(text, 10) if _DECIMAL.fullmatch(text) else None


def status_class(status: int) -> int:
    """The half the kernel compares: ``status & TDX_SEAMCALL_STATUS_MASK`` [ERRNO]."""
    return status & STATUS_MASK


def operand_id(status: int) -> int:
    """The low 32 bits: operand ID for operand errors, exit reason after VP.ENTER."""
    return status & OPERAND_MASK


def with_operand(status: int, operand: int) -> int:
    """The module's ``api_error_with_operand_id(error, operand_id)`` = ``error + operand`` [MOD]."""
    if status & OPERAND_MASK or not 0 <= operand <= OPERAND_MASK:
        raise ValueError(f"cannot add operand {operand:#x} to status {status:#x}")
    return status + operand


_OPERAND_BUSY = int(Status.OPERAND_BUSY)  # a plain int: the emulator calls is_busy() a lot


def is_busy(status: int) -> bool:
    """True for TDX_OPERAND_BUSY with any operand, as the kernel's masked checks see it.

    PREVIOUS_TLB_EPOCH_BUSY, SYS_BUSY and OPERAND_BUSY_HOST_PRIORITY are other classes.
    """
    return status & STATUS_MASK == _OPERAND_BUSY


def is_error(status: int) -> bool:
    """Bit 63 (``TDX_ERROR``): a failure, as opposed to success or an informational status."""
    return bool(status & TDX_ERROR)


def is_sw_error(status: int) -> bool:
    """The kernel's own codes (#GP, #UD, VMfailInvalid on SEAMCALL): ``TDX_SW_ERROR`` set."""
    return status & Status.SW_ERROR == Status.SW_ERROR


# Classes whose low bits are VP.ENTER's exit reason, not an operand (TD-exit statuses [MOD]).
_EXIT_DETAIL_CLASSES = EXIT_REASON_STATUS_CLASSES | {
    Status.NON_RECOVERABLE_TD_CORRUPTED_MD, MODULE_NON_RECOVERABLE_TD,
    MODULE_NON_RECOVERABLE_TD_WRONG_APIC_MODE,
}


def _low_bits_are_operand(status_cls: int) -> bool:
    # SW codes carry their own detail (#GP = 0xD, #UD = 6); every other class reports an
    # operand ID through api_error_with_operand_id() [MOD].
    return status_cls not in _EXIT_DETAIL_CLASSES and not is_sw_error(status_cls)


def leaf_name(leaf: int) -> str:
    """``6`` -> ``"TDH.MEM.PAGE.AUG"``; an unknown number -> ``"leaf_<n>"``."""
    return LEAF_NAMES.get(leaf, f"leaf_{leaf}")


def tdcall_name(leaf: int) -> str:
    """``6`` -> ``"TDG.MEM.PAGE.ACCEPT"``; an unknown number -> ``"tdcall_<n>"``."""
    return TDCALL_LEAF_NAMES.get(leaf, f"tdcall_{leaf}")


def parse_leaf(text: str) -> Leaf:
    """A leaf from ``TDH.MEM.PAGE.AUG``, ``TDH_MEM_PAGE_AUG``, ``mem.page.aug`` or ``6``."""
    raw = text.strip()
    leaf: Leaf | None
    number = _number(raw)
    if number is not None:
        leaf = Leaf(number) if number in LEAF_NAMES else None
    else:
        key = raw.upper().replace(".", "_").replace("-", "_")
        leaf = Leaf.__members__.get(key if key.startswith("TDH_") else f"TDH_{key}")
    if leaf is None:
        raise UnknownCodeError(
            f"unknown SEAMCALL leaf {text!r} (expected a name like TDH.MEM.PAGE.AUG or a number)"
        )
    return leaf


def operand_name(operand: int) -> str:
    """``0x92`` -> ``"SEPT_TREE"``; an unknown ID -> hex such as ``"0xBB"``."""
    return OPERAND_NAMES.get(operand, f"0x{operand:X}")


def status_name(status: int) -> str:
    """Render a 64-bit status: ``TDX_SUCCESS``, ``TDX_OPERAND_BUSY|SEPT_TREE``, ``0x...``.

    A known class with low bits set shows them after ``|``: as an operand name for operand
    errors, in hex for the classes whose low bits are an exit reason or SW detail.
    """
    if not 0 <= status < 1 << 64:
        return str(status)
    exact = STATUS_NAMES.get(status)
    if exact is not None:
        return exact
    cls, low = status & STATUS_MASK, status & OPERAND_MASK
    class_name = STATUS_CLASS_NAMES.get(cls)
    if class_name is None:
        return f"0x{status:016X}"
    if low == 0:
        return class_name
    detail = operand_name(low) if _low_bits_are_operand(cls) else f"0x{low:X}"
    return f"{class_name}|{detail}"


def parse_status(text: str) -> int:
    """The inverse of :func:`status_name`; also bare hex/decimal and names without ``TDX_``.

    Case-insensitive. The part after ``|`` is an operand name or a number below 2**32.
    """
    head, bar, tail = (part.strip().upper() for part in text.partition("|"))
    value = _status_head(head)
    if bar and value is not None:
        operand = _operand_value(tail)
        # Only a class (low half zero) takes an operand: TDX_SEAMCALL_GP|RCX names nothing.
        value = None if operand is None or value & OPERAND_MASK else value + operand
    if value is None or not 0 <= value < 1 << 64:
        raise UnknownCodeError(
            f"unknown TDX status {text!r} (expected a name like TDX_OPERAND_BUSY|SEPT_TREE "
            "or a hex value like 0x8000020000000092)"
        )
    return value


def _status_head(text: str) -> int | None:
    number = _number(text)
    return number if number is not None else _STATUS_BY_NAME.get(text.removeprefix("TDX_"))


def _operand_value(text: str) -> int | None:
    number = _number(text)
    if number is not None:
        return number if number <= OPERAND_MASK else None
    member = OperandId.__members__.get(text.removeprefix("OPERAND_ID_"))
    return None if member is None else int(member)


def exit_reason_name(reason: int) -> str:
    """``48`` -> ``"EPT_VIOLATION"``, ``0xFFFFFFFF`` -> ``"INVALID(-1)"``, unknown -> ``"<n>"``."""
    return EXIT_REASON_NAMES.get(reason, str(reason))


def tdvmcall_name(leaf: int) -> str:
    """``0x10001`` -> ``"MAP_GPA"``, ``12`` -> ``"HLT"``; unknown -> hex."""
    return TDVMCALL_NAMES.get(leaf, f"0x{leaf:X}")


def tdvmcall_status_name(status: int) -> str:
    """``1`` -> ``"RETRY"``; unknown -> hex."""
    return TDVMCALL_STATUS_NAMES.get(status, f"0x{status:X}")


def tdx_level(pg_level: int) -> int:
    """The kernel's ``pg_level_to_tdx_sept_level()``: PG_LEVEL_4K (1) -> TDX_PS_4K (0)."""
    if not PG_LEVEL_4K <= pg_level <= PG_LEVEL_1G:
        raise ValueError(f"pg_level {pg_level} is not 4K (1), 2M (2) or 1G (3)")
    return pg_level - 1
