"""KVM's zap path for private leaves (tdx-reference.md §4(b)).

Under mmu_lock write, for each present private 4K leaf: the mirror SPTE goes non-present, then
``tdx_sept_remove_leaf_spte()``: TDH.MEM.RANGE.BLOCK, ``tdx_track()`` (TDH.MEM.TRACK, then kick
every vCPU out of guest mode and wait), TDH.MEM.PAGE.REMOVE, TDH.PHYMEM.PAGE.WBINVD. BLOCK,
TRACK and REMOVE go through ``tdh_do_no_vcpus()`` as the ``zap_busy`` policy says:

* ``kick_retry_once`` (mainline since the 2025 cleanup, [CLEANUP-v3]): on OPERAND_BUSY set
  wait_for_sept_zap, kick every vCPU, retry exactly once; a second failure is a KVM bug;
* ``retry_loop``: the dropped "[HACK]" of the 2024 thread ([YAN-0913]): retry up to
  SEAMCALL_RETRY_MAX (16) times without kicking; vCPUs keep entering, so it can livelock;
* ``seamcall_spinlock``: the 2022 design (seed 002): a per-TD spinlock around every TDH.MEM.*
  call and no retry at all; the spinlock does not cover VP.ENTER, so a BUSY from it is a bug
  (on the fault path too: see sim/fault.py).

Any status KVM does not expect ends in KVM_BUG_ON (``TDX_BUG_ON``), after which KVM returns
from the S-EPT hook; the hook returns nothing, so the TDP MMU goes on with the next leaf. A
failed BLOCK or REMOVE leaves the page mapped in the S-EPT, the TD's for good (leaked: truth
``pages_leaked``, and ``teardown_pages_leaked`` in a teardown); a failed TRACK does not return
(``tdx_track()`` is void), so the kick and PAGE.REMOVE follow, and the REMOVE fails as the
epoch never moved. A failed PAGE.WBINVD bugs the VM too, but the page has left the TD by then
and is not counted. Every zap therefore ends, with its ZAP_DONE and its caller's continuation,
bugged VM or not: a teardown goes on to release the HKID (§4(c)).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from tdxtrace.codes import Leaf, is_busy
from tdxtrace.events import Flow, KickReason, Kind, RootKind, ZapReason, ZapScope
from tdxtrace.sim.mmu import NONPRESENT, present_spte
from tdxtrace.sim.module import SUCCESS

if TYPE_CHECKING:
    from tdxtrace.sim.kvm import Kvm, Preset
    from tdxtrace.sim.kvm_state import KvmTd
    from tdxtrace.sim.world import World

BLOCK = int(Leaf.TDH_MEM_RANGE_BLOCK)
TRACK = int(Leaf.TDH_MEM_TRACK)
REMOVE = int(Leaf.TDH_MEM_PAGE_REMOVE)
WBINVD = int(Leaf.TDH_PHYMEM_PAGE_WBINVD)
RETRY_LOOP_MAX = 16  # SEAMCALL_RETRY_MAX of the dropped retry hack

Done = Callable[[], None]
# Where resume_leaf() can pick a page up: the index of each call in teardown_pages.ZAP_ORDER.
STEP_BLOCK, STEP_TRACK, STEP_REMOVE, STEP_WBINVD = 0, 1, 3, 4


def _no_call(now: int, until: int, me: tuple[int, int, int]) -> int:
    """PAGE.WBINVD in the module model: nothing to check, nothing to change."""
    return SUCCESS


# Enum members as module globals: a class attribute lookup on an Enum costs ~70 ns,
# which the hot paths below pay many times per event.
_KICKREASON_NO_VCPUS_RETRY = KickReason.NO_VCPUS_RETRY
_KICKREASON_TRACK = KickReason.TRACK
_KICKREASON_TLB_FLUSH = KickReason.TLB_FLUSH
_ZAPREASON_TEARDOWN = ZapReason.TEARDOWN
_ZAPSCOPE_EVERYTHING = ZapScope.EVERYTHING
_ZAPSCOPE_RANGE = ZapScope.RANGE_LEAFS
_KIND_SPTE_CHANGED = Kind.SPTE_CHANGED
_KIND_ZAP = Kind.ZAP
_KIND_ZAP_DONE = Kind.ZAP_DONE
_ROOTKIND_MIRROR = RootKind.MIRROR
_FLOW_TEARDOWN = Flow.TEARDOWN


class ZapPath:
    def __init__(self, world: World, kvm: Kvm) -> None:
        self.world = world
        self.kvm = kvm
        self.sim = world.sim
        self.log = world.log
        self.module = world.module
        self.policy = world.policy.zap_busy
        # tdp_mmu_iter_cond_resched(): on a preemptible host rwlock_needbreak() makes a zap
        # yield mmu_lock to the CPUs waiting for it, between leaves; elsewhere it does not.
        self.yields = world.scenario.kvm.preempt_model == "full"

    def zap(self, td: KvmTd, gfns: list[int], reason: ZapReason, flow: int,
            then: Done | None = None, corr: int | None = None,
            locked: Done | None = None, lp: int = -1) -> None:
        """Zap the private leaves of ``gfns`` (kvm_unmap_gfn_range on the mirror root).

        ``corr``: the operation this zap is part of (a teardown); by default a new one.
        ``locked``: run once mmu_lock is held for write, before the first page: where a
        conversion's new attribute takes effect (KVM changes it inside the invalidation, so
        a fault that already holds the lock for read finishes first, and one that takes it
        later sees the new attribute). ``lp``: the thread's LP, -1 for the VMM's.
        """
        corr = self.log.new_corr() if corr is None else corr
        self.log.count("zaps")
        start = gfns[0] << 12 if gfns else 0
        # What this zap covers (the zap_scope policy is for memslot and notifier zaps only):
        # a conversion or truncation the range's private leaves, a teardown the whole mirror.
        scope = _ZAPSCOPE_EVERYTHING if reason == _ZAPREASON_TEARDOWN else _ZAPSCOPE_RANGE
        on = td.thread_lp(lp)
        self.log.emit(_KIND_ZAP, sub=reason, flow=flow, corr=corr, td=td.index, lp=on,
                      gpa=start, arg0=len(gfns), arg1=scope)
        # zapped: in all; unflushed: since the last remote TLB flush; held: since mmu_lock was
        # last taken (a yield needs progress first, as KVM's iterator does).
        state = {"zapped": 0, "unflushed": 0, "held": 0}
        invalidated = (gfns[0], gfns[-1] + 1) if gfns else (0, 0)

        def done() -> None:
            td.zap_lp = td.vmm_lp
            td.invalidating.remove(invalidated)
            td.end_zap()
            td.invalidation_ended()  # the faults spinning on it go on (their next turn)
            self.log.emit(_KIND_ZAP_DONE, sub=reason, flow=flow, corr=corr, td=td.index,
                          lp=on, arg0=state["zapped"], arg1=state["zapped"])
            if then is not None:
                then()
            td.zap_ended()  # last: a teardown waiting for it starts now

        def finish() -> None:
            # Leaves left a valid root: kvm_flush_remote_tlbs() before mmu_lock is dropped.
            # Not at teardown: kvm_tdp_mmu_zap_all() skips it, as KVM_RUN is unreachable then
            # and no vCPU would service the request.
            if state["unflushed"] and reason != _ZAPREASON_TEARDOWN:
                self.kvm.kick_all(td, _KICKREASON_TLB_FLUSH, corr, flow, on, done)
            else:
                done()

        def yield_lock(i: int) -> None:
            """cond_resched_rwlock_write(): flush what was zapped, let the waiters have
            mmu_lock, take it again (behind them) and go on at page ``i``."""
            def drop() -> None:
                state["unflushed"] = state["held"] = 0
                td.mmu.release_write()
                td.mmu.acquire_write(partial(resume, i))

            if state["unflushed"]:
                self.kvm.kick_all(td, _KICKREASON_TLB_FLUSH, corr, flow, on, drop)
            else:
                drop()

        def resume(i: int) -> None:
            td.zap_lp = on  # another zap may have run in the gap
            self.log.count("zap_yields")
            next_page(i)

        def next_page(i: int) -> None:
            while i < len(gfns) and gfns[i] not in td.mirror.leaves:
                i += 1
            # No td.bugged check: KVM's zap walks on after a TDX_BUG_ON (see the module doc).
            if i >= len(gfns):
                finish()
                return
            if self.yields and state["held"] and td.mmu.contended():
                yield_lock(i)
                return
            gfn = gfns[i]
            td.mirror.leaves.discard(gfn)
            td.zapped_gfns.add(gfn)
            state["zapped"] += 1
            state["unflushed"] += 1
            state["held"] += 1
            self.log.counters["sptes_zapped"] += 1  # EventLog.count() inlined: per page
            # Positional (EventLog.row, in row order): one per zapped page.
            self.log.row(0, _KIND_SPTE_CHANGED, flow, _ROOTKIND_MIRROR, corr, td.index, None,
                         None, None, None, None, gfn << 12, 0, None, present_spte(gfn, 0),
                         NONPRESENT, td.mirror.root_id)
            self.remove_leaf(td, gfn, corr, flow, partial(next_page, i + 1))

        def begin() -> None:
            td.zap_lp = on
            td.invalidating.append(invalidated)  # kvm_mmu_invalidate_begin()
            if locked is not None:
                locked()
            next_page(0)

        td.zap_started()
        td.mmu.acquire_write(begin)

    def remove_leaf(self, td: KvmTd, gfn: int, corr: int, flow: int, then: Done) -> None:
        """tdx_sept_remove_leaf_spte(): BLOCK -> TRACK + kick -> REMOVE -> PAGE.WBINVD."""
        self.resume_leaf(td, gfn, corr, flow, then, STEP_BLOCK, None)

    def resume_leaf(self, td: KvmTd, gfn: int, corr: int, flow: int, then: Done, step: int,
                    preset: Preset | None) -> None:
        """remove_leaf() from ``step`` on; ``preset``: that call already ran, with this outcome.

        A batched teardown row hands a page over here at the call that failed, so that call,
        KVM's answer to it (kick and retry, or TDX_BUG_ON) and the rest of the page get rows
        of their own, with the same policy as every other zapped page.
        """
        # Steps chained with partial, not closures and lambdas: one Python frame less at each
        # of the ~6 steps of every zapped page (a third of the rows of a 1M-event fault storm).
        module, mtd = self.module, td.module
        lp = td.zap_lp
        gpa = gfn << 12
        leaked = partial(self._leaked, flow, then)
        wbinvd = partial(self._check, td, WBINVD, corr, flow, then, then)
        if step == STEP_WBINVD:
            self.kvm.seamcall(td, WBINVD, lp, corr, flow, _no_call, wbinvd, arg0=gfn,
                              preset=preset)
            return
        after_remove = partial(self.kvm.seamcall, td, WBINVD, lp, corr, flow, _no_call,
                               wbinvd, arg0=gfn)
        remove = partial(module.page_remove, mtd, gfn)
        if step == STEP_REMOVE:
            self.no_vcpus(td, REMOVE, remove, corr, flow, after_remove, leaked, gpa=gpa,
                          preset=preset)
            return
        after_track = partial(self.no_vcpus, td, REMOVE, remove, corr, flow, after_remove,
                              leaked, gpa=gpa)
        if step == STEP_TRACK:
            self.track(td, corr, flow, after_track, preset=preset)
            return
        assert step == STEP_BLOCK, step
        self.no_vcpus(td, BLOCK, partial(module.range_block, mtd, gfn), corr, flow,
                      partial(self.track, td, corr, flow, after_track), leaked, gpa=gpa,
                      preset=preset)

    def track(self, td: KvmTd, corr: int, flow: int, then: Done, *,
              preset: Preset | None = None) -> None:
        """tdx_track(): TRACK, then kick so vCPUs of the old epoch leave the guest.

        tdx_track() returns nothing: after a TDX_BUG_ON on TRACK the kick (and the caller's
        PAGE.REMOVE) still follow, hence ``kick`` on both outcomes.
        """
        kick = partial(self.kvm.kick_all, td, _KICKREASON_TRACK, corr, flow, td.zap_lp, then)
        self.no_vcpus(td, TRACK, partial(self.module.track, td.module), corr, flow, kick, kick,
                      preset=preset)

    def no_vcpus(self, td: KvmTd, leaf: int, call: Callable[[int, int, tuple[int, int, int]], int],
                 corr: int, flow: int, then: Done, bail: Done, *, gpa: int | None = None,
                 attempt: int = 0, preset: Preset | None = None) -> None:
        """tdh_do_no_vcpus(): issue; on OPERAND_BUSY act as the zap_busy policy says.

        ``then`` on success; ``bail`` after a TDX_BUG_ON, where KVM's code carries on.
        ``preset``: the outcome of the first attempt, already run (see resume_leaf()).
        """
        level = 0 if gpa is not None else None
        lp = td.zap_lp

        def result(status: int) -> None:
            # Any other status bugs the VM, GPA_RANGE_ALREADY_BLOCKED included: KVM's
            # TDX_BUG_ON on BLOCK/TRACK/REMOVE (tdx-reference.md §4(b) step 6); a range found
            # blocked means an earlier zap went wrong, which must not be hidden.
            if status == SUCCESS:
                if attempt and self.policy == "kick_retry_once":
                    td.wait_for_sept_zap = False
                then()
                return
            if not is_busy(status) or self.policy == "seamcall_spinlock":
                self._bug(td, leaf, status, corr, flow, bail)
                return
            if self.policy == "kick_retry_once":
                if attempt:
                    self._bug(td, leaf, status, corr, flow, bail)
                    return
                td.wait_for_sept_zap = True
                self.kvm.kick_all(td, _KICKREASON_NO_VCPUS_RETRY, corr, flow, lp,
                                  lambda: self.no_vcpus(td, leaf, call, corr, flow, then, bail,
                                                        gpa=gpa, attempt=1))
                return
            if attempt + 1 >= RETRY_LOOP_MAX:
                self._bug(td, leaf, status, corr, flow, bail)
                return
            self.sim.after(self.world.costs.step("retry_resched"), lambda: self.no_vcpus(
                td, leaf, call, corr, flow, then, bail, gpa=gpa, attempt=attempt + 1))

        self.kvm.seamcall(td, leaf, lp, corr, flow, call, result, gpa=gpa, level=level,
                          preset=preset)

    def _check(self, td: KvmTd, leaf: int, corr: int, flow: int, then: Done, bail: Done,
               status: int) -> None:
        if status != SUCCESS:
            self._bug(td, leaf, status, corr, flow, bail)
            return
        then()

    def _bug(self, td: KvmTd, leaf: int, status: int, corr: int, flow: int, bail: Done) -> None:
        # tdh_do_no_vcpus() clears wait_for_sept_zap whatever its retry returned. The zap keeps
        # mmu_lock: it is released where every zap ends, in its finish.
        td.wait_for_sept_zap = False
        td.zap_error = td.zap_error or status
        self.kvm.bug_on(td, leaf, status, corr, flow)
        bail()

    def _leaked(self, flow: int, then: Done) -> None:
        """TDX_BUG_ON, return: the page stays the TD's, KVM goes on with the next one."""
        self.log.count("pages_leaked")
        if flow == _FLOW_TEARDOWN:
            self.log.count("teardown_pages_leaked")
        then()
