"""zap_scope: zapped SPTEs per reason and root, refaults, unexpected private zaps, bugged VMs."""

from __future__ import annotations

from typing import Any

import polars as pl
from polars.testing import assert_frame_equal

from tdxtrace.codes import (
    FROZEN_SPTE,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_MEMORY_FAULT,
    SHADOW_NONPRESENT_VALUE,
    Leaf,
    OperandId,
    Status,
)
from tdxtrace.events import Flow, Kind, Phase, RootKind, ZapReason, ZapScope
from tdxtrace.testing import make_trace, run_analyzer
from tdxtrace_plugins.zap_scope import (
    BUGGED,
    BY_REASON_ROOT,
    REFAULTS,
    UNEXPECTED,
    ZAPS,
    ZapScopeAnalyzer,
    register_analyzers,
)

NONPRESENT = SHADOW_NONPRESENT_VALUE
SHARED = 1 << 47
MIRROR, DIRECT = RootKind.MIRROR, RootKind.DIRECT


def present(gfn: int, large: bool = False) -> int:
    return ((gfn + 0x200000) << 12) | (0x87 if large else 0x07)


class Rows:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.ts = 0
        self.corr = 100

    def add(self, kind: Kind, **cols: Any) -> int:
        self.ts += 100
        self.rows.append({"kind": kind, "ts_ns": self.ts, "flow": 0, "sub": 0, **cols})
        return self.ts

    def zap(self, reason: ZapReason, gfn: int, pages: int = 1, td: int = 0,
            scope: ZapScope = ZapScope.RANGE_LEAFS, flow: Flow = Flow.ZAP) -> int:
        self.corr += 1
        self.add(Kind.ZAP, flow=flow, sub=reason, corr=self.corr, td=td, gpa=gfn << 12,
                 arg0=pages, arg1=scope)
        return self.corr

    def done(self, corr: int, reason: ZapReason, td: int = 0, flow: Flow = Flow.ZAP,
             sptes: int | None = None, private: int | None = None) -> int:
        return self.add(Kind.ZAP_DONE, flow=flow, sub=reason, corr=corr, td=td, arg0=sptes,
                        arg1=private)

    def spte(self, corr: int | None, gfn: int, old: int, new: int, root: RootKind = MIRROR,
             level: int = 0, td: int = 0, flow: Flow = Flow.ZAP) -> int:
        return self.add(Kind.SPTE_CHANGED, flow=flow, sub=root, corr=corr, td=td,
                        gpa=gfn << 12 | (SHARED if root == DIRECT else 0), level=level,
                        arg0=old, arg1=new, arg2=1 if root == MIRROR else 2)

    def zapped(self, corr: int | None, gfn: int, root: RootKind = MIRROR, level: int = 0,
               large: bool = False, td: int = 0, flow: Flow = Flow.ZAP) -> int:
        return self.spte(corr, gfn, present(gfn, large), NONPRESENT, root, level, td, flow)

    def fault(self, gfn: int, td: int = 0, shared: bool = False) -> int:
        self.corr += 1
        return self.add(Kind.PAGE_FAULT, flow=Flow.FAULT, corr=self.corr, td=td, vcpu=0,
                        gpa=gfn << 12 | (SHARED if shared else 0), rip=0x1000)

    def analyze(self) -> Any:
        return run_analyzer(ZapScopeAnalyzer(), make_trace(self.rows))


def frame(rows: list[tuple[Any, ...]], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=schema, orient="row")


