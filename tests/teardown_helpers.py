"""Hand-built teardown traces for the teardown_latency tests: the rows of one TD's teardown,
timed as the emulator would time them."""

from __future__ import annotations

from typing import Any

from tdxtrace.codes import Leaf, Status
from tdxtrace.events import Flow, IpiPurpose, KickReason, Kind, Phase


class Teardown:
    """Writes the rows of one TD's teardown, advancing a clock as the emulator would."""

    def __init__(self, rows: list[dict[str, Any]], td: int, start_ns: int) -> None:
        self.rows, self.td, self.now, self.corr = rows, td, start_ns, 1000 + td
        self.open: dict[Phase, int] = {}

    def row(self, kind: Kind, dur: int = 0, **cols: Any) -> None:
        self.rows.append({"kind": kind, "ts_ns": self.now, "dur_ns": dur, "flow": Flow.TEARDOWN,
                          "corr": self.corr, "td": self.td, **cols})
        self.now += dur

    def call(self, leaf: Leaf, dur: int, status: int = 0, **cols: Any) -> None:
        self.row(Kind.SEAMCALL, dur, leaf=leaf, status=status, **cols)

    def phase(self, phase: Phase, work: int | None = None) -> None:
        self.open[phase] = self.now
        self.row(Kind.PHASE, sub=phase, arg0=work)

    def done(self, phase: Phase, status: int = 0) -> None:
        self.row(Kind.PHASE_DONE, sub=phase, status=status)
        self.rows[-1]["dur_ns"] = self.now - self.open.pop(phase)

    def zap_pages(self, pages: int, per_page_ns: int, *, announce: bool = True,
                  batch: int | None = None) -> None:
        """Late HKID release: BLOCK, TRACK, kick, REMOVE, WBINVD per page (or per batch)."""
        self.phase(Phase.PRIVATE_PAGES, pages if announce else None)
        step = per_page_ns // 4 * (batch or 1)
        for page in range(0, pages, batch or 1):
            gpa = 0x1000 * page
            self.call(Leaf.TDH_MEM_RANGE_BLOCK, step, gpa=gpa, level=0, arg1=batch)
            self.call(Leaf.TDH_MEM_TRACK, step, arg1=batch)
            self.row(Kind.KICK, sub=KickReason.TRACK, arg0=2)
            self.call(Leaf.TDH_MEM_PAGE_REMOVE, step, gpa=gpa, level=0, arg1=batch)
            self.call(Leaf.TDH_PHYMEM_PAGE_WBINVD, step, arg1=batch)
        self.done(Phase.PRIVATE_PAGES)

    def flush_vcpus(self) -> None:
        self.phase(Phase.VP_FLUSH, 2)
        self.row(Kind.IPI, 40, sub=IpiPurpose.VP_FLUSH, lp=1, arg0=0, td=None)
        self.call(Leaf.TDH_VP_FLUSH, 300, vcpu=0, lp=1)
        self.call(Leaf.TDH_VP_FLUSH, 200, vcpu=1, lp=0)  # last ran here: no IPI
        self.done(Phase.VP_FLUSH)

    def release_hkid(self, *, wb_resumes: int = 0, flushvp_not_done: bool = False,
                     resends: int = 0) -> None:
        """``resends``: VPFLUSHDONE fails that often first, each time after flushing every
        vCPU again (the resend_flush loop: each attempt is its own VPFLUSHDONE phase)."""
        self.phase(Phase.RELEASE_HKID)
        self.flush_vcpus()
        for _ in range(resends):
            self.phase(Phase.VPFLUSHDONE)
            self.call(Leaf.TDH_MNG_VPFLUSHDONE, 100, Status.FLUSHVP_NOT_DONE)
            self.done(Phase.VPFLUSHDONE, Status.FLUSHVP_NOT_DONE)
            self.flush_vcpus()
        self.phase(Phase.VPFLUSHDONE)
        if flushvp_not_done:
            self.call(Leaf.TDH_MNG_VPFLUSHDONE, 100, Status.FLUSHVP_NOT_DONE)
            self.done(Phase.VPFLUSHDONE, Status.FLUSHVP_NOT_DONE)
            self.done(Phase.RELEASE_HKID, Status.FLUSHVP_NOT_DONE)
            return
        self.call(Leaf.TDH_MNG_VPFLUSHDONE, 100)
        self.done(Phase.VPFLUSHDONE)
        self.phase(Phase.CACHE_WB, 2)
        for resume in range(wb_resumes):
            self.call(Leaf.TDH_PHYMEM_CACHE_WB, 1000, Status.INTERRUPTED_RESUMABLE, lp=0,
                      arg0=int(resume > 0))
        self.call(Leaf.TDH_PHYMEM_CACHE_WB, 1000, lp=0, arg0=int(wb_resumes > 0))
        self.call(Leaf.TDH_PHYMEM_CACHE_WB, 1000, lp=2, arg0=0)
        self.done(Phase.CACHE_WB)
        self.phase(Phase.KEY_FREEID)
        self.call(Leaf.TDH_MNG_KEY_FREEID, 50)
        self.done(Phase.KEY_FREEID)
        self.done(Phase.RELEASE_HKID)

    def reclaim_control_pages(self) -> None:
        self.phase(Phase.RECLAIM_SEPT, 3)
        self.call(Leaf.TDH_PHYMEM_PAGE_RECLAIM, 300, arg1=3)  # one row standing for 3 calls
        self.done(Phase.RECLAIM_SEPT)
        self.phase(Phase.RECLAIM_VCPU, 2)
        self.call(Leaf.TDH_PHYMEM_PAGE_RECLAIM, 100, vcpu=0)
        self.call(Leaf.TDH_PHYMEM_PAGE_RECLAIM, 100, vcpu=1)
        self.done(Phase.RECLAIM_VCPU)
        self.phase(Phase.RECLAIM_TD, 2)
        self.call(Leaf.TDH_PHYMEM_PAGE_RECLAIM, 100)  # TDCS
        self.call(Leaf.TDH_PHYMEM_PAGE_RECLAIM, 100)  # TDR
        self.call(Leaf.TDH_PHYMEM_PAGE_WBINVD, 60)
        self.done(Phase.RECLAIM_TD)

    def reclaim_pages(self, pages: int, per_page_ns: int, batch: int) -> None:
        """Early HKID release: one RECLAIM per private page, batched ``batch`` to a row."""
        self.phase(Phase.PRIVATE_PAGES, pages)
        for _ in range(pages // batch):
            self.call(Leaf.TDH_PHYMEM_PAGE_RECLAIM, per_page_ns * batch, arg1=batch)
        self.done(Phase.PRIVATE_PAGES)

    def full(self, pages: int, per_page_ns: int, early: bool = False, **release: Any) -> None:
        self.phase(Phase.TEARDOWN)
        if early:
            self.release_hkid(**release)
            self.reclaim_pages(pages, per_page_ns, batch=4)
        else:
            self.zap_pages(pages, per_page_ns)
            self.release_hkid(**release)
        self.reclaim_control_pages()
        self.done(Phase.TEARDOWN)
