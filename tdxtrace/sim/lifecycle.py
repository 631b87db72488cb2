"""TD teardown as KVM drives it (tdx-reference.md §4(c)), and the shared machinery of the
per-TD flows (creation is in :mod:`.td_create`); one process per TD.

Each flow is a :mod:`.process` generator, so the KVM sequence reads like the kernel code.

Teardown (flow TEARDOWN), policy ``hkid_release``:

* ``late`` (guest_memfd closed first): every private page is zapped with the HKID live, BLOCK ->
  TRACK + kick -> REMOVE -> PAGE.WBINVD (the first pages through :class:`~.zap.ZapPath`),
  then ``tdx_mmu_release_hkid()``;
* ``early`` (KVM_TDX_TERMINATE_VM): ``tdx_mmu_release_hkid()`` first, then one RECLAIM per page.

``tdx_mmu_release_hkid()`` is :mod:`.release_hkid`'s (its loop policies included).
Then RECLAIM of the S-EPT pages, each vCPU's TDCX and TDVPR pages, the TDCS pages and the TDR,
and PAGE.WBINVD of the TDR. In every phase the first ``teardown.row_pages`` pages get one row
per SEAMCALL; the rest are recorded as batched rows (``arg1`` = pages) whose duration is the
sum of the per-page durations, so the cost stays per page while the trace stays small.

A bugged VM is torn down the same way: kvm_destroy_vm() does not look at vm_bugged. A page
KVM fails to remove or reclaim is leaked (truth ``pages_leaked``, ``teardown_pages_leaked``)
and the next one follows; the TDR cannot be reclaimed while leaked pages still belong to the
TD (TD_ASSOCIATED_PAGES_EXIST), so it is leaked too and its PAGE.WBINVD skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from tdxtrace.codes import Leaf
from tdxtrace.events import Flow, IpiPurpose, Kind, Phase
from tdxtrace.sim.migration import VcpuPlacement
from tdxtrace.sim.module import SUCCESS
from tdxtrace.sim.module_state import PageKind as P
from tdxtrace.sim.module_teardown import LifecycleLeaves
from tdxtrace.sim.process import FOREVER, KvmMutex, Op, Process, spawn
from tdxtrace.sim.release_hkid import HkidRelease
from tdxtrace.sim.td_create import create_td
from tdxtrace.sim.teardown_pages import Page, PageWork

if TYPE_CHECKING:
    from tdxtrace.sim.kvm import Preset
    from tdxtrace.sim.kvm_state import KvmTd
    from tdxtrace.sim.world import World

L = Leaf


@dataclass(frozen=True)
class Job:
    """One KVM operation on one TD: its rows share ``corr``, ``flow`` and the caller's LP."""

    td: KvmTd
    corr: int
    flow: int
    lp: int