def test_sptes_zapped_per_reason_and_root() -> None:
    rows = Rows()
    conversion = rows.zap(ZapReason.CONVERSION, 5, pages=2, scope=ZapScope.ALL_ROOTS)
    rows.zapped(conversion, 5)
    rows.zapped(conversion, 6)
    rows.zapped(conversion, 5, root=DIRECT)
    end = rows.done(conversion, ZapReason.CONVERSION)
    truncation = rows.zap(ZapReason.TRUNCATION, 0x200, pages=512)
    rows.zapped(truncation, 0x200, level=1)  # a 2M non-leaf: not a leaf
    rows.zapped(truncation, 0x400, level=1, large=True)  # a 2M leaf
    rows.done(truncation, ZapReason.TRUNCATION)
    # A fault freezing, failing and restoring an SPTE, then installing it: no zap.
    rows.spte(7, 9, NONPRESENT, FROZEN_SPTE, flow=Flow.FAULT)
    rows.spte(7, 9, FROZEN_SPTE, NONPRESENT, flow=Flow.FAULT)
    rows.spte(7, 9, NONPRESENT, present(9), flow=Flow.FAULT)
    rows.spte(truncation, 0x400, present(0x400), FROZEN_SPTE)  # frozen, not (yet) zapped
    rows.zapped(None, 11)  # outside any zap operation
    result = rows.analyze()
    assert_frame_equal(result.tables["by_reason_root"], frame([
        ("conversion", "direct", 1, 1, 0),
        ("conversion", "mirror", 2, 2, 2),
        ("truncation", "mirror", 2, 1, 1),
        ("unattributed", "mirror", 1, 1, 1),
    ], BY_REASON_ROOT))
    assert_frame_equal(result.tables["zaps"], frame([
        (conversion, 0, "conversion", "all_roots", 5 << 12, 2, 3, 2, 0, 100, end - 100),
        (truncation, 0, "truncation", "range_leafs", 0x200 << 12, 512, 2, 1, 0, 600, 300),
    ], ZAPS))
    assert result.metrics["sptes_zapped"] == 6
    assert result.metrics["zaps"] == 2


def test_batched_pages_are_counted_from_zap_done() -> None:
    rows = Rows()
    # Teardown: one corr, several ZAP .. ZAP_DONE pairs; only the first pages have rows.
    teardown = rows.zap(ZapReason.TEARDOWN, 0x100, pages=3, flow=Flow.TEARDOWN)
    rows.zapped(teardown, 0x100, flow=Flow.TEARDOWN)
    rows.zapped(teardown, 0x101, flow=Flow.TEARDOWN)
    rows.done(teardown, ZapReason.TEARDOWN, flow=Flow.TEARDOWN, sptes=3, private=3)
    rows.add(Kind.ZAP, flow=Flow.TEARDOWN, sub=ZapReason.TEARDOWN, corr=teardown, td=0,
             gpa=0x200 << 12, arg0=512, arg1=ZapScope.RANGE_LEAFS)
    rows.done(teardown, ZapReason.TEARDOWN, flow=Flow.TEARDOWN, sptes=512, private=512)
    notifier = rows.zap(ZapReason.NOTIFIER, 5, pages=4)
    rows.zapped(notifier, 5, root=DIRECT)
    rows.done(notifier, ZapReason.NOTIFIER, sptes=4, private=0)
    result = rows.analyze()
    assert_frame_equal(result.tables["by_reason_root"], frame([
        ("notifier", "direct", 1, 1, 0),
        ("notifier", "unlisted", 3, 0, 0),
        ("teardown", "mirror", 515, 515, 515),
    ], BY_REASON_ROOT))
    zaps = result.tables["zaps"].select("corr", "pages", "sptes_zapped", "private_leaves",
                                        "batched")
    assert zaps.rows() == [(teardown, 3, 3, 3, 1), (teardown, 512, 512, 512, 512),
                           (notifier, 4, 4, 0, 3)]
    assert result.metrics["sptes_zapped"] == 519
    assert result.metrics["zaps"] == 3


def test_interleaved_zaps_are_attributed_by_corr() -> None:
    rows = Rows()
    first = rows.zap(ZapReason.CONVERSION, 1)
    second = rows.zap(ZapReason.NOTIFIER, 2)
    rows.zapped(first, 1, root=DIRECT)
    rows.zapped(second, 2, root=DIRECT)
    rows.done(first, ZapReason.CONVERSION)
    rows.done(second, ZapReason.NOTIFIER)
    table = rows.analyze().tables["zaps"]
    assert table.select("reason", "sptes_zapped").rows() == [("conversion", 1), ("notifier", 1)]


def test_private_leaf_zapped_by_memslot_is_flagged() -> None:
    rows = Rows()
    memslot = rows.zap(ZapReason.MEMSLOT, 5, scope=ZapScope.EVERYTHING)
    flagged = rows.zapped(memslot, 5)
    rows.zapped(memslot, 6, root=DIRECT)  # shared: fine
    rows.zapped(memslot, 0x200, level=1)  # non-leaf: no page lost
    rows.done(memslot, ZapReason.MEMSLOT)
    notifier = rows.zap(ZapReason.NOTIFIER, 8, td=1)
    flagged_td1 = rows.zapped(notifier, 8, td=1)
    rows.done(notifier, ZapReason.NOTIFIER, td=1)
    truncation = rows.zap(ZapReason.TRUNCATION, 9)
    rows.zapped(truncation, 9)  # truncation may drop private pages
    rows.done(truncation, ZapReason.TRUNCATION)
    rows.add(Kind.PHASE, flow=Flow.TEARDOWN, sub=Phase.TEARDOWN, td=0, corr=1)
    late = rows.zap(ZapReason.MEMSLOT, 10)
    rows.zapped(late, 10)  # TD 0 is being torn down
    rows.done(late, ZapReason.MEMSLOT)
    result = rows.analyze()
    assert_frame_equal(result.tables["unexpected_private_zaps"], frame([
        (0, 5 << 12, "memslot", flagged, memslot),
        (1, 8 << 12, "notifier", flagged_td1, notifier),
    ], UNEXPECTED))
    assert result.metrics["private_zaps_unexpected"] == 2


