"""The page work of TD teardown: zap or reclaim private pages, reclaim control pages.

Helper of :mod:`.lifecycle` (same conventions). In every phase the first
``teardown.row_pages`` pages get one row per SEAMCALL (late release: through
:class:`~.zap.ZapPath`, with SPTE_CHANGED rows); the rest are batched into rows of up to
BATCH_PAGES pages with ``arg1`` = pages and a duration that is the sum of the per-page costs,
sampled one by one. The module model still sees every page, one call at a time, so its rules
(BLOCK before TRACK before REMOVE, RECLAIM only in TD_TEARDOWN, ...) hold for batched pages too,
and so does fault injection: each call a batched row stands for may get the spurious BUSY of
:mod:`.faults`, drawn in call order as if it had its own row.

A batched row only stands for calls that succeeded. At a call that fails (injected, or a real
error) the batch stops: the pages before it make the batched rows, the failing call gets a row
of its own and KVM's answer to it its own rows too (late release: :meth:`ZapPath.resume_leaf`,
i.e. tdh_do_no_vcpus()'s kick and retry, or TDX_BUG_ON; reclaim: no retry, and VM_BUGGED
only for a private page, see :meth:`PageWork._leak`), then
batching resumes with the next call. As in KVM, a page KVM gives up on is leaked (truth
``pages_leaked``, ``teardown_pages_leaked``) and the teardown goes on with the next one:
destroying a bugged VM still releases its HKID and reclaims what it can (tdx-reference.md
§4(b) step 6, §4(c)).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from tdxtrace.codes import Leaf, leaf_name
from tdxtrace.errors import ScenarioError
from tdxtrace.events import KickReason, Kind, Phase, RootKind, SeptState, ZapReason, ZapScope
from tdxtrace.sim.mmu import NONPRESENT, present_spte
from tdxtrace.sim.module import SUCCESS
from tdxtrace.sim.module_state import PageKey, SeptEntry, nonleaf_keys
from tdxtrace.sim.module_state import PageKind as P

if TYPE_CHECKING:
    from tdxtrace.sim.kvm import Preset
    from tdxtrace.sim.lifecycle import Job, Lifecycle
    from tdxtrace.sim.process import Process

Page = tuple[P, PageKey, int | None, int | None]  # kind, module key, vCPU, RCX page number
L = Leaf
BATCH_PAGES = 512  # pages one batched row stands for at most
PREPOPULATE_LIMIT_MB = 4096
KICK = -1  # the kick after TRACK, in the per-page order below
ZAP_ORDER = (L.TDH_MEM_RANGE_BLOCK, L.TDH_MEM_TRACK, KICK, L.TDH_MEM_PAGE_REMOVE,
             L.TDH_PHYMEM_PAGE_WBINVD)
ZapCall = Callable[[int, int, int, tuple[int, int, int]], int]  # (gfn, now, until, holder)
# One step of ZAP_ORDER: (its index, leaf, cost sampler, module call, lock holder).
Step = tuple[int, int, Callable[[], int], ZapCall, tuple[int, int, int]]
# One pass of batched pages: the index of the page it stopped at (or the end), per step the
# calls and their summed duration, and the call that failed there: (step, outcome), or None.
Run = tuple[int, list[int], list[int], tuple[int, "Preset"] | None]


class PageWork:
    def __init__(self, life: Lifecycle) -> None:
        self.life = life
        self.world, self.log, self.sim, self.costs = life.world, life.log, life.sim, life.costs
        self.row_pages = int(life.cfg.row_pages)
        td = self.world.scenario.td
        if life.cfg.prepopulate and td.count * td.memory_mb > PREPOPULATE_LIMIT_MB:
            raise ScenarioError(
                f"teardown.prepopulate: td.count x td.memory_mb = {td.count * td.memory_mb} MB "
                f"is above {PREPOPULATE_LIMIT_MB} MB, the most the emulator maps page by page; "
                f"run a smaller TD and extrapolate (docs/calibration.md)")

    def prepopulate(self) -> None:
        """Every private page mapped and accepted, as in a TD that has touched all its memory.

        No rows: the faults happened before the trace (running them would take a ~8 µs fault
        per page and dominate the trace). The S-EPT and the mirror hold what they built.
        """
        from tdxtrace.sim.world import PRIVATE_BASE_GFN

        world = self.world
        gfns = range(PRIVATE_BASE_GFN, PRIVATE_BASE_GFN + world.pages)
        keys = {k for gfn in range(gfns.start, gfns.stop, 512) for k in nonleaf_keys(gfn)}
        for td in world.tds:
            td.module.entries.update((gfn, SeptEntry(state=SeptState.MAPPED)) for gfn in gfns)
            td.module.nonleaf.update(keys)
            td.mirror.nonleaf.update(keys)
            td.mirror.leaves.update(gfns)

    def private_pages(self, job: Job, zap: bool) -> Process:
        """PRIVATE_PAGES: zap every private leaf (HKID live) or reclaim it (HKID released).

        A bugged VM is zapped like any other: KVM's guest_memfd release walks every leaf.
        """
        life, td = self.life, job.td
        gfns = sorted(td.mirror.leaves)
        start = life.phase(job, Phase.PRIVATE_PAGES, len(gfns))
        head, rest = gfns[:self.row_pages], gfns[self.row_pages:]
        status = SUCCESS
        if zap:
            td.zap_error = SUCCESS
            if head:
                yield lambda done: self.world.zap.zap(td, head, ZapReason.TEARDOWN, job.flow,
                                                      lambda: done(None), corr=job.corr)
            for i in range(0, len(rest), BATCH_PAGES):
                yield from self._zap_batch(job, rest[i:i + BATCH_PAGES])
            # Like a reclaim's, the phase ends with the first failure it carried on past.
            status = td.zap_error
        else:
            yield life.mmu_write(td)
            self._zap_row(job, Kind.ZAP, gfns[0] if gfns else 0, len(gfns))
            pages: list[Page] = [(P.PRIVATE, g, None, present_spte(g, 0) >> 12) for g in gfns]
            status = yield from self.reclaim(job, pages)
            self._zap_row(job, Kind.ZAP_DONE, None, len(gfns) - len(td.mirror.leaves))
            td.mmu.release_write()
        life.done(job, Phase.PRIVATE_PAGES, start, status)
        return status

    def _zap_row(self, job: Job, kind: Kind, gfn: int | None, pages: int) -> None:
        if kind == Kind.ZAP:
            self.log.count("zaps")
            arg1 = int(ZapScope.EVERYTHING)  # the whole mirror, whatever the policy
        else:
            arg1 = pages
        self.log.emit(kind, sub=ZapReason.TEARDOWN, flow=job.flow, corr=job.corr,
                      td=job.td.index, lp=job.lp, gpa=None if gfn is None else gfn << 12,
                      arg0=pages, arg1=arg1)

    def _zap_batch(self, job: Job, gfns: list[int]) -> Process:
        """BLOCK, TRACK + kick, REMOVE, WBINVD for each page; one row per leaf for them all.

        Every page's mirror SPTE goes, as in KVM (the S-EPT hooks cannot stop the TDP MMU);
        a page whose call failed continues through ZapPath with rows of its own.
        """
        life, td = self.life, job.td
        steps = self._zap_steps(job)
        yield life.mmu_write(td)
        self._zap_row(job, Kind.ZAP, gfns[0], len(gfns))
        i = 0
        while i < len(gfns):
            first = gfns[i]
            i, count, total, failed = self._zap_run(job, steps, gfns, i)
            yield from self._zap_rows(job, first, count, total)
            if failed is not None:
                yield partial(self._resume, job, gfns[i], *failed)
                i += 1
        self.log.count("sptes_zapped", len(gfns))
        self._zap_row(job, Kind.ZAP_DONE, None, len(gfns))
        td.mmu.release_write()

    def _resume(self, job: Job, gfn: int, step: int, preset: Preset,
                done: Callable[[None], None]) -> None:
        self.world.zap.resume_leaf(job.td, gfn, job.corr, job.flow, partial(done, None), step,
                                   preset)

    def _zap_steps(self, job: Job) -> tuple[Step, ...]:
        """Each step of ZAP_ORDER for ``job``'s TD."""
        td, module, costs = job.td, self.world.module, self.costs
        mtd = td.module
        calls: tuple[ZapCall, ...] = (
            partial(module.range_block, mtd),
            lambda gfn, now, until, me: module.track(mtd, now, until, me),
            lambda *_: SUCCESS,  # the kick after TRACK: no vCPU is in guest mode
            partial(module.page_remove, mtd),
            lambda *_: SUCCESS,  # PAGE.WBINVD
        )
        # kvm_make_all_cpus_request() checks every vCPU, running or not (docs/calibration.md).
        kick_vcpus = costs.base("kick_per_vcpu") * len(td.vcpus)
        kick = costs.step_sampler("kick")
        samplers: list[Callable[[], int]] = [costs.leaf_sampler(leaf) for leaf in ZAP_ORDER]
        samplers[2] = lambda: kick() + kick_vcpus
        holders = [(job.lp, max(leaf, 0), job.corr) for leaf in ZAP_ORDER]
        return tuple(zip(range(5), ZAP_ORDER, samplers, calls, holders, strict=True))

    def _zap_run(self, job: Job, steps: tuple[Step, ...], gfns: list[int], first: int) -> Run:
        """Run pages from ``first`` against the module until one of their calls fails."""
        kvm, module, leaves = self.world.kvm, self.world.module, job.td.mirror.leaves
        spurious = kvm.spurious_busy if self.world.faults.injects_busy else None
        total, count = [0] * 5, [0] * 5
        t = self.sim.now
        for k in range(first, len(gfns)):
            gfn = gfns[k]
            leaves.discard(gfn)
            for i, leaf, sample, call, me in steps:
                d = sample()
                status = (spurious(leaf, t) if spurious is not None else 0) or call(
                    gfn, t, t + d, me)
                if status:
                    return k, count, total, (i, (status, d, module.last_busy))
                t += d
                total[i] += d
                count[i] += 1
        return len(gfns), count, total, None

    def _zap_rows(self, job: Job, first: int, count: list[int], total: list[int]) -> Process:
        """The batched rows of one run (first page ``first``), each followed by its time."""
        td = job.td
        for i, leaf in enumerate(ZAP_ORDER):
            if not count[i]:
                continue
            if leaf == KICK:
                self.log.emit(Kind.KICK, sub=KickReason.TRACK, flow=job.flow, corr=job.corr,
                              td=td.index, lp=job.lp, arg0=0, arg1=count[i], dur=total[i])
            else:
                gpa = None if leaf == L.TDH_MEM_TRACK else first << 12
                self.log.emit(Kind.SEAMCALL, flow=job.flow, corr=job.corr, td=td.index,
                              lp=job.lp, leaf=leaf, gpa=gpa, level=None if gpa is None else 0,
                              status=SUCCESS, arg1=count[i], dur=total[i])
            yield self.life.sleep(total[i])

    def reclaim(self, job: Job, pages: list[Page]) -> Process:
        """PHYMEM.PAGE.RECLAIM of ``pages`` in order; private pages also leave the mirror.

        KVM does not retry a RECLAIM (no contention is possible by then) and leaks a page it
        fails on, then goes on with the next one. Returns the first failure, or SUCCESS.
        """
        life, td = self.life, job.td
        mtd, reclaim = td.module, life.leaves.reclaim
        leaf = L.TDH_PHYMEM_PAGE_RECLAIM
        failed = SUCCESS
        for kind, key, vcpu, pfn in pages[:self.row_pages]:
            if kind == P.PRIVATE:
                gfn = int(key)  # type: ignore[arg-type]
                self.log.count("sptes_zapped")
                self.log.emit(Kind.SPTE_CHANGED, sub=RootKind.MIRROR, flow=job.flow,
                              corr=job.corr, td=td.index, gpa=gfn << 12, level=0,
                              arg0=present_spte(gfn, 0), arg1=NONPRESENT,
                              arg2=td.mirror.root_id)
                td.mirror.leaves.discard(gfn)
            status = yield life.call(job, leaf, partial(reclaim, mtd, kind, key), vcpu=vcpu,
                                     arg0=pfn)
            if status:
                self._leak(job, leaf, status, kind)
                failed = failed or status
        for i in range(self.row_pages, len(pages), BATCH_PAGES):
            status = yield from self._reclaim_batch(job, pages[i:i + BATCH_PAGES])
            failed = failed or status
        return failed

    def _reclaim_batch(self, job: Job, chunk: list[Page]) -> Process:
        """One batched row per run of reclaims that succeed; a failed one has its own row."""
        life, td, module = self.life, job.td, self.world.module
        spurious = self.world.kvm.spurious_busy if self.world.faults.injects_busy else None
        mtd, reclaim = td.module, life.leaves.reclaim
        leaf = L.TDH_PHYMEM_PAGE_RECLAIM
        sample = self.costs.leaf_sampler(leaf)
        me = (job.lp, leaf, job.corr)
        failed, k = SUCCESS, 0
        while k < len(chunk):
            t, first, preset = self.sim.now, k, None
            for kind, key, _, _ in chunk[first:]:
                d = sample()
                status = (spurious(leaf, t) if spurious is not None else 0) or reclaim(
                    mtd, kind, key, t, t + d, me)
                if kind == P.PRIVATE:
                    td.mirror.leaves.discard(key)  # its mirror SPTE goes whatever the S-EPT says
                    self.log.count("sptes_zapped")
                if status:
                    preset = (status, d, module.last_busy)
                    break
                t, k = t + d, k + 1
            if k > first:
                vcpus = {page[2] for page in chunk[first:k]}
                self.log.emit(Kind.SEAMCALL, flow=job.flow, corr=job.corr, td=td.index,
                              lp=job.lp, leaf=leaf, vcpu=vcpus.pop() if len(vcpus) == 1 else None,
                              status=SUCCESS, arg0=chunk[first][3], arg1=k - first,
                              dur=t - self.sim.now)
                yield life.sleep(t - self.sim.now)
            if preset is not None:
                kind, key, vcpu, pfn = chunk[k]
                status = yield life.call(job, leaf, partial(reclaim, mtd, kind, key), vcpu=vcpu,
                                         arg0=pfn, preset=preset)
                self._leak(job, leaf, status, kind)
                failed, k = failed or status, k + 1
        return failed

    def _leak(self, job: Job, leaf: int, status: int, kind: P) -> None:
        """A page KVM gave up on is leaked (it stays the TD's). Whether the VM is bugged
        depends on who asked: a private page goes through the TDP MMU, whose
        remove_external_spte() does KVM_BUG_ON on the error; an S-EPT page
        (tdx_sept_free_private_spt(), a WARN in handle_removed_pt()) and a control page
        (tdx_reclaim_control_page(), the TDR) fail in __tdx_reclaim_page(), whose
        TDX_BUG_ON_3(..., NULL) has no VM to bug: a WARN and a leak."""
        self.log.count("pages_leaked")
        self.log.count("teardown_pages_leaked")
        if kind == P.PRIVATE:
            self.life.bug(job, leaf, status)
        else:
            self.world.note(f"TDX_BUG_ON: TD {job.td.index}: {leaf_name(leaf)} of a "
                            f"{kind.name} page returned {status:#x}: page leaked")
