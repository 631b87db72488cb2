"""KVM's private-GPA fault path (tdx-reference.md §4(a), §5.2).

``tdx_handle_ept_violation()`` fires ``kvm_page_fault`` once, then maps under mmu_lock read:
for each missing non-leaf level, freeze the mirror SPTE (FROZEN_SPTE), TDH.MEM.SEPT.ADD, then
write the real SPTE; for the leaf the same with TDH.MEM.PAGE.AUG. Meeting a frozen SPTE, or a
BUSY from the module (SPTE restored), is RET_PF_RETRY. The ``frozen_spte`` policy decides what
RET_PF_RETRY does next:

* ``local_retry`` (mainline, Sean Christopherson's proposal in seed 000): retry inside the host
  until it resolves, leaving only for a pending event or a signal, so the guest is never
  resumed on an unresolved private fault and zero-step firing means a bug;
* ``resume_guest`` (the earlier design): return to the guest, which faults again at the same
  RIP; if the winner of the frozen SPTE is slow, the module's zero-step mitigation arms.

Any other status from SEPT.ADD / PAGE.AUG is TDX_BUG_ON: the VM is bugged; so is a BUSY under
the ``seamcall_spinlock`` policy (the 2022 design, seed 002, had no retry at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from tdxtrace.codes import Leaf, is_busy
from tdxtrace.events import FaultOutcome, Flow, Kind, RetryCause, RootKind
from tdxtrace.sim.mmu import FROZEN, NONPRESENT, level_gpa, present_spte
from tdxtrace.sim.module import SUCCESS
from tdxtrace.sim.module_state import nonleaf_keys

if TYPE_CHECKING:
    from tdxtrace.sim.kvm import Kvm
    from tdxtrace.sim.kvm_state import Vcpu
    from tdxtrace.sim.world import World

SEPT_ADD = int(Leaf.TDH_MEM_SEPT_ADD)
PAGE_AUG = int(Leaf.TDH_MEM_PAGE_AUG)
FLOW = int(Flow.FAULT)
MIRROR = int(RootKind.MIRROR)


# Enum members as module globals: a class attribute lookup on an Enum costs ~70 ns,
# which the hot paths below pay many times per event.
_FAULTOUTCOME_ALREADY_MAPPED = FaultOutcome.ALREADY_MAPPED
_FAULTOUTCOME_ERROR = FaultOutcome.ERROR
_FAULTOUTCOME_MAPPED = FaultOutcome.MAPPED
_FAULTOUTCOME_PENDING_EVENT = FaultOutcome.PENDING_EVENT
_FAULTOUTCOME_RESUME_GUEST = FaultOutcome.RESUME_GUEST
_FAULTOUTCOME_SIGNAL = FaultOutcome.SIGNAL
_KIND_FAULT_DONE = Kind.FAULT_DONE
_KIND_FAULT_RETRY = Kind.FAULT_RETRY
_KIND_PAGE_FAULT = Kind.PAGE_FAULT
_KIND_SPTE_CHANGED = Kind.SPTE_CHANGED
_RETRYCAUSE_FROZEN_SPTE = RetryCause.FROZEN_SPTE
_RETRYCAUSE_SEAMCALL_BUSY = RetryCause.SEAMCALL_BUSY
_RETRYCAUSE_STALE = RetryCause.STALE


@dataclass(slots=True)
class Fault:
    vcpu: Vcpu
    gpa: int
    gfn: int
    corr: int
    retries: int = 0
    mmu_seq: int = 0  # kvm->mmu_invalidate_seq when this attempt began (fault->mmu_seq)


class FaultPath:
    def __init__(self, world: World, kvm: Kvm) -> None:
        self.world = world
        self.kvm = kvm
        self.sim = world.sim
        self.log = world.log
        self.costs = world.costs
        self.local_retry = world.policy.frozen_spte == "local_retry"
        self._attrs = world.attrs
        # The 2022 design (seed 002) checked AUG and SEPT.ADD with KVM_BUG_ON(err): under its
        # per-TD spinlock no host call could make them BUSY, so any BUSY (VP.ENTER's epoch, a
        # guest ACCEPT) bugged the VM. The thread's point is that proper retry is needed.
        self.busy_is_bug = world.policy.zap_busy == "seamcall_spinlock"
        self._preempt = world.rng.stream("kvm.preempt")
        self._signal = world.rng.stream("kvm.signal")
        self.preempt_p = world.scenario.kvm.preempt_p
        self.preempt_ns = world.scenario.kvm.preempt_ns
        self.signal_p = world.scenario.kvm.signal_p
        self._walk_ns = self.costs.step_sampler("mmu_walk")  # bound once: drawn every attempt
        self._resched_ns = self.costs.step_sampler("retry_resched")
        self._turn_ns = max(self.costs.base("retry_resched"), 1)  # a spin's turns, counted

    def handle(self, v: Vcpu, gpa: int) -> None:
        """tdx_handle_ept_violation() for a private GPA."""
        if v.stopped or v.td.bugged:
            return
        fault = Fault(v, gpa, gpa >> 12, self.log.new_corr())
        counters = self.log.counters  # EventLog.count() inlined: once per fault
        counters["faults"] += 1
        if fault.gfn in v.td.zapped_gfns:
            v.td.zapped_gfns.discard(fault.gfn)
            counters["refaults"] += 1
        # Positional (EventLog.row, in row order): the fault path writes ~8 rows per fault.
        self.log.row(0, _KIND_PAGE_FAULT, FLOW, 0, fault.corr, v.td.index, v.index, v.lp, None,
                     None, None, gpa, None, v.rip(), 0x2, None, None)
        if self._attrs.is_shared(v.td, fault.gfn):  # kvm_mmu_faultin_pfn(): not private now
            self._attrs.private_fault_on_shared(v, fault.gfn, fault.corr)
            return
        self._attempt(fault)

    def _attempt(self, f: Fault) -> None:
        td = f.vcpu.td
        f.mmu_seq = td.mmu_invalidate_seq  # kvm_mmu_faultin_pfn(), before mmu_lock
        if td.invalidating and td.invalidating_gfn(f.gfn):
            # mmu_invalidate_retry_gfn_unsafe(), before mmu_lock too: a fault on a GFN being
            # invalidated retries without contending the lock (which would make a yielding
            # zap drop it for nothing).
            self._retry(f, _RETRYCAUSE_STALE, locked=False)
            return
        mmu = td.mmu
        if mmu.try_read():  # the usual case, without acquire_read's callback
            self.sim.after(self._walk_ns(), self._walk, f, 0)
        else:
            mmu.acquire_read(lambda: self.sim.after(self._walk_ns(), self._walk, f, 0))

    def _walk(self, f: Fault, level_index: int) -> None:
        td = f.vcpu.td
        if not level_index and (f.mmu_seq != td.mmu_invalidate_seq or (
                td.invalidating and td.invalidating_gfn(f.gfn))):
            # mmu_lock is held now: is_page_fault_stale(). An invalidation ended since the
            # attempt began (it waited for the lock behind a zap, or one ran in between), or
            # one of its GFN is under way (a zap that yielded the lock).
            self._retry(f, _RETRYCAUSE_STALE)
            return
        if not level_index and self._attrs.is_shared(td, f.gfn):
            # A retried attempt whose GFN became shared: the faultin of the retry takes the
            # exit (its attribute check comes before mmu_lock; modelled here, under it).
            td.mmu.release_read()
            self._attrs.private_fault_on_shared(f.vcpu, f.gfn, f.corr, f.retries)
            return
        mirror = td.mirror
        keys = nonleaf_keys(f.gfn)
        while level_index < len(keys) and keys[level_index] in mirror.nonleaf:
            level_index += 1
        if level_index < len(keys):
            key: object = keys[level_index]
            if key in mirror.frozen:
                self._retry(f, _RETRYCAUSE_FROZEN_SPTE)
                return
            self._freeze_and_call(f, key, SEPT_ADD, keys[level_index][0], level_index)
            return
        if f.gfn in mirror.leaves:
            td.mmu.release_read()
            self._done(f, _FAULTOUTCOME_ALREADY_MAPPED)
            return
        if f.gfn in mirror.frozen:
            self._retry(f, _RETRYCAUSE_FROZEN_SPTE)
            return
        self._freeze_and_call(f, f.gfn, PAGE_AUG, 0, level_index)

    def _freeze_and_call(self, f: Fault, key: object, leaf: int, level: int,
                         level_index: int) -> None:
        v = f.vcpu
        v.td.mirror.frozen[key] = f.corr
        self._spte(f, level, NONPRESENT, FROZEN)
        delay = 0
        if self.preempt_p and self._preempt.random() < self.preempt_p:
            delay = self.preempt_ns  # the winner is descheduled with the SPTE frozen
        if delay:
            self.sim.after(delay, self._call, f, key, leaf, level, level_index)
        else:
            self._call(f, key, leaf, level, level_index)

    def _call(self, f: Fault, key: object, leaf: int, level: int, level_index: int) -> None:
        v = f.vcpu
        td = v.td
        module_td = td.module
        module = self.kvm.module
        # partial, not closures: one Python frame less per call and per completion.
        if leaf == SEPT_ADD:
            call = partial(module.sept_add, module_td, nonleaf_keys(f.gfn)[level_index])
        else:
            call = partial(module.page_aug, module_td, f.gfn)
        self.kvm.seamcall(td, leaf, v.lp, f.corr, FLOW, call,
                          partial(self._called, f, key, leaf, level, level_index),
                          vcpu=v.index, gpa=level_gpa(f.gfn, level), level=level)

    def _called(self, f: Fault, key: object, leaf: int, level: int, level_index: int,
                status: int) -> None:
        td = f.vcpu.td
        del td.mirror.frozen[key]
        if status == SUCCESS:
            self._spte(f, level, FROZEN, present_spte(f.gfn, level))
            if leaf == SEPT_ADD:
                td.mirror.nonleaf.add(key)  # type: ignore[arg-type]
                self._walk(f, level_index + 1)
                return
            td.mirror.leaves.add(f.gfn)
            td.mmu.release_read()
            self._done(f, _FAULTOUTCOME_MAPPED)
            return
        self._spte(f, level, FROZEN, NONPRESENT)
        if is_busy(status) and not self.busy_is_bug:
            self._retry(f, _RETRYCAUSE_SEAMCALL_BUSY, leaf, status)
            return
        td.mmu.release_read()
        self.kvm.bug_on(td, leaf, status, f.corr, FLOW)
        self._done(f, _FAULTOUTCOME_ERROR)

    def _retry(self, f: Fault, cause: RetryCause, leaf: int | None = None,
               status: int | None = None, *, locked: bool = True) -> None:
        """RET_PF_RETRY: the policy decides between a local retry and resuming the guest.
        ``locked``: the attempt holds mmu_lock for read (not when it retried before)."""
        v = f.vcpu
        if locked:
            v.td.mmu.release_read()
        self.log.row(0, _KIND_FAULT_RETRY, FLOW, cause, f.corr, v.td.index, v.index, v.lp, leaf,
                     status, None, f.gpa, None, None, None, None, None)  # row order, hot
        if not self.local_retry:
            self._done(f, _FAULTOUTCOME_RESUME_GUEST)
            return
        if self.sim.now >= v.next_timer:
            self._done(f, _FAULTOUTCOME_PENDING_EVENT)  # kvm_vcpu_has_events()
            return
        if v.stopped or (self.signal_p and self._signal.random() < self.signal_p):
            # A stopped vCPU (teardown, KVM_BUG_ON) has a signal pending: the loop exits.
            self._done(f, _FAULTOUTCOME_SIGNAL)
            return
        f.retries += 1
        self.log.count("local_retries")
        if not locked:  # the lockless check said retry: KVM spins on it
            self._spin(f)
            return
        self.sim.after(self._resched_ns(), self._attempt, f)

    def _spin(self, f: Fault) -> None:
        """KVM's local retry turns once per cond_resched() while its GFN's invalidation is in
        progress (a ~300 ns turn). Modelled as one wait, until an invalidation of the TD ends
        or the vCPU's timer is due, whichever first; the turns it made count in its retries
        and local_retries, one FAULT_RETRY row for all (a row per turn made traces 30x
        bigger). A pending signal ends the real loop sooner: not drawn while it waits."""
        v, start, woken = f.vcpu, self.sim.now, [False]

        def wake() -> None:
            if woken[0]:
                return
            woken[0] = True
            turns = (self.sim.now - start) // self._turn_ns
            f.retries += turns
            self.log.counters["local_retries"] += turns
            self.sim.after(self._resched_ns(), self._attempt, f)

        v.td.invalidation_waiters.append(wake)
        self.sim.at(max(v.next_timer, self.sim.now), wake)

    def _done(self, f: Fault, outcome: FaultOutcome) -> None:
        v = f.vcpu
        self.log.row(0, _KIND_FAULT_DONE, FLOW, outcome, f.corr, v.td.index, v.index, v.lp, None,
                     None, None, f.gpa, None, None, f.retries, None, None)  # row order, hot
        if self.sim.now >= v.next_timer:
            v.take_tick(self.sim.now, self.kvm.timer_period)
        self.kvm.enter(v)

    def _spte(self, f: Fault, level: int, old: int, new: int) -> None:
        td = f.vcpu.td
        gpa = level_gpa(f.gfn, level) if level else f.gfn << 12  # the leaf: no call, hot
        self.log.row(0, _KIND_SPTE_CHANGED, FLOW, MIRROR, f.corr, td.index, f.vcpu.index, None,
                     None, None, None, gpa, level, None, old, new,
                     td.mirror.root_id)  # row order (EventLog.row): two per fault level