def test_memslot_zap_in_teardown_flow_is_not_flagged() -> None:
    rows = Rows()
    corr = rows.zap(ZapReason.MEMSLOT, 5, flow=Flow.TEARDOWN)
    rows.zapped(corr, 5, flow=Flow.TEARDOWN)
    rows.done(corr, ZapReason.MEMSLOT, flow=Flow.TEARDOWN)
    assert rows.analyze().metrics["private_zaps_unexpected"] == 0


def test_vm_bugged_table() -> None:
    rows = Rows()
    corr = rows.zap(ZapReason.CONVERSION, 5)
    busy = int(Status.OPERAND_BUSY) | int(OperandId.SEPT_TREE)
    bugged_at = rows.add(Kind.VM_BUGGED, flow=Flow.ZAP, corr=corr, td=0,
                         leaf=Leaf.TDH_MEM_PAGE_REMOVE, status=busy)
    other_at = rows.add(Kind.VM_BUGGED, flow=Flow.FAULT, corr=7, td=1,
                        leaf=Leaf.TDH_MEM_PAGE_AUG, status=int(Status.EPT_WALK_FAILED))
    result = rows.analyze()
    assert_frame_equal(result.tables["bugged"], frame([
        (0, bugged_at, "TDH.MEM.PAGE.REMOVE", "TDX_OPERAND_BUSY|SEPT_TREE", corr, "zap"),
        (1, other_at, "TDH.MEM.PAGE.AUG", "TDX_EPT_WALK_FAILED", 7, "fault"),
    ], BUGGED))
    assert result.metrics["vms_bugged"] == 2


def test_empty_trace() -> None:
    result = run_analyzer(ZapScopeAnalyzer(), make_trace([]))
    assert result.metrics == {"sptes_zapped": 0, "zaps": 0, "refaults": 0,
                              "private_zaps_unexpected": 0, "vms_bugged": 0,
                              "memory_fault_exits": 0}
    expected = {"by_reason_root": BY_REASON_ROOT, "zaps": ZAPS, "refaults": REFAULTS,
                "unexpected_private_zaps": UNEXPECTED, "bugged": BUGGED}
    for name, schema in expected.items():
        assert_frame_equal(result.tables[name], pl.DataFrame(schema=schema))


def test_registered_through_the_hook() -> None:
    (analyzer,) = register_analyzers()
    assert analyzer.name == "zap_scope"
    assert analyzer.thresholds["private_zaps_unexpected"] == (1, 1)


def test_memory_fault_exits_count_only_that_exit_reason() -> None:
    # A MapGPA chunk is a USERSPACE_EXIT too (KVM_EXIT_HYPERCALL): not a memory fault.
    rows = [
        {"kind": Kind.USERSPACE_EXIT, "ts_ns": 10, "td": 0, "vcpu": 0, "flow": Flow.FAULT,
         "exit_reason": KVM_EXIT_MEMORY_FAULT, "gpa": 0x1000, "arg0": 1, "arg1": 8},
        {"kind": Kind.USERSPACE_EXIT, "ts_ns": 20, "td": 0, "vcpu": 1, "flow": Flow.MAPGPA,
         "exit_reason": KVM_EXIT_HYPERCALL, "gpa": 0x200000, "arg0": 512, "arg1": 0},
        {"kind": Kind.USERSPACE_EXIT, "ts_ns": 30, "td": 1, "vcpu": 0, "flow": Flow.FAULT,
         "exit_reason": KVM_EXIT_MEMORY_FAULT, "gpa": 0x3000, "arg0": 1, "arg1": 8},
    ]
    result = run_analyzer(ZapScopeAnalyzer(), make_trace(rows))
    assert result.metrics["memory_fault_exits"] == 2
