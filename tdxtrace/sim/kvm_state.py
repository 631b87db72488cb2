"""KVM's state of one TD and of each of its vCPUs (the run loop is :mod:`.kvm`).

Slotted dataclasses: their fields are read on every simulation step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tdxtrace.sim.guest import ACCEPT_RIP, TICK_HANDLER_RIP, Workload
from tdxtrace.sim.mmu import MirrorRoot, MmuLock
from tdxtrace.sim.module_state import ModuleTd
from tdxtrace.sim.process import KvmMutex


@dataclass(slots=True)  # slotted: its fields are read on every simulation step
class Vcpu:
    td: KvmTd
    index: int
    lp: int
    workload: Workload
    run_corr: int | None = None  # corr shared by a chain of BUSY-retried VP.ENTERs
    in_guest: bool = False
    # When its latest TDH.VP.ENTER is done entering (the module holds the TD epoch, and the
    # S-EPT tree while stepping, until then): a kick's IPI is taken no earlier.
    entering_until: int = 0
    token: int = 0  # bumped to cancel the guest's scheduled next step (kick, stop)
    next_timer: int = 0
    stopped: bool = False
    cpu: int = -1  # KVM's vcpu->cpu: the LP it was last loaded on (-1: never, or flushed)
    migrate_to: int = -1  # an LP its thread moves to before the next entry (migration.py)
    never_run: bool = False  # loaded by KVM_TDX_INIT_VCPU on the VMM's LP, not run since
    # guest.accept = before_touch: the guest is running TDG.MEM.PAGE.ACCEPT on its current
    # touch's page (at ACCEPT_RIP) before touching it.
    accepting: bool = False
    # guest.tick_exit = tdvmcall: the timer handler exits once after each tick the guest
    # takes (due), and the vCPU is in it (in_handler) from that exit until the guest runs on.
    tick_exits: bool = False
    handler_exit_due: bool = False
    in_handler: bool = False

    def rip(self) -> int:
        """The guest's RIP: the timer handler's while in it, the ACCEPT's while accepting,
        else the current touch's."""
        if self.in_handler:
            return TICK_HANDLER_RIP
        return ACCEPT_RIP if self.accepting else self.workload.current.rip

    def take_tick(self, now: int, period: int) -> None:
        """kvm_vcpu_has_events() sent the vCPU back to the guest to take its due timer
        interrupt: the next one is a period away, and the handler may exit first."""
        self.next_timer = now + period
        self.handler_exit_due = self.tick_exits


@dataclass(slots=True)
class KvmTd:
    index: int
    module: ModuleTd
    mirror: MirrorRoot
    mmu: MmuLock = field(default_factory=MmuLock)
    vcpus: list[Vcpu] = field(default_factory=list)
    wait_for_sept_zap: bool = False
    bugged: bool = False
    # Its VMM exited (QEMU quits when KVM_TDX_FINALIZE_VM fails): nothing runs the TD again.
    vmm_exited: bool = False
    spin_free_at: int = 0  # seamcall_spinlock policy: when the per-TD spinlock is free
    zapped_gfns: set[int] = field(default_factory=set)  # for refault accounting
    # The first status a zap of this TD hit a TDX_BUG_ON with (0: none): a teardown's
    # PRIVATE_PAGES phase carries on past it, like KVM, and reports it in its PHASE_DONE.
    zap_error: int = 0
    # The LP this TD's VMM thread runs on (each TD has its own QEMU; World assigns it).
    vmm_lp: int = -1
    # The LP this TD's zaps run on: the VMM's, or a vCPU's while a conversion QEMU does for
    # that vCPU's exit runs in its thread. One zap at a time (mmu_lock write).
    zap_lp: int = -1
    # kvm->slots_lock: held for a whole KVM_SET_MEMORY_ATTRIBUTES or memslot update
    # (mem_attrs.py, roots.py); a teardown takes it for good (lifecycle.py).
    slots_lock: KvmMutex = field(kw_only=True)
    # kvm->mmu_invalidate_seq: bumped by every zap (of either root) when it ends. A shared
    # fault that began before and maps after it is stale (mmu_invalidate_retry_gfn()).
    mmu_invalidate_seq: int = 0
    # The GFN ranges [start, end) of the invalidations under way (kvm_mmu_invalidate_begin()
    # to _end()): a fault on one of them retries, before mmu_lock (a fault arriving during a
    # zap) and under it (a zap that yields it, kvm.preempt_model = full). Faults spinning in
    # KVM's local retry on one wait in invalidation_waiters until an invalidation ends.
    invalidating: list[tuple[int, int]] = field(default_factory=list)
    invalidation_waiters: list[Callable[[], None]] = field(default_factory=list)
    # Runtime zaps of the mirror called and not yet done, and who waits for there to be none.
    zaps_running: int = 0
    zaps_waiters: list[Callable[[object], None]] = field(default_factory=list)

    def thread_lp(self, lp: int) -> int:
        """The LP of the thread asking for a zap: ``lp``, or the VMM's for -1."""
        return self.vmm_lp if lp < 0 else lp

    def invalidating_gfn(self, gfn: int) -> bool:
        return any(start <= gfn < end for start, end in self.invalidating)

    def invalidation_ended(self) -> None:
        waiters, self.invalidation_waiters = self.invalidation_waiters, []
        for wake in waiters:
            wake()

    def after_zaps(self, then: Callable[[object], None]) -> None:
        """``then`` once no zap of this TD runs (at once if none does): a VM is destroyed
        only after a hole punch in flight ends (the guest_memfd file holds a reference)."""
        if self.zaps_running:
            self.zaps_waiters.append(then)
        else:
            then(None)

    def zap_started(self) -> None:
        self.zaps_running += 1

    def zap_ended(self) -> None:
        self.zaps_running -= 1
        if not self.zaps_running:
            waiters, self.zaps_waiters = self.zaps_waiters, []
            for then in waiters:
                then(None)

    @property
    def dead(self) -> bool:
        """No vCPU enters and the VMM changes nothing: KVM_BUG_ON'd, or its VMM exited."""
        return self.bugged or self.vmm_exited

    def end_zap(self) -> None:
        """A runtime zap ends (kvm_mmu_invalidate_end()): mmu_invalidate_seq moves, then the
        faults waiting on its mmu_lock run and see it."""
        self.mmu_invalidate_seq += 1
        self.mmu.release_write()
