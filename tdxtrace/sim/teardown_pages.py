"""The page work of TD teardown: zap or reclaim private pages, reclaim control pages.

Helper of :mod:`.lifecycle` (same conventions). In every phase the first
``teardown.row_pages`` pages get one row per SEAMCALL (late release: through
:class:`~.zap.ZapPath`, with SPTE_CHANGED rows); the rest are batched into rows of up to
BATCH_PAGES pages with ``arg1`` = pages and a duration that is the sum of the per-page costs,
sampled one by one. The module model still sees every page, one call at a time, so its rules
(BLOCK before TRACK before REMOVE, RECLAIM only in TD_TEARDOWN, ...) hold for batched pages too.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from tdxtrace.codes import Leaf
from tdxtrace.errors import ScenarioError
from tdxtrace.events import KickReason, Kind, Phase, RootKind, SeptState, ZapReason
from tdxtrace.sim.mmu import NONPRESENT, present_spte
from tdxtrace.sim.module import SUCCESS, SeptEntry, nonleaf_keys
from tdxtrace.sim.module_teardown import PageKey
from tdxtrace.sim.module_teardown import PageKind as P

if TYPE_CHECKING:
    from tdxtrace.sim.lifecycle import Job, Lifecycle
    from tdxtrace.sim.process import Process

Page = tuple[P, PageKey, int | None, int | None]  # kind, module key, vCPU, RCX page number
L = Leaf
BATCH_PAGES = 512  # pages one batched row stands for at most
PREPOPULATE_LIMIT_MB = 4096
KICK = -1  # the kick after TRACK, in the per-page order below
ZAP_ORDER = (L.TDH_MEM_RANGE_BLOCK, L.TDH_MEM_TRACK, KICK, L.TDH_MEM_PAGE_REMOVE,
             L.TDH_PHYMEM_PAGE_WBINVD)


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
        """PRIVATE_PAGES: zap every private leaf (HKID live) or reclaim it (HKID released)."""
        life, td = self.life, job.td
        gfns = sorted(td.mirror.leaves)
        start = life.phase(job, Phase.PRIVATE_PAGES, len(gfns))
        head, rest = gfns[:self.row_pages], gfns[self.row_pages:]
        status = SUCCESS
        if zap:
            if head:
                yield lambda done: self.world.zap.zap(td, head, ZapReason.TEARDOWN, job.flow,
                                                      lambda: done(None), corr=job.corr)
            for i in range(0, len(rest), BATCH_PAGES):
                if not td.bugged:  # like ZapPath: a bugged VM's zap stops
                    yield from self._zap_batch(job, rest[i:i + BATCH_PAGES])
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
            arg1 = self.world.policy.zap_scope_code
        else:
            arg1 = pages
        self.log.emit(kind, sub=ZapReason.TEARDOWN, flow=job.flow, corr=job.corr,
                      td=job.td.index, lp=job.lp, gpa=None if gfn is None else gfn << 12,
                      arg0=pages, arg1=arg1)

    def _zap_batch(self, job: Job, gfns: list[int]) -> Process:
        """BLOCK, TRACK + kick, REMOVE, WBINVD for each page; one row per leaf for them all."""
        life, td, module, costs = self.life, job.td, self.world.module, self.costs
        mtd = td.module
        calls: tuple[Callable[[int, int, int, tuple[int, int, int]], int], ...] = (
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
        steps = tuple(zip(range(5), samplers, calls, holders, strict=True))
        total, count = [0] * 5, [0] * 5
        failed = (-1, SUCCESS)
        yield life.mmu_write(td)
        t = self.sim.now
        for gfn in gfns:
            for i, sample, call, me in steps:
                d = sample()
                status = call(gfn, t, t + d, me)
                t += d
                total[i] += d
                count[i] += 1
                if status:
                    failed = (i, status)
                    break
            if failed[1]:
                break
            td.mirror.leaves.discard(gfn)
        zapped = count[4]
        self._zap_row(job, Kind.ZAP, gfns[0], len(gfns))
        for i, leaf in enumerate(ZAP_ORDER):
            if not count[i]:
                continue
            if leaf == KICK:
                self.log.emit(Kind.KICK, sub=KickReason.TRACK, flow=job.flow, corr=job.corr,
                              td=td.index, lp=job.lp, arg0=0, arg1=count[i], dur=total[i])
            else:
                gpa = None if leaf == L.TDH_MEM_TRACK else gfns[0] << 12
                self.log.emit(Kind.SEAMCALL, flow=job.flow, corr=job.corr, td=td.index,
                              lp=job.lp, leaf=leaf, gpa=gpa, level=None if gpa is None else 0,
                              status=failed[1] if i == failed[0] else SUCCESS,
                              arg1=count[i], dur=total[i])
            yield life.sleep(total[i])
        self.log.count("sptes_zapped", zapped)
        self._zap_row(job, Kind.ZAP_DONE, None, zapped)
        td.mmu.release_write()
        if failed[1]:
            life.bug(job, ZAP_ORDER[failed[0]], failed[1])

    def reclaim(self, job: Job, pages: list[Page]) -> Process:
        """PHYMEM.PAGE.RECLAIM of ``pages`` in order; private pages also leave the mirror."""
        life, td = self.life, job.td
        mtd, reclaim = td.module, life.leaves.reclaim
        leaf = L.TDH_PHYMEM_PAGE_RECLAIM
        for kind, key, vcpu, pfn in pages[:self.row_pages]:
            if kind == P.PRIVATE:
                gfn = int(key)  # type: ignore[arg-type]
                self.log.count("sptes_zapped")
                self.log.emit(Kind.SPTE_CHANGED, sub=RootKind.MIRROR, flow=job.flow,
                              corr=job.corr, td=td.index, gpa=gfn << 12, level=0,
                              arg0=present_spte(gfn, 0), arg1=NONPRESENT,
                              arg2=td.mirror.root_id)
            status = yield life.call(job, leaf, partial(reclaim, mtd, kind, key), vcpu=vcpu,
                                     arg0=pfn)
            if status:
                return life.bug(job, leaf, status)
            if kind == P.PRIVATE:
                td.mirror.leaves.discard(key)
        for i in range(self.row_pages, len(pages), BATCH_PAGES):
            chunk = pages[i:i + BATCH_PAGES]
            t, status, done = self.sim.now, SUCCESS, 0
            sample = self.costs.leaf_sampler(leaf)
            for kind, key, _, _ in chunk:
                d = sample()
                status = reclaim(mtd, kind, key, t, t + d, (job.lp, leaf, job.corr))
                t, done = t + d, done + 1
                if status:
                    break
                if kind == P.PRIVATE:
                    td.mirror.leaves.discard(key)
                    self.log.count("sptes_zapped")
            vcpus = {page[2] for page in chunk}
            self.log.emit(Kind.SEAMCALL, flow=job.flow, corr=job.corr, td=td.index, lp=job.lp,
                          leaf=leaf, vcpu=vcpus.pop() if len(vcpus) == 1 else None,
                          status=status, arg0=chunk[0][3], arg1=done, dur=t - self.sim.now)
            yield life.sleep(t - self.sim.now)
            if status:
                return life.bug(job, leaf, status)
        return SUCCESS
