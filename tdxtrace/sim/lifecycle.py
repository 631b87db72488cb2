"""TD teardown as KVM drives it (tdx-reference.md §4(c)), and the shared machinery of the
per-TD flows (creation is in :mod:`.td_create`); one process per TD.

Each flow is a :mod:`.process` generator, so the KVM sequence reads like the kernel code.

Teardown (flow TEARDOWN), policy ``hkid_release``:

* ``late`` (guest_memfd closed first): every private page is zapped with the HKID live, BLOCK ->
  TRACK + kick -> REMOVE -> PAGE.WBINVD (the first pages through :class:`~.zap.ZapPath`),
  then ``tdx_mmu_release_hkid()``;
* ``early`` (KVM_TDX_TERMINATE_VM): ``tdx_mmu_release_hkid()`` first, then one RECLAIM per page.

``tdx_mmu_release_hkid()``: VP.FLUSH of every loaded vCPU on its LP, then under ``tdx_lock``
VPFLUSHDONE, CACHE.WB on one LP per package (resumed on INTERRUPTED_RESUMABLE, at most
TDX_SEAMCALL_RETRIES calls), KEY.FREEID. FLUSHVP_NOT_DONE leaks the HKID and ends the teardown.
``teardown.flush_loop`` chooses the retry of seed 001: ``resend_flush`` (Isaku Yamahata's v19
loop: flush every vCPU again, then VPFLUSHDONE) or ``vpflushdone_only`` (Reinette Chatre's
question: re-issue only VPFLUSHDONE), at most ``teardown.vpflushdone_tries`` attempts (1 is
mainline: no loop, FLUSHVP_NOT_DONE leaks the HKID). The thread concluded that loading a vCPU
does not associate it (only VP.ENTER does), so "the loop is unnecessary with the current code";
it matters only if a vCPU can *enter* after the flush round, which the then-planned HKID release
with vCPUs alive would allow, and Kai Huang argued for the plain order (flush at vCPU destroy,
VPFLUSHDONE after all vCPUs are gone) that makes the race impossible. The fault
``faults.vcpu_load_during_teardown_p`` makes a vCPU load *and enter* in that window: the
resent flush clears it, re-issuing VPFLUSHDONE alone cannot.
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

from tdxtrace.codes import TDX_SEAMCALL_RETRIES, ExitReason, Leaf, Status, leaf_name
from tdxtrace.events import Flow, IpiPurpose, Kind, Phase
from tdxtrace.sim.migration import VcpuPlacement
from tdxtrace.sim.module import SUCCESS
from tdxtrace.sim.module_teardown import LifecycleLeaves
from tdxtrace.sim.module_teardown import PageKind as P
from tdxtrace.sim.process import FOREVER, KvmMutex, Op, Process, parallel, spawn
from tdxtrace.sim.td_create import create_td
from tdxtrace.sim.teardown_pages import Page, PageWork

if TYPE_CHECKING:
    from tdxtrace.sim.kvm import Preset
    from tdxtrace.sim.kvm_state import KvmTd
    from tdxtrace.sim.world import World

L = Leaf
FLUSHVP_NOT_DONE = int(Status.FLUSHVP_NOT_DONE)
RESUMABLE = int(Status.INTERRUPTED_RESUMABLE)
NO_HKID_READY = int(Status.NO_HKID_READY_TO_WBCACHE)
NOT_ASSOCIATED = int(Status.VCPU_NOT_ASSOCIATED)


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
        packages = max(1, min(world.scenario.host.packages, world.lps))
        self.first_lps = [-(-p * world.lps // packages) for p in range(packages)]
        self.leaves = LifecycleLeaves(world.module, packages, self.cfg.cache_wb_blocks)
        self.placement = VcpuPlacement(world, self.leaves)
        self.tdx_lock = KvmMutex(world.sim)
        self._race_p = float(world.scenario.faults.vcpu_load_during_teardown_p)
        self._race_rng = world.rng.stream("faults.vcpu_load_during_teardown")
        self._active = 0
        self.pages = PageWork(self)

    # --- operations ------------------------------------------------------------------------
    def new_job(self, td: KvmTd, flow: Flow) -> Job:
        """A new operation on ``td``, run from the host's LP with a fresh ``corr``."""
        return Job(td, self.log.new_corr(), flow, self.world.host_lp)

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
        """smp_call_on_cpu(target, SEAMCALL): an IPI row unless ``target`` is the caller."""
        there, back = self.placement.send_ipi(purpose, job.td.index, vcpu, target, job.lp,
                                              job.corr, job.flow)
        yield self.sleep(there)
        status = yield self.call(job, leaf, fn, lp=target, vcpu=vcpu)
        yield self.sleep(back)
        return status

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
            if v.in_guest:
                self.kvm.exit_guest(v, int(ExitReason.EXTERNAL_INTERRUPT), None)
            v.stopped = True
        # A fault in its local-retry loop leaves at the vCPU's next pending event (the timer)
        # at the latest: after that no vCPU thread is left in KVM.
        quiet = max(v.next_timer for v in vcpus)
        if quiet > self.sim.now:
            self.sim.run(quiet)
        self.run_all(self._teardown)

    def _teardown(self, td: KvmTd) -> Process:
        job = self.new_job(td, Flow.TEARDOWN)
        yield self.mmu_write(td)  # no vCPU thread is left in the fault path
        td.mmu.release_write()
        self.log.count("teardowns")
        start = self.phase(job, Phase.TEARDOWN, len(td.mirror.leaves))
        # Like each phase's, TEARDOWN's status is the first failure it carried on past.
        status = SUCCESS
        if self.world.policy.hkid_release == "late":  # empties the mirror, bugged VM or not
            status = yield from self.pages.private_pages(job, zap=True)
        leaked_hkid = yield from self._release_hkid(job)
        status = status or leaked_hkid
        released = not leaked_hkid  # else nothing of the TD can be reclaimed
        if released and td.mirror.leaves:  # early release
            reclaimed = yield from self.pages.private_pages(job, zap=False)
            status = status or reclaimed
        if released:
            control = yield from self._reclaim_control(job)
            status = status or control
        self.done(job, Phase.TEARDOWN, start, status)
        self.log.record_td_value("teardown_ns", td.index, self.sim.now - start)
        if released:  # ran to its end; leaked pages, if any, are in pages_leaked
            self.log.count("teardowns_finished")
        return status

    def _release_hkid(self, job: Job) -> Process:
        """tdx_mmu_release_hkid(): 0, or the status that leaked the HKID."""
        td, mtd, lv = job.td, job.td.module, self.leaves
        start = self.phase(job, Phase.RELEASE_HKID, len(td.vcpus))
        resend = self.cfg.flush_loop == "resend_flush"
        tries = int(self.cfg.vpflushdone_tries)
        status, flushdone_start = SUCCESS, start
        for attempt in range(tries):
            if attempt == 0 or resend:
                yield from self._flush_vcpus(job)
                # A bugged VM is dead: its vCPU ioctls return -EIO, so none can race in.
                if attempt == 0 and self._race_p and not td.bugged \
                        and self._race_rng.random() < self._race_p:
                    v = td.vcpus[self._race_rng.randrange(len(td.vcpus))]
                    self.log.count("teardown_vcpu_reloads")
                    yield partial(self.placement.reload_and_enter, v)
                yield self.tdx_lock.acquire
                flushdone_start = self.phase(job, Phase.VPFLUSHDONE)
            else:
                yield self.sleep(self.costs.step("retry_resched"))
            status = yield self.call(job, L.TDH_MNG_VPFLUSHDONE, partial(lv.vpflushdone, mtd))
            if status != FLUSHVP_NOT_DONE or attempt + 1 == tries:
                break
            if resend:  # Isaku's loop: drop the lock, flush every vCPU again, retry
                self.done(job, Phase.VPFLUSHDONE, flushdone_start, status)
                self.tdx_lock.release()
        self.done(job, Phase.VPFLUSHDONE, flushdone_start, status)
        if status:
            self.tdx_lock.release()
            return self._leak(job, start, L.TDH_MNG_VPFLUSHDONE, status)
        wb_start = self.phase(job, Phase.CACHE_WB, len(self.first_lps))
        wb_failures: list[int] = []  # in the order they happened
        yield parallel([self._cache_wb(job, package, target, wb_failures)
                        for package, target in enumerate(self.first_lps)])
        self.done(job, Phase.CACHE_WB, wb_start, wb_failures[0] if wb_failures else SUCCESS)
        freeid_start = self.phase(job, Phase.KEY_FREEID)
        status = yield self.call(job, L.TDH_MNG_KEY_FREEID, partial(lv.key_freeid, mtd))
        self.done(job, Phase.KEY_FREEID, freeid_start, status)
        self.tdx_lock.release()
        if status:
            return self._leak(job, start, L.TDH_MNG_KEY_FREEID, status)
        self.done(job, Phase.RELEASE_HKID, start)
        return SUCCESS

    def _leak(self, job: Job, start: int, leaf: int, status: int) -> int:
        """The HKID stays assigned; nothing of the TD can be reclaimed any more."""
        if status != FLUSHVP_NOT_DONE:  # KVM's pr_err: "... failed. HKID %d is leaked."
            self.world.note(f"TD {job.td.index}: {leaf_name(leaf)} returned {status:#x}: "
                            f"HKID {job.td.module.hkid} is leaked")
        self.log.count("hkid_leaks")
        self.done(job, Phase.RELEASE_HKID, start, status)
        return status

    def _flush_vcpus(self, job: Job) -> Process:
        start = self.phase(job, Phase.VP_FLUSH, len(job.td.vcpus))
        failed = SUCCESS  # KVM ignores VCPU_NOT_ASSOCIATED; anything else was a TDX_BUG_ON
        for v in job.td.vcpus:
            status = yield partial(self.placement.flush_vp_on_cpu, v, job.corr, job.flow,
                                   job.lp)
            if status != NOT_ASSOCIATED:
                failed = failed or status
        self.done(job, Phase.VP_FLUSH, start, failed)

    def _cache_wb(self, job: Job, package: int, target: int, failures: list[int]) -> Process:
        """smp_func_do_phymem_cache_wb() on ``target``: resume while INTERRUPTED_RESUMABLE."""
        there, back = self.placement.send_ipi(IpiPurpose.CACHE_WB, job.td.index, None, target,
                                              job.lp, job.corr, job.flow)
        yield self.sleep(there)
        status, resume = RESUMABLE, False
        for _ in range(TDX_SEAMCALL_RETRIES):
            status = yield self.call(job, L.TDH_PHYMEM_CACHE_WB,
                                     partial(self.leaves.cache_wb, package, resume), lp=target,
                                     arg0=int(resume))
            if status != RESUMABLE:
                break
            resume = True
            self.log.count("cache_wb_resumes")
        if status not in (SUCCESS, NO_HKID_READY):  # WARN_ON_ONCE; FREEID will fail
            failures.append(status)
            self.world.note(f"TD {job.td.index}: TDH.PHYMEM.CACHE.WB on LP {target} "
                            f"returned {status:#x}")
        yield self.sleep(back)

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
