"""The TDX vocabulary: values pinned against docs/tdx-reference.md, names, parsing."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tdxtrace import codes
from tdxtrace.codes import (
    ExitReason,
    Leaf,
    OperandId,
    Status,
    TdvmcallLeaf,
    TdvmcallStatus,
)
from tdxtrace.errors import TdxtraceError

operands = st.integers(min_value=0, max_value=codes.OPERAND_MASK)
statuses64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
# Members whose low half is zero: the classes the module adds an operand ID to.
STATUS_CLASSES = [m for m in Status if m & codes.OPERAND_MASK == 0]


# --- values (reference §1.2, §2, §3, §5) ---------------------------------------------------

@pytest.mark.parametrize(("leaf", "number"), [
    (Leaf.TDH_VP_ENTER, 0), (Leaf.TDH_MEM_SEPT_ADD, 3), (Leaf.TDH_MEM_PAGE_AUG, 6),
    (Leaf.TDH_MEM_RANGE_BLOCK, 7), (Leaf.TDH_VP_FLUSH, 18), (Leaf.TDH_MNG_VPFLUSHDONE, 19),
    (Leaf.TDH_MNG_KEY_FREEID, 20), (Leaf.TDH_VP_INIT, 22), (Leaf.TDH_PHYMEM_PAGE_RECLAIM, 28),
    (Leaf.TDH_MEM_PAGE_REMOVE, 29), (Leaf.TDH_MEM_TRACK, 38), (Leaf.TDH_PHYMEM_CACHE_WB, 40),
    (Leaf.TDH_PHYMEM_PAGE_WBINVD, 41), (Leaf.TDH_SYS_CONFIG, 45), (Leaf.TDH_SERVTD_PREBIND, 49),
    (Leaf.TDH_SYS_UPDATE, 53), (Leaf.TDH_PHYMEM_PAMT_ADD, 58), (Leaf.TDH_MIG_STREAM_CREATE, 96),
])
def test_leaf_numbers_match_the_reference(leaf: Leaf, number: int) -> None:
    assert leaf == number


@pytest.mark.parametrize(("status", "value"), [
    (Status.OPERAND_BUSY, 0x8000020000000000),
    (Status.PREVIOUS_TLB_EPOCH_BUSY, 0x8000020100000000),
    (Status.FLUSHVP_NOT_DONE, 0x8000082400000000),
    (Status.TLB_TRACKING_NOT_DONE, 0xC0000B0800000000),
    (Status.GPA_RANGE_NOT_BLOCKED, 0xC0000B0600000000),
    (Status.VCPU_ASSOCIATED, 0x8000070100000000),
    (Status.VCPU_NOT_ASSOCIATED, 0x8000070200000000),
    (Status.INTERRUPTED_RESUMABLE, 0x8000000300000000),
    (Status.NO_HKID_READY_TO_WBCACHE, 0x0000082100000000),
    (Status.WBCACHE_NOT_COMPLETE, 0x8000081700000000),
    (Status.LIFECYCLE_STATE_INCORRECT, 0xC000060700000000),
    (Status.OPERAND_BUSY_HOST_PRIORITY, 0x8000020400000000),
    (Status.RND_NO_ENTROPY, 0x8000020300000000),
    (Status.SEAMCALL_GP, 0x8000FF000000000D),
    (Status.SEAMCALL_VMFAILINVALID, 0x8000FF00FFFF0000),
    (Status.NON_RECOVERABLE_TD, 0x4000000200000000),  # kernel value, not the module's
    (Status.NON_RECOVERABLE_TD_WRONG_APIC_MODE, 0x6000000700000000),
])
def test_status_values_match_the_reference(status: Status, value: int) -> None:
    assert status == value


def test_module_values_of_the_discrepant_codes_are_kept_apart() -> None:
    assert codes.MODULE_NON_RECOVERABLE_TD == 0x6000000200000000
    assert codes.MODULE_NON_RECOVERABLE_TD_WRONG_APIC_MODE == 0xE000000700000000
    assert codes.status_name(codes.MODULE_NON_RECOVERABLE_TD) == "TDX_MODULE_NON_RECOVERABLE_TD"


@pytest.mark.parametrize(("cls", "operand", "value", "name"), [
    (Status.OPERAND_BUSY, OperandId.SEPT_TREE, 0x8000020000000092, "TDX_OPERAND_BUSY|SEPT_TREE"),
    (Status.OPERAND_BUSY, OperandId.TD_EPOCH, 0x80000200000000A9, "TDX_OPERAND_BUSY|TD_EPOCH"),
    (Status.OPERAND_BUSY, OperandId.RCX, 0x8000020000000001, "TDX_OPERAND_BUSY|RCX"),
    (Status.OPERAND_BUSY, OperandId.TDR, 0x8000020000000080, "TDX_OPERAND_BUSY|TDR"),
    (Status.OPERAND_BUSY, OperandId.KOT, 0x80000200000000BA, "TDX_OPERAND_BUSY|KOT"),
    (Status.OPERAND_BUSY, OperandId.WBCACHE, 0x80000200000000BC, "TDX_OPERAND_BUSY|WBCACHE"),
    (Status.EPT_ENTRY_STATE_INCORRECT, OperandId.RCX, 0xC0000B0D00000001,
     "TDX_EPT_ENTRY_STATE_INCORRECT|RCX"),
])
def test_composite_statuses_the_emulator_sees_most(
    cls: Status, operand: OperandId, value: int, name: str
) -> None:
    assert codes.with_operand(cls, operand) == value
    assert codes.status_name(value) == name
    assert codes.parse_status(name) == value
    assert codes.status_class(value) == cls
    assert codes.operand_id(value) == operand


def test_exit_reasons_and_tdvmcall_values() -> None:
    assert int(ExitReason.EPT_VIOLATION) == 48
    assert int(ExitReason.TDCALL) == 77
    assert codes.EXIT_REASON_INVALID == 0xFFFFFFFF
    assert int(TdvmcallLeaf.MAP_GPA) == 0x10001
    assert int(TdvmcallStatus.RETRY) == 1
    assert int(TdvmcallStatus.ALIGN_ERROR) == 0x8000000000000002
    assert int(TdvmcallStatus.SUBFUNC_UNSUPPORTED) == 0x8000000000000003


def test_emulator_constants() -> None:
    assert codes.FROZEN_SPTE == 0x80000000000005A0
    assert codes.STEPPING_EPF_THRESHOLD == 6
    assert codes.EPF_GPA_LIST_SIZE == 32
    assert codes.TDX_MAP_GPA_MAX_LEN == 0x200000
    assert codes.KVM_MAP_GPA_RANGE_ENCRYPTED == 0x10
    assert codes.KVM_MEMORY_ATTRIBUTE_PRIVATE == 8


# --- helpers -------------------------------------------------------------------------------

@given(operands)
def test_is_busy_for_operand_busy_with_any_operand(operand: int) -> None:
    assert codes.is_busy(codes.with_operand(Status.OPERAND_BUSY, operand))
    for other in (Status.PREVIOUS_TLB_EPOCH_BUSY, Status.SYS_BUSY,
                  Status.OPERAND_BUSY_HOST_PRIORITY, Status.SUCCESS):
        assert not codes.is_busy(other + operand)


def test_is_error_and_is_sw_error() -> None:
    assert codes.is_error(0x8000020000000092)
    assert codes.is_error(Status.TLB_TRACKING_NOT_DONE)
    assert not codes.is_error(Status.SUCCESS)
    assert not codes.is_error(Status.NO_HKID_READY_TO_WBCACHE)  # KVM treats it as success
    assert not codes.is_error(Status.NON_RECOVERABLE_VCPU)  # bit 62 only
    assert codes.is_sw_error(Status.SEAMCALL_GP)
    assert not codes.is_sw_error(Status.OPERAND_BUSY)


def test_with_operand_rejects_what_would_corrupt_the_class() -> None:
    with pytest.raises(ValueError, match="operand"):
        codes.with_operand(Status.OPERAND_BUSY, 1 << 32)
    with pytest.raises(ValueError, match="operand"):
        codes.with_operand(0x8000020000000092, 1)


@pytest.mark.parametrize("member", list(Status))
def test_every_status_member_renders_and_parses_back(member: Status) -> None:
    name = codes.status_name(member)
    assert name == f"TDX_{member.name}"
    assert codes.parse_status(name) == member
    assert codes.parse_status(member.name.lower()) == member


@given(st.sampled_from(STATUS_CLASSES), operands)
def test_status_round_trip_for_every_class_and_operand(cls: Status, operand: int) -> None:
    value = codes.with_operand(cls, operand)
    name = codes.status_name(value)
    assert not name.startswith("0x")
    assert codes.parse_status(name) == value
    assert codes.parse_status(name.lower()) == value


@given(statuses64)
def test_any_64_bit_status_renders_and_parses_back(value: int) -> None:
    assert codes.parse_status(codes.status_name(value)) == value
    assert codes.parse_status(f"0x{value:x}") == value


def test_status_rendering_rules() -> None:
    assert codes.status_name(0) == "TDX_SUCCESS"
    # after VP.ENTER the low bits of SUCCESS are the exit reason, not an operand (1 != RCX)
    assert codes.status_name(1) == "TDX_SUCCESS|0x1"
    assert codes.status_name(0x8000FF0000000007) == "TDX_SW_ERROR|0x7"
    assert codes.status_name(0x80000200000000BB) == "TDX_OPERAND_BUSY|0xBB"
    assert codes.status_name(0x1234000000000000) == "0x1234000000000000"
    assert codes.status_name(-1) == "-1"


@pytest.mark.parametrize("text", [
    "TDX_OPERAND_BUSY|SEPT_TREE", "operand_busy|sept_tree", " TDX_OPERAND_BUSY | 0x92 ",
    "OPERAND_BUSY|OPERAND_ID_SEPT_TREE", "0x8000020000000092", "9223374235878031506",
    "TDX_OPERAND_BUSY|0146",
])
def test_parse_status_spellings(text: str) -> None:
    assert codes.parse_status(text) == 0x8000020000000092


@pytest.mark.parametrize("text", [
    "", "BUSY", "TDX_OPERAND_BUSY|NOPE", "TDX_OPERAND_BUSY|0x100000000",
    "TDX_SEAMCALL_GP|RCX", "0x10000000000000000", "0xZZ", "TDX_OPERAND_BUSY|",
])
def test_parse_status_rejects_with_the_text_named(text: str) -> None:
    with pytest.raises(ValueError, match="unknown TDX status") as info:
        codes.parse_status(text)
    assert repr(text) in str(info.value)
    assert isinstance(info.value, TdxtraceError)  # the CLI prints it as one line


@pytest.mark.parametrize("member", list(Leaf))
def test_every_leaf_name_parses_back(member: Leaf) -> None:
    name = codes.leaf_name(member)
    assert name.startswith("TDH.")
    assert codes.parse_leaf(name) is member
    assert codes.parse_leaf(str(int(member))) is member


@pytest.mark.parametrize("text", [
    "TDH.MEM.PAGE.AUG", "TDH_MEM_PAGE_AUG", "tdh_mem_page_aug", "mem.page.aug", "6", " 06 ", "0x6",
])
def test_parse_leaf_spellings(text: str) -> None:
    assert codes.parse_leaf(text) is Leaf.TDH_MEM_PAGE_AUG


@pytest.mark.parametrize("text", ["", "TDG.MEM.PAGE.ACCEPT", "mem.page", "46", "tdh.nope"])
def test_parse_leaf_rejects_with_the_text_named(text: str) -> None:
    with pytest.raises(ValueError, match="unknown SEAMCALL leaf") as info:
        codes.parse_leaf(text)
    assert repr(text) in str(info.value)


def test_names_of_unknown_values_do_not_raise() -> None:
    assert codes.leaf_name(6) == "TDH.MEM.PAGE.AUG"
    assert codes.leaf_name(1000) == "leaf_1000"
    assert codes.tdcall_name(6) == "TDG.MEM.PAGE.ACCEPT"
    assert codes.tdcall_name(99) == "tdcall_99"
    assert codes.operand_name(0x92) == "SEPT_TREE"
    assert codes.operand_name(0xBB) == "0xBB"
    assert codes.exit_reason_name(48) == "EPT_VIOLATION"
    assert codes.exit_reason_name(0xFFFFFFFF) == "INVALID(-1)"
    assert codes.exit_reason_name(999) == "999"
    assert codes.tdvmcall_name(0x10001) == "MAP_GPA"
    assert codes.tdvmcall_name(12) == "HLT"  # instruction TDVMCALLs use the exit reason
    assert codes.tdvmcall_name(0x20000) == "0x20000"
    assert codes.tdvmcall_status_name(1) == "RETRY"
    assert codes.tdvmcall_status_name(0x8000000000000009) == "0x8000000000000009"


def test_tdx_level_converts_pg_level() -> None:
    assert [codes.tdx_level(lv) for lv in (1, 2, 3)] == [
        codes.TDX_PS_4K, codes.TDX_PS_2M, codes.TDX_PS_1G]
    for bad in (0, 4):
        with pytest.raises(ValueError, match="pg_level"):
            codes.tdx_level(bad)


def test_name_tables_serve_vectorized_lookups() -> None:
    statuses = pl.Series("status", [0, 0x8000020000000092, 0xC0000B0800000000, 0x1234 << 48],
                         dtype=pl.UInt64)
    classes = (statuses & codes.STATUS_MASK).replace_strict(
        codes.STATUS_CLASS_NAMES, default="other", return_dtype=pl.String)
    assert classes.to_list() == [
        "TDX_SUCCESS", "TDX_OPERAND_BUSY", "TDX_TLB_TRACKING_NOT_DONE", "other"]
    assert all(v & codes.OPERAND_MASK == 0 for v in codes.STATUS_CLASS_NAMES)
    assert codes.LEAF_NAMES[38] == "TDH.MEM.TRACK"
    assert codes.OPERAND_NAMES[0xA9] == "TD_EPOCH"
    assert codes.EXIT_REASON_NAMES[codes.EXIT_REASON_INVALID] == "INVALID(-1)"


@given(st.text(max_size=40))
def test_parsers_fail_only_with_their_own_error(text: str) -> None:
    for parse in (codes.parse_status, codes.parse_leaf):
        try:
            value = parse(text)
        except codes.UnknownCodeError:
            continue
        assert 0 <= value < 1 << 64