class Lifecycle:
    """KVM's side of TD creation and teardown; owns vCPU placement and the tdx_lock."""

    def __init__(self, world: World) -> None:
        self.world, self.kvm, self.sim, self.log = world, world.kvm, world.sim, world.log
        self.costs = world.costs
        self.cfg = world.scenario.teardown
        self.first_lps = world.first_lps  # where CACHE.WB and KEY.CONFIG run, one per package
        self.leaves = LifecycleLeaves(world.module, len(self.first_lps), self.cfg.cache_wb_blocks)
        self.placement = VcpuPlacement(world, self.leaves)
        self.tdx_lock = KvmMutex(world.sim)
        self._active = 0
        self.pages = PageWork(self)
        self.hkid = HkidRelease(self)

    # --- operations ------------------------------------------------------------------------
    def new_job(self, td: KvmTd, flow: Flow) -> Job:
        """A new operation on ``td``, run from its VMM's LP with a fresh ``corr``."""
        return Job(td, self.log.new_corr(), flow, td.vmm_lp)

    def sleep(self, ns: int) -> Op:
        return lambda done: self.sim.after(ns, done, None)

    def call(self, job: Job, leaf: int, fn: Callable[..., int], *, lp: int | None = None,
             vcpu: int | None = None, arg0: int | None = None,
             preset: Preset | None = None) -> Op:
        return lambda done: self.kvm.seamcall(job.td, leaf, job.lp if lp is None else lp,
                                              job.corr, job.flow, fn, done, vcpu=vcpu, arg0=arg0,
                                              preset=preset)

    def mmu_write(self, td: KvmTd) -> Op:
        return lambda done: td.mmu.acquire_write(lambda: done(None))

    def phase(self, job: Job, phase: Phase, work: int | None = None) -> int:
        self.log.emit(Kind.PHASE, sub=phase, flow=job.flow, corr=job.corr, td=job.td.index,
                      lp=job.lp, arg0=work)
        return self.sim.now

    def done(self, job: Job, phase: Phase, start: int, status: int = SUCCESS) -> None:
        self.log.emit(Kind.PHASE_DONE, sub=phase, flow=job.flow, corr=job.corr,
                      td=job.td.index, lp=job.lp, status=status, dur=self.sim.now - start)

    def run_all(self, make: Callable[[KvmTd], Process]) -> None:
        """One process per TD, concurrently; returns when every one has finished."""
        finished_at = [self.sim.now]

        def finished(_: Any) -> None:
            self._active -= 1
            finished_at[0] = self.sim.now

        for td in self.world.tds:
            self._active += 1
            spawn(make(td), finished)
        self.sim.run(FOREVER, lambda: self._active == 0)
        # Simulator.run() moves the clock to its horizon when the heap runs dry; the clock
        # belongs at the moment the last process finished.
        self.sim.now = finished_at[0]

    def bug(self, job: Job, leaf: int, status: int) -> int:
        self.kvm.bug_on(job.td, leaf, status, job.corr, job.flow)
        return status

    def on_lp(self, job: Job, purpose: IpiPurpose, target: int, leaf: int,
              fn: Callable[..., int], vcpu: int | None = None) -> Process:
        """smp_call_on_cpu(target, SEAMCALL): one call, sent to ``target`` (run_sent)."""
        def one_call() -> Process:
            status = yield self.call(job, leaf, fn, lp=target, vcpu=vcpu)
            return status

        status = yield from self.run_sent(job, purpose, target, one_call(), vcpu)
        return status

    def run_sent(self, job: Job, purpose: IpiPurpose, target: int, work: Process,
                 vcpu: int | None = None) -> Process:
        """``work`` sent to ``target`` and waited for: an IPI row unless ``target`` is the
        caller's LP; it runs there after the functions sent before it, alone."""
        there, back = self.placement.send_ipi(purpose, job.td.index, vcpu, target, job.lp,
                                              job.corr, job.flow)
        yield self.sleep(there)
        lp_free = yield partial(self.placement.run_on_lp, target)
        result = yield from work
        lp_free()
        yield self.sleep(back)
        return result

    # --- creation (td_create.py) ----------------------------------------------------------
    def create_all(self) -> None:
        self.run_all(partial(create_td, self))
        if self.cfg.prepopulate:
            self.pages.prepopulate()

    # --- teardown --------------------------------------------------------------------------
    def teardown_all(self) -> None:
        """Stop every vCPU (their fds are closed), then tear every TD down concurrently."""
        vcpus = [v for td in self.world.tds for v in td.vcpus]
        for v in vcpus:
            if v.in_guest:  # kicked; interrupts are off until its VP.ENTER is done entering
                self.sim.at(max(self.sim.now, v.entering_until), self.kvm.kicked, v, v.token)
            v.stopped = True
        # A fault in its local-retry loop leaves at the vCPU's next pending event (the timer)
        # at the latest: after that no vCPU thread is left in KVM.
        quiet = max(v.next_timer for v in vcpus)
        if quiet > self.sim.now:
            self.sim.run(quiet)
        self.run_all(self._teardown)

    def _teardown(self, td: KvmTd) -> Process:
        job = self.new_job(td, Flow.TEARDOWN)
        # The VM goes when its last file reference does, so no VM ioctl is in flight: a
        # memory-attribute or memslot change the VMM had started (queued on slots_lock) ends
        # first. The lock is kept: none starts after.
        yield td.slots_lock.acquire
        # Nor a hole punch (it takes no slots_lock): one that yields mmu_lock
        # (kvm.preempt_model = full) would let the teardown in half way through it.
        yield td.after_zaps
        yield self.mmu_write(td)  # no vCPU thread is left in the fault path
        td.mmu.release_write()
        self.log.count("teardowns")
        start = self.phase(job, Phase.TEARDOWN, len(td.mirror.leaves))
        # Like each phase's, TEARDOWN's status is the first failure it carried on past.
        status = SUCCESS
        if self.world.policy.hkid_release == "late":  # empties the mirror, bugged VM or not
            status = yield from self.pages.private_pages(job, zap=True)
        leaked_hkid = yield from self.hkid.release(job)
        status = status or leaked_hkid
        released = not leaked_hkid  # else nothing of the TD can be reclaimed
        if released and td.mirror.leaves:  # early release
            reclaimed = yield from self.pages.private_pages(job, zap=False)
            status = status or reclaimed
        if released:
            control = yield from self._reclaim_control(job)
            status = status or control
        elif td.mirror.nonleaf:
            # The mirror root is still torn down: tdx_sept_free_private_spt() finds the HKID
            # assigned, KVM_BUG_ON (no SEAMCALL: no leaf, no status), and its S-EPT pages
            # stay leaked. Already bugged after a VPFLUSHDONE or KEY.FREEID error.
            self.kvm.bug_on(td, None, None, job.corr, job.flow)
        self.done(job, Phase.TEARDOWN, start, status)
        self.log.record_td_value("teardown_ns", td.index, self.sim.now - start)
        if released:  # ran to its end; leaked pages, if any, are in pages_leaked
            self.log.count("teardowns_finished")
        return status

    def _reclaim_control(self, job: Job) -> Process:
        """S-EPT pages, then each vCPU's TDCX and TDVPR pages, then TDCS, TDR, TDR WBINVD."""
        td, mtd = job.td, job.td.module
        ctl = self.leaves.of(mtd)
        sept: list[Page] = [(P.SEPT, key, None, None) for key in sorted(mtd.nonleaf)]
        vcpu: list[Page] = []
        for i, count in enumerate(ctl.vcpu_pages):
            vcpu += [(P.TDCX, i, i, None)] * max(0, count - 1)
            vcpu += [(P.TDVPR, i, i, None)] * min(1, count)
        tdr: list[Page] = [(P.TDCS, None, None, None)] * ctl.tdcs
        tdr.append((P.TDR, None, None, None))
        failed = SUCCESS
        for phase, pages in ((Phase.RECLAIM_SEPT, sept), (Phase.RECLAIM_VCPU, vcpu),
                             (Phase.RECLAIM_TD, tdr)):
            start = self.phase(job, phase, len(pages))
            status = yield from self.pages.reclaim(job, pages)  # leaks what fails, goes on
            if phase == Phase.RECLAIM_SEPT:
                td.mirror.nonleaf.clear()
            if phase == Phase.RECLAIM_TD and ctl.tdr_reclaimed:  # a leaked TDR is not flushed
                wbinvd = yield self.call(job, L.TDH_PHYMEM_PAGE_WBINVD,
                                         partial(self.leaves.tdr_wbinvd, mtd))
                if wbinvd:
                    self.bug(job, L.TDH_PHYMEM_PAGE_WBINVD, wbinvd)
                status = status or wbinvd
            self.done(job, phase, start, status)
            failed = failed or status
        return failed
