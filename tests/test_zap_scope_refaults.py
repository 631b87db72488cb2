"""zap_scope refaults: the next touch of a zapped page, and when a fast zap took it."""

from __future__ import annotations

from polars.testing import assert_frame_equal
from test_zap_scope import DIRECT, NONPRESENT, REFAULTS, Rows, frame, present

from tdxtrace.events import Flow, Kind, RootEvent, ZapReason, ZapScope


def test_refault_after_zap() -> None:
    rows = Rows()
    rows.fault(5)  # before any zap: not a refault
    rows.fault(7)
    corr = rows.zap(ZapReason.CONVERSION, 5, pages=4)
    zapped_5 = rows.zapped(corr, 5)
    rows.zapped(corr, 5, root=DIRECT)  # the same page in two roots: one zapped page
    rows.zapped(corr, 6)  # never touched again
    rows.zapped(corr, 7)
    zapped_8 = rows.zapped(corr, 8)
    rows.done(corr, ZapReason.CONVERSION)
    again = rows.zap(ZapReason.TRUNCATION, 7)
    zapped_7 = rows.zapped(again, 7)  # zapped twice before the access: counts once
    rows.done(again, ZapReason.TRUNCATION)
    refault_5 = rows.fault(5, shared=True)  # the shared alias of the converted page
    rows.fault(5)  # a second access: still one refault
    refault_7 = rows.fault(7)
    # An install with no fault (a pre-fault, or a fault raised before the zap) is no touch.
    rows.spte(None, 8, NONPRESENT, present(8), flow=Flow.FAULT)
    rows.fault(9, td=1)  # another TD
    result = rows.analyze()
    assert zapped_8 and result.metrics["refaults"] == 2
    assert_frame_equal(result.tables["refaults"], frame([
        ("conversion", 1, refault_5 - zapped_5),
        ("truncation", 1, refault_7 - zapped_7),
    ], REFAULTS))


def test_a_fast_zap_takes_the_direct_roots_pages_when_it_invalidates_the_root() -> None:
    # kvm_mmu_zap_all_fast: the root is invalidated and the vCPUs reload a new one; a vCPU
    # that touches a page then faults before the old root's SPTEs are torn down, and KVM
    # finishes that fault (the install) after the zap.
    rows = Rows()
    corr = rows.zap(ZapReason.NOTIFIER, 0, pages=1 << 20, scope=ZapScope.EVERYTHING)
    invalidated = rows.add(Kind.ROOT, flow=Flow.ZAP, sub=RootEvent.INVALIDATED, corr=corr,
                           td=0, arg0=DIRECT, arg2=2)
    refault = rows.fault(5, shared=True)
    rows.zapped(corr, 5, root=DIRECT)
    rows.zapped(corr, 6, root=DIRECT)  # never touched again
    private = rows.zapped(corr, 7)  # the mirror root is not invalidated: zapped at its row
    rows.done(corr, ZapReason.NOTIFIER)
    rows.spte(None, 5, NONPRESENT, present(5), root=DIRECT, flow=Flow.FAULT)
    refault_7 = rows.fault(7)
    result = rows.analyze()
    assert result.metrics["refaults"] == 2
    delays = (refault - invalidated, refault_7 - private)  # multiples of 100: exact median
    assert_frame_equal(result.tables["refaults"], frame([
        ("notifier", 2, sum(delays) // 2),
    ], REFAULTS))


def test_an_invalidation_dates_only_the_zap_it_belongs_to() -> None:
    # Two zaps under one corr (a producer may reuse it, as teardown does): only the second
    # invalidates the root, so only its direct pages are dated at the invalidation.
    rows = Rows()
    corr = rows.zap(ZapReason.MEMSLOT, 5, pages=1)
    first = rows.zapped(corr, 5, root=DIRECT)
    rows.done(corr, ZapReason.MEMSLOT)
    rows.add(Kind.ZAP, flow=Flow.ZAP, sub=ZapReason.NOTIFIER, corr=corr, td=0, gpa=0,
             arg0=1 << 20, arg1=ZapScope.EVERYTHING)
    invalidated = rows.add(Kind.ROOT, flow=Flow.ZAP, sub=RootEvent.INVALIDATED, corr=corr,
                           td=0, arg0=DIRECT, arg2=2)
    rows.zapped(corr, 6, root=DIRECT)
    rows.done(corr, ZapReason.NOTIFIER)
    refault_5, refault_6 = rows.fault(5, shared=True), rows.fault(6, shared=True)
    result = rows.analyze()
    assert_frame_equal(result.tables["refaults"], frame([
        ("memslot", 1, refault_5 - first),
        ("notifier", 1, refault_6 - invalidated),
    ], REFAULTS))
