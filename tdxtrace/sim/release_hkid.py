"""``tdx_mmu_release_hkid()`` as KVM runs it at TD teardown (tdx-reference.md §4(c) 2).

Helper of :mod:`.lifecycle` (same conventions: :mod:`.process` generators, one per TD).

``tdx_mmu_release_hkid()``: VP.FLUSH of every loaded vCPU on its LP, then under ``tdx_lock``
VPFLUSHDONE, CACHE.WB on one LP per package (resumed on INTERRUPTED_RESUMABLE, at most
TDX_SEAMCALL_RETRIES calls), KEY.FREEID. FLUSHVP_NOT_DONE leaks the HKID and ends the
teardown; a VPFLUSHDONE or KEY.FREEID error does too, and bugs the VM (after a quiet
FLUSHVP_NOT_DONE the teardown of the S-EPT pages bugs it: :mod:`.lifecycle`).
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
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from tdxtrace.codes import TDX_SEAMCALL_RETRIES, Leaf, Status, leaf_name
from tdxtrace.events import IpiPurpose, Phase
from tdxtrace.sim.module import SUCCESS
from tdxtrace.sim.process import Process, parallel

if TYPE_CHECKING:
    from tdxtrace.sim.lifecycle import Job, Lifecycle

L = Leaf
FLUSHVP_NOT_DONE = int(Status.FLUSHVP_NOT_DONE)
RESUMABLE = int(Status.INTERRUPTED_RESUMABLE)
NO_HKID_READY = int(Status.NO_HKID_READY_TO_WBCACHE)
NOT_ASSOCIATED = int(Status.VCPU_NOT_ASSOCIATED)


class HkidRelease:
    """VP.FLUSH of every vCPU, then under tdx_lock VPFLUSHDONE, CACHE.WB per package, KEY.FREEID."""

    def __init__(self, life: Lifecycle) -> None:
        self.life = life
        self.world, self.log, self.costs, self.cfg = life.world, life.log, life.costs, life.cfg
        self._race_p = float(self.world.scenario.faults.vcpu_load_during_teardown_p)
        self._race_rng = self.world.rng.stream("faults.vcpu_load_during_teardown")

    def release(self, job: Job) -> Process:
        """tdx_mmu_release_hkid(): 0, or the status that leaked the HKID."""
        td, mtd, lv = job.td, job.td.module, self.life.leaves
        start = self.life.phase(job, Phase.RELEASE_HKID, len(td.vcpus))
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
                    yield partial(self.life.placement.reload_and_enter, v)
                yield self.life.tdx_lock.acquire
                flushdone_start = self.life.phase(job, Phase.VPFLUSHDONE)
            else:
                yield self.life.sleep(self.costs.step("retry_resched"))
            status = yield self.life.call(job, L.TDH_MNG_VPFLUSHDONE, partial(lv.vpflushdone, mtd))
            if status != FLUSHVP_NOT_DONE or attempt + 1 == tries:
                break
            if resend:  # Isaku's loop: drop the lock, flush every vCPU again, retry
                self.life.done(job, Phase.VPFLUSHDONE, flushdone_start, status)
                self.life.tdx_lock.release()
        self.life.done(job, Phase.VPFLUSHDONE, flushdone_start, status)
        if status:
            self.life.tdx_lock.release()
            return self._leak(job, start, L.TDH_MNG_VPFLUSHDONE, status)
        wb_start = self.life.phase(job, Phase.CACHE_WB, len(self.life.first_lps))
        wb_failures: list[int] = []  # in the order they happened
        yield parallel([self._cache_wb(job, package, target, wb_failures)
                        for package, target in enumerate(self.life.first_lps)])
        self.life.done(job, Phase.CACHE_WB, wb_start, wb_failures[0] if wb_failures else SUCCESS)
        freeid_start = self.life.phase(job, Phase.KEY_FREEID)
        status = yield self.life.call(job, L.TDH_MNG_KEY_FREEID, partial(lv.key_freeid, mtd))
        self.life.done(job, Phase.KEY_FREEID, freeid_start, status)
        self.life.tdx_lock.release()
        if status:
            return self._leak(job, start, L.TDH_MNG_KEY_FREEID, status)
        self.life.done(job, Phase.RELEASE_HKID, start)
        return SUCCESS

    def _leak(self, job: Job, start: int, leaf: int, status: int) -> int:
        """The HKID stays assigned; nothing of the TD can be reclaimed any more.

        FLUSHVP_NOT_DONE is a quiet ``goto out``. Any other VPFLUSHDONE error is TDX_BUG_ON
        with the VM (§4(c) 2.3), and so is a KEY.FREEID error: mainline checks it with
        KVM_BUG_ON(err, kvm) (TDX_BUG_ON after the 2025 cleanup), where tdx-reference.md
        §4(c) 2.5 mentions only the pr_err.
        """
        if status != FLUSHVP_NOT_DONE:  # KVM's pr_err: "... failed. HKID %d is leaked."
            self.life.bug(job, leaf, status)
            self.world.note(f"TD {job.td.index}: {leaf_name(leaf)} returned {status:#x}: "
                            f"HKID {job.td.module.hkid} is leaked")
        self.log.count("hkid_leaks")
        self.life.done(job, Phase.RELEASE_HKID, start, status)
        return status

    def _flush_vcpus(self, job: Job) -> Process:
        start = self.life.phase(job, Phase.VP_FLUSH, len(job.td.vcpus))
        failed = SUCCESS  # KVM ignores VCPU_NOT_ASSOCIATED; anything else was a TDX_BUG_ON
        for v in job.td.vcpus:
            status = yield partial(self.life.placement.flush_vp_on_cpu, v, job.corr, job.flow,
                                   job.lp)
            if status != NOT_ASSOCIATED:
                failed = failed or status
        self.life.done(job, Phase.VP_FLUSH, start, failed)

    def _cache_wb(self, job: Job, package: int, target: int, failures: list[int]) -> Process:
        """The package's flush sent to ``target``, its whole resume loop one function there."""
        yield from self.life.run_sent(job, IpiPurpose.CACHE_WB, target,
                                      self._flush(job, package, target, failures))

    def _flush(self, job: Job, package: int, target: int, failures: list[int]) -> Process:
        """smp_func_do_phymem_cache_wb(): resume while INTERRUPTED_RESUMABLE."""
        status, resume = RESUMABLE, False
        for _ in range(TDX_SEAMCALL_RETRIES):
            status = yield self.life.call(job, L.TDH_PHYMEM_CACHE_WB,
                                     partial(self.life.leaves.cache_wb, package, resume), lp=target,
                                     arg0=int(resume))
            if status != RESUMABLE:
                break
            resume = True
            self.log.count("cache_wb_resumes")
        if status not in (SUCCESS, NO_HKID_READY):  # WARN_ON_ONCE; FREEID will fail
            failures.append(status)
            self.world.note(f"TD {job.td.index}: TDH.PHYMEM.CACHE.WB on LP {target} "
                            f"returned {status:#x}")
