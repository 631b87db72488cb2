"""KVM's memory attributes and the KVM_EXIT_MEMORY_FAULT exit (tdx-reference.md §4(e), §5.2).

A TD's memory is private until userspace says otherwise with ``KVM_SET_MEMORY_ATTRIBUTES``
(the VMM converting a range, or answering a guest's MapGPA). KVM's fault handler compares
each fault with the attribute of its GFN before it looks at the S-EPT: a private fault on a
GFN whose attribute is shared (or the reverse) never reaches TDH.MEM.PAGE.AUG.
``kvm_mmu_faultin_pfn()`` fills in ``run->memory_fault`` and KVM_RUN returns to userspace
with ``KVM_EXIT_MEMORY_FAULT``. A VMM like QEMU answers by converting the reported range to
what the guest asked for (``kvm_convert_memory()``) and re-entering; the guest then faults
again at the same RIP, which is why re-entering after this exit is a known zero-step
trigger (§5.2).

Only the private side is modelled: the guest's shared accesses go to a window it converted at
boot (``roots_guest.SharedMix``), so a shared fault never meets a private attribute here.

Rows (flow FAULT, the fault's corr), after the fault's PAGE_FAULT: FAULT_DONE
(MEMORY_FAULT_EXIT), USERSPACE_EXIT (exit_reason KVM_EXIT_MEMORY_FAULT, gpa, arg0 = pages,
arg1 = flags), MEM_ATTR (the VMM converts the page back to private) and the zap of its
shared mapping when the scenario has direct roots, USERSPACE_RETURN (status 0), then the
vCPU enters again.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from tdxtrace.codes import (
    KVM_EXIT_MEMORY_FAULT,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
)
from tdxtrace.events import FaultOutcome, Flow, Kind, ZapReason, ZapScope

if TYPE_CHECKING:
    from tdxtrace.sim.kvm_state import KvmTd, Vcpu
    from tdxtrace.sim.world import World

FLOW = int(Flow.FAULT)
ZAP_FLOW = int(Flow.ZAP)


class MemoryAttributes:
    """Which GFNs userspace made shared, per TD, and KVM's exit when a fault disagrees."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.log = world.log
        self.sim = world.sim
        self._shared: dict[int, set[int]] = {}  # td index -> GFNs (no shared bit) not private

    # --- KVM_SET_MEMORY_ATTRIBUTES ----------------------------------------------------------
    # kvm_vm_set_mem_attributes() holds kvm->slots_lock for the whole ioctl, zap included, so
    # asks take effect one after the other, in the order userspace made them (the mutex's
    # queue is first in, first out), and each sees every earlier one done. It returns 0 at
    # once, with no invalidation (no zap, no mmu_invalidate_seq bump), when the whole range
    # already has the attribute asked for. QEMU follows every conversion with a discard of the
    # memory the range no longer uses (an invalidation of its own); that is not modelled.
    # ``lp``: the LP of the thread that asks, -1 for the VMM's; QEMU converts for a vCPU's
    # exit (MapGPA, KVM_EXIT_MEMORY_FAULT) in that vCPU's thread.
    def make_shared(self, td: KvmTd, first_gfn: int, pages: int,
                    then: Callable[[], None] | None = None, lp: int = -1) -> None:
        """To shared: KVM zaps the range's private leaves, and the new attribute takes effect
        once that zap holds mmu_lock (ZapPath.zap's ``locked``)."""
        td.slots_lock.acquire(partial(self._shared_locked, td, first_gfn, pages, then, lp))

    def _shared_locked(self, td: KvmTd, first_gfn: int, pages: int,
                       then: Callable[[], None] | None, lp: int, _: object) -> None:
        done = partial(self._ioctl_done, td, then)
        shared = self._shared.get(td.index)
        if shared is not None and shared.issuperset(range(first_gfn, first_gfn + pages)):
            self._unchanged(done)
            return
        self.world.zap.zap(td, list(range(first_gfn, first_gfn + pages)), ZapReason.CONVERSION,
                           ZAP_FLOW, done, locked=partial(self._set_shared, td, first_gfn, pages),
                           lp=lp)

    def make_private(self, td: KvmTd, first_gfn: int, pages: int,
                     then: Callable[[], None], lp: int = -1) -> None:
        """To private: the attribute changes under mmu_lock, then KVM zaps the range's shared
        mappings when the scenario has direct roots (§4(e))."""
        td.slots_lock.acquire(partial(self._private_locked, td, first_gfn, pages, then, lp))

    def _private_locked(self, td: KvmTd, first_gfn: int, pages: int,
                        then: Callable[[], None], lp: int, _: object) -> None:
        done = partial(self._ioctl_done, td, then)
        shared = self._shared.get(td.index)
        if not shared or shared.isdisjoint(range(first_gfn, first_gfn + pages)):
            self._unchanged(done)
            return
        td.mmu.acquire_write(partial(self._private_now, td, first_gfn, pages, done, lp))

    def _unchanged(self, done: Callable[[], None]) -> None:
        self.log.count("mem_attr_unchanged")
        done()

    def _ioctl_done(self, td: KvmTd, then: Callable[[], None] | None) -> None:
        td.slots_lock.release()
        if then is not None:
            then()

    def _private_now(self, td: KvmTd, first_gfn: int, pages: int,
                     then: Callable[[], None], lp: int) -> None:
        self._set_private(td, first_gfn, pages)
        td.end_zap()  # kvm_mmu_invalidate_end(): faults that began before are stale
        roots = self.world.roots
        if roots is None:  # no direct roots in this scenario: no shared mapping to zap
            then()
        else:
            roots.zap(td, ZapReason.CONVERSION, first_gfn, pages, ZapScope.RANGE_LEAFS, then, lp)

    def _set_shared(self, td: KvmTd, first_gfn: int, pages: int) -> None:
        self._shared.setdefault(td.index, set()).update(range(first_gfn, first_gfn + pages))

    def _set_private(self, td: KvmTd, first_gfn: int, pages: int) -> None:
        shared = self._shared.get(td.index)
        if shared:
            shared.difference_update(range(first_gfn, first_gfn + pages))

    def is_shared(self, td: KvmTd, gfn: int) -> bool:
        shared = self._shared.get(td.index)
        return bool(shared) and gfn in shared  # type: ignore[operator]

    # --- KVM_EXIT_MEMORY_FAULT ------------------------------------------------------------
    def private_fault_on_shared(self, v: Vcpu, gfn: int, corr: int, retries: int = 0) -> None:
        """A private fault on a shared GFN: exit to userspace, which converts it back.

        ``retries``: the local retries the fault made before (FAULT_DONE's arg0)."""
        td = v.td
        gpa = gfn << 12
        self.log.count("memory_fault_exits")
        self.log.emit(Kind.FAULT_DONE, flow=FLOW, sub=int(FaultOutcome.MEMORY_FAULT_EXIT),
                      corr=corr, td=td.index, vcpu=v.index, lp=v.lp, gpa=gpa, arg0=retries)
        self.log.emit(Kind.USERSPACE_EXIT, flow=FLOW, corr=corr, td=td.index, vcpu=v.index,
                      lp=v.lp, exit_reason=KVM_EXIT_MEMORY_FAULT, gpa=gpa, arg0=1,
                      arg1=KVM_MEMORY_EXIT_FLAG_PRIVATE)
        half = self.world.costs.step("userspace_exit") // 2
        self.sim.after(half, self._convert_back, v, gfn, corr, half)

    def _convert_back(self, v: Vcpu, gfn: int, corr: int, half: int) -> None:
        """The VMM's kvm_convert_memory(): KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) for the page."""
        td = v.td
        if v.stopped or td.bugged:
            return
        self.log.emit(Kind.MEM_ATTR, flow=FLOW, corr=corr, td=td.index, vcpu=v.index,
                      lp=v.lp, gpa=gfn << 12, arg0=1, arg1=KVM_MEMORY_ATTRIBUTE_PRIVATE)
        self.make_private(td, gfn, 1, partial(self.sim.after, half, self._reenter, v, corr),
                          v.lp)

    def _reenter(self, v: Vcpu, corr: int) -> None:
        td = v.td
        if v.stopped or td.bugged:
            return
        self.log.emit(Kind.USERSPACE_RETURN, flow=FLOW, corr=corr, td=td.index, vcpu=v.index,
                      lp=v.lp, status=0)
        kvm = self.world.kvm
        if self.sim.now >= v.next_timer:  # as after any fault: the tick was handled on the way
            v.take_tick(self.sim.now, kvm.timer_period)
        kvm.enter(v)
