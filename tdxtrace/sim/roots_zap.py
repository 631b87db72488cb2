"""One zap over a TD's roots, as wide as the ``zap_scope`` policy makes it (see :mod:`.roots`).

Rows, all with the zap's corr and flow ZAP: ZAP(sub = reason, gpa, arg0 = pages, arg1 =
scope); under ``everything`` ROOT(INVALIDATED) and KICK(ROOT_RELOAD) first; SPTE_CHANGED per
zapped SPTE (direct root: no SEAMCALL; mirror root: each private leaf then goes through
BLOCK/TRACK/REMOVE/WBINVD via :meth:`ZapPath.remove_leaf`, with a T_PRIVATE_ZAP_UNEXPECTED
truth row when the reason is neither a conversion nor a truncation); ZAP_DONE(arg0 = SPTEs
zapped, arg1 = private leaves zapped). Runs under mmu_lock held for write, like every zap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tdxtrace.events import Flow, KickReason, Kind, RootKind, ZapReason, ZapScope
from tdxtrace.sim.mmu import NONPRESENT, present_spte
from tdxtrace.sim.roots_guest import SHARED_BIT, SHARED_GFN

if TYPE_CHECKING:
    from tdxtrace.sim.kvm_state import KvmTd
    from tdxtrace.sim.roots import DirectRoot, Roots

ZAP_FLOW = int(Flow.ZAP)
DIRECT = int(RootKind.DIRECT)
MIRROR = int(RootKind.MIRROR)
# Private memory changes legitimately only through these (tdx-reference.md §4(b)).
EXPECTED_PRIVATE = (ZapReason.CONVERSION, ZapReason.TRUNCATION, ZapReason.TEARDOWN)


def _in_range(members: set[int], first: int, pages: int) -> list[int]:
    """Sorted members of ``[first, first + pages)``, walking whichever side is smaller."""
    end = first + pages
    if pages > len(members):
        return sorted(g for g in members if first <= g < end)
    return [g for g in range(first, end) if g in members]


class RootZap:
    def __init__(self, roots: Roots, td: KvmTd, reason: ZapReason, first_gfn: int, pages: int,
                 scope: ZapScope, then: Callable[[], None] | None, lp: int = -1) -> None:
        self.roots = roots
        self.lp = td.thread_lp(lp)
        self.log = roots.log
        self.td = td
        self.reason = reason
        self.first = first_gfn
        self.pages = pages
        self.scope = scope
        self.then = then
        self.corr = self.log.new_corr()
        self.zapped = 0  # SPTEs, both roots
        self.private = 0  # private leaves
        self.valid_leaves = 0  # leaves zapped from a root that stays valid: a TLB flush

    def begin(self) -> None:
        self.log.count("zaps")
        self.log.emit(Kind.ZAP, sub=self.reason, flow=ZAP_FLOW, corr=self.corr,
                      td=self.td.index, lp=self.lp, gpa=self.first << 12,
                      arg0=self.pages, arg1=self.scope)
        self.td.mmu.acquire_write(self._locked)

    def _locked(self) -> None:
        self.td.zap_lp = self.lp  # the mirror's per-page calls (ZapPath.remove_leaf) run here
        if self.scope == ZapScope.EVERYTHING:
            self.roots.invalidate(self.td, self.corr, self._invalidated)
        else:
            self._zap_direct(self.roots.live_roots(self.td), everything=False)

    def _invalidated(self, old: DirectRoot | None) -> None:
        self._zap_direct(self.roots.live_roots(self.td), everything=True)
        if old is not None:  # its SPTEs are gone: drop the root's own reference
            self.roots.put(self.td, old, self.corr)

    def _zap_direct(self, roots: list[DirectRoot], everything: bool) -> None:
        td, log, corr = self.td, self.log, self.corr
        emit = log.emit
        count = 0
        for root in roots:
            leaves = sorted(root.leaves) if everything else _in_range(root.leaves, self.first,
                                                                         self.pages)
            for gfn in leaves:
                root.leaves.discard(gfn)
                if not everything:  # else counted as zapped when the root was invalidated
                    td.zapped_gfns.add(gfn | SHARED_GFN)
                    self.valid_leaves += 1
                emit(Kind.SPTE_CHANGED, sub=DIRECT, flow=ZAP_FLOW, corr=corr, td=td.index,
                     gpa=(gfn << 12) | SHARED_BIT, level=0, arg0=present_spte(gfn, 0),
                     arg1=NONPRESENT, arg2=root.root_id)
            count += len(leaves)
            if everything:
                # Then the page tables, lowest level first (a post-order walk of the tree).
                for level, index in sorted(root.nonleaf):
                    gpa = index << (9 * level + 12)
                    emit(Kind.SPTE_CHANGED, sub=DIRECT, flow=ZAP_FLOW, corr=corr, td=td.index,
                         gpa=gpa, level=level,
                         arg0=present_spte((gpa ^ SHARED_BIT) >> 12, level),
                         arg1=NONPRESENT, arg2=root.root_id)
                count += len(root.nonleaf)
                root.nonleaf.clear()
        self.zapped += count
        if count:
            log.count("sptes_zapped", count)
        cost = self.roots.world.costs.base("direct_zap") * count
        self.roots.sim.after(cost, self._zap_mirror)

    def _zap_mirror(self) -> None:
        if self.scope == ZapScope.RANGE_LEAFS:
            self._finish()
            return
        leaves = self.td.mirror.leaves
        gfns = sorted(leaves) if self.scope == ZapScope.EVERYTHING else _in_range(
            leaves, self.first, self.pages)
        self._next_private(gfns, 0)

    def _next_private(self, gfns: list[int], i: int) -> None:
        td, log = self.td, self.log
        leaves = td.mirror.leaves
        while i < len(gfns) and gfns[i] not in leaves:
            i += 1
        # No td.bugged check: KVM's zap walks on after a TDX_BUG_ON (the S-EPT hooks return
        # nothing), as ZapPath does (sim/zap.py).
        if i >= len(gfns):
            self._finish()
            return
        gfn = gfns[i]
        leaves.discard(gfn)
        td.zapped_gfns.add(gfn)
        self.zapped += 1
        self.private += 1
        self.valid_leaves += 1  # the mirror root is never invalidated
        log.count("sptes_zapped")
        log.emit(Kind.SPTE_CHANGED, sub=MIRROR, flow=ZAP_FLOW, corr=self.corr, td=td.index,
                 gpa=gfn << 12, level=0, arg0=present_spte(gfn, 0), arg1=NONPRESENT,
                 arg2=td.mirror.root_id)
        if self.reason not in EXPECTED_PRIVATE:
            # The guest loses a page it accepted: a KVM bug for a TD.
            log.count("private_zaps_unexpected")
            log.emit(Kind.T_PRIVATE_ZAP_UNEXPECTED, sub=self.reason, flow=ZAP_FLOW, corr=self.corr,
                     td=td.index, gpa=gfn << 12)
        self.roots.world.zap.remove_leaf(td, gfn, self.corr, ZAP_FLOW,
                                         lambda: self._next_private(gfns, i + 1))

    def _finish(self) -> None:
        """kvm_flush_remote_tlbs() if a valid root lost a leaf (zapping an invalid root's
        SPTEs needs none), then the end of the invalidation."""
        if self.valid_leaves:
            self.roots.kvm.kick_all(self.td, KickReason.TLB_FLUSH, self.corr, ZAP_FLOW,
                                    self.lp, self._done)
        else:
            self._done()

    def _done(self) -> None:
        self.td.zap_lp = self.td.vmm_lp
        self.td.end_zap()
        self.log.emit(Kind.ZAP_DONE, sub=self.reason, flow=ZAP_FLOW, corr=self.corr,
                      td=self.td.index, lp=self.lp, arg0=self.zapped, arg1=self.private)
        if self.then is not None:
            self.then()
