"""The TDX module's TD-lifecycle leaves: creation, HKID release and page reclaim.

Works on the same :class:`~tdxtrace.sim.module.ModuleTd` state as :mod:`.module` and adds what
only these leaves need: the Key Owner Table lock (KOT, operand 0xBA), the per-package WB-cache
mutex (0xBC), the TD's control pages (TDCS, TDVPR/TDCX) and its ``wbinvd_bitmap``. Rules from
tdx-reference.md §4(c) (module side of teardown), §4(d) (VP.FLUSH) and §6.2 (who locks what):

* VPFLUSHDONE needs ``num_assoc_vcpus == 0`` (else FLUSHVP_NOT_DONE); TD -> BLOCKED, every
  package's bit set in ``wbinvd_bitmap``. TDR + KOT exclusive.
* CACHE.WB: WB mutex of its package exclusive, KOT shared. The write-back of a package is
  ``cache_wb_blocks`` sub-blocks; the module checks for a pending interrupt after each and the
  model assumes one is always pending (the flush of a whole package cache outlasts a tick), so
  a call does one sub-block and returns INTERRUPTED_RESUMABLE while blocks remain; KVM resumes
  with RCX = 1. A resume without an interrupted flush is WBCACHE_RESUME_ERROR.
* KEY.FREEID needs BLOCKED and ``wbinvd_bitmap == 0`` (else WBCACHE_NOT_COMPLETE); -> TEARDOWN.
* PAGE.RECLAIM of a TD page needs TEARDOWN (else LIFECYCLE_STATE_INCORRECT); of the TDR, no
  child page left (else TD_ASSOCIATED_PAGES_EXIST).
* VP.FLUSH on an LP the vCPU is not associated with: VCPU_NOT_ASSOCIATED.

Like :mod:`.module`, a call's outcome is decided when it starts and its locks are held until
``until``.
"""

from __future__ import annotations

from tdxtrace.codes import OperandId, Status
from tdxtrace.events import SeptState
from tdxtrace.sim.locks import Holder, LockState, SharexLock
from tdxtrace.sim.module import SUCCESS, TdxModule
from tdxtrace.sim.module_state import ModuleTd, PageKey, PageKind, TdControl, TdLifecycle

# Control-page counts a 1.5 module reports in its global metadata (tdcs_base_size and
# tdvps_base_size / PAGE_SIZE); KVM adds exactly these many pages (reference §4(c)).
TDCS_PAGES = 4
TDVPS_PAGES = 6  # the TDVPR page and 5 TDCX pages

LIFECYCLE_INCORRECT = int(Status.LIFECYCLE_STATE_INCORRECT)
NOT_THIS_PAGE = int(Status.PAGE_METADATA_INCORRECT)  # the page is not what the caller says


class LifecycleLeaves:
    """SEAMCALL semantics of MNG.*, VP.CREATE/ADDCX/INIT/FLUSH, CACHE.WB, FREEID, RECLAIM."""

    def __init__(self, module: TdxModule, packages: int, cache_wb_blocks: int) -> None:
        self.module = module
        self.packages = packages
        self.cache_wb_blocks = cache_wb_blocks
        self.kot = SharexLock(OperandId.KOT)
        self.wb_mutex = [SharexLock(OperandId.WBCACHE) for _ in range(packages)]
        self.wb_left = [0] * packages  # sub-blocks left of an interrupted flush, per package
        self.control: dict[int, TdControl] = {}

    def of(self, td: ModuleTd) -> TdControl:
        found = self.control.get(td.td)
        if found is None:
            found = self.control[td.td] = TdControl(
                vcpu_pages=[0] * len(td.vcpus), vcpu_ready=[False] * len(td.vcpus))
        return found

    def _take(self, locks: tuple[tuple[SharexLock, bool], ...], now: int, until: int,
              me: Holder) -> int:
        """Try-lock each (lock, exclusive) in order; the first conflict is the status, and
        the locks taken before it are released (the module's error path)."""
        taken: list[tuple[SharexLock, LockState]] = []
        for lock, exclusive in locks:
            before = lock.snapshot()
            status = self.module._take(lock, now, until, exclusive, me)
            if status:
                for held, state in taken:
                    held.restore(state)
                return status
            taken.append((lock, before))
        return SUCCESS

    # --- creation ---------------------------------------------------------------------------
    def mng_create(self, td: ModuleTd, now: int, until: int, me: Holder) -> int:
        """TDH.MNG.CREATE: the TDR becomes this TD's root; its HKID is recorded in the KOT."""
        status = self._take(((self.kot, True), (td.tdr, True)), now, until, me)
        if status:
            return status
        self.control[td.td] = TdControl(vcpu_pages=[0] * len(td.vcpus),
                                        vcpu_ready=[False] * len(td.vcpus))
        td.lifecycle = TdLifecycle.CREATED
        return SUCCESS

    def key_config(self, td: ModuleTd, package: int, now: int, until: int, me: Holder) -> int:
        """TDH.MNG.KEY.CONFIG on one LP of ``package``."""
        status = self._take(((td.tdr, True),), now, until, me)
        if status:
            return status
        ctl = self.of(td)
        if td.lifecycle != TdLifecycle.CREATED:
            return LIFECYCLE_INCORRECT
        if ctl.keys_on >> package & 1:
            return int(Status.KEY_CONFIGURED)
        ctl.keys_on |= 1 << package
        if ctl.keys_on == (1 << self.packages) - 1:
            td.lifecycle = TdLifecycle.KEYS_CONFIGURED
        return SUCCESS

    def mng_addcx(self, td: ModuleTd, now: int, until: int, me: Holder) -> int:
        status = self._take(((td.tdr, True),), now, until, me)
        if status:
            return status
        if td.lifecycle == TdLifecycle.CREATED:
            return int(Status.TD_KEYS_NOT_CONFIGURED)
        ctl = self.of(td)
        if td.lifecycle != TdLifecycle.KEYS_CONFIGURED or ctl.tdcs >= TDCS_PAGES:
            return LIFECYCLE_INCORRECT
        ctl.tdcs += 1
        return SUCCESS

    def mng_init(self, td: ModuleTd, now: int, until: int, me: Holder) -> int:
        status = self._take(((td.tdr, True),), now, until, me)
        if status:
            return status
        if td.lifecycle != TdLifecycle.KEYS_CONFIGURED or self.of(td).tdcs != TDCS_PAGES:
            return LIFECYCLE_INCORRECT
        td.lifecycle = TdLifecycle.INITIALIZED
        return SUCCESS

    def vp_create(self, td: ModuleTd, vcpu: int, now: int, until: int, me: Holder) -> int:
        status = self._take(((td.tdr, False),), now, until, me)
        if status:
            return status
        ctl = self.of(td)
        if td.lifecycle != TdLifecycle.INITIALIZED:
            return LIFECYCLE_INCORRECT
        if ctl.vcpu_pages[vcpu]:
            return int(Status.VCPU_STATE_INCORRECT)
        ctl.vcpu_pages[vcpu] = 1
        return SUCCESS

    def vp_addcx(self, td: ModuleTd, vcpu: int, now: int, until: int, me: Holder) -> int:
        status = self._take(((td.tdr, False),), now, until, me)
        if status:
            return status
        ctl = self.of(td)
        if not 1 <= ctl.vcpu_pages[vcpu] < TDVPS_PAGES:
            return int(Status.VCPU_STATE_INCORRECT)
        ctl.vcpu_pages[vcpu] += 1
        return SUCCESS

    def vp_init(self, td: ModuleTd, vcpu: int, lp: int, now: int, until: int,
                me: Holder) -> int:
        """TDH.VP.INIT on ``lp``, x2APIC version: TDR exclusive (why KVM holds mmu_lock for
        write). The vCPU is associated with ``lp`` and counted in num_assoc_vcpus
        (associate_vcpu_initial() in the module source; the reference names VP.ENTER only)."""
        status = self._take(((td.tdr, True),), now, until, me)
        if status:
            return status
        ctl = self.of(td)
        if ctl.vcpu_pages[vcpu] != TDVPS_PAGES or ctl.vcpu_ready[vcpu]:
            return int(Status.VCPU_STATE_INCORRECT)
        ctl.vcpu_ready[vcpu] = True
        td.vcpus[vcpu].assoc_lp = lp
        td.num_assoc += 1
        return SUCCESS

    def mr_finalize(self, td: ModuleTd, now: int, until: int, me: Holder) -> int:
        status = self._take(((td.tdr, True),), now, until, me)
        if status:
            return status
        if td.lifecycle != TdLifecycle.INITIALIZED:
            return LIFECYCLE_INCORRECT
        td.lifecycle = TdLifecycle.RUNNABLE
        return SUCCESS

    # --- HKID release -----------------------------------------------------------------------
    def vp_flush(self, td: ModuleTd, vcpu: int, lp: int, now: int, until: int,
                 me: Holder) -> int:
        """TDH.VP.FLUSH on ``lp``: INVEPT + VMCLEAR there, then the vCPU is dissociated."""
        status = self._take(((td.tdr, False),), now, until, me)
        if status:
            return status
        mv = td.vcpus[vcpu]
        if mv.assoc_lp != lp:
            return int(Status.VCPU_NOT_ASSOCIATED)
        mv.assoc_lp = -1
        td.num_assoc -= 1
        return SUCCESS

    def vpflushdone(self, td: ModuleTd, now: int, until: int, me: Holder) -> int:
        status = self._take(((td.tdr, True), (self.kot, True)), now, until, me)
        if status:
            return status
        if td.lifecycle >= TdLifecycle.BLOCKED:
            return LIFECYCLE_INCORRECT
        if td.num_assoc:
            return int(Status.FLUSHVP_NOT_DONE)
        td.lifecycle = TdLifecycle.BLOCKED
        self.of(td).wbinvd_bitmap = (1 << self.packages) - 1
        return SUCCESS

    def cache_wb(self, package: int, resume: bool, now: int, until: int, me: Holder) -> int:
        """TDH.PHYMEM.CACHE.WB on an LP of ``package`` (one sub-block per call)."""
        status = self._take(((self.wb_mutex[package], True), (self.kot, False)), now, until, me)
        if status:
            return status
        bit = 1 << package
        if resume:
            if not self.wb_left[package]:
                return int(Status.WBCACHE_RESUME_ERROR)
        else:
            if not any(ctl.wbinvd_bitmap & bit for ctl in self._flushed()):
                return int(Status.NO_HKID_READY_TO_WBCACHE)
            self.wb_left[package] = self.cache_wb_blocks
        self.wb_left[package] -= 1
        if self.wb_left[package]:
            return int(Status.INTERRUPTED_RESUMABLE)
        for ctl in self._flushed():  # every HKID in the flushed state, not only one TD's
            ctl.wbinvd_bitmap &= ~bit
        return SUCCESS

    def _flushed(self) -> list[TdControl]:
        """Control state of the TDs whose HKID is in the KOT's flushed state (TD_BLOCKED)."""
        return [self.of(td) for td in self.module.tds if td.lifecycle == TdLifecycle.BLOCKED]

    def key_freeid(self, td: ModuleTd, now: int, until: int, me: Holder) -> int:
        status = self._take(((td.tdr, True), (self.kot, True)), now, until, me)
        if status:
            return status
        if td.lifecycle != TdLifecycle.BLOCKED:
            return LIFECYCLE_INCORRECT
        if self.of(td).wbinvd_bitmap:
            return int(Status.WBCACHE_NOT_COMPLETE)
        td.lifecycle = TdLifecycle.TEARDOWN
        return SUCCESS

    def tdr_wbinvd(self, td: ModuleTd, now: int, until: int, me: Holder) -> int:
        """TDH.PHYMEM.PAGE.WBINVD of the reclaimed TDR, with the global TDX KeyID."""
        return SUCCESS if self.of(td).tdr_reclaimed else NOT_THIS_PAGE

    # --- reclaim ----------------------------------------------------------------------------
    def children(self, td: ModuleTd) -> int:
        """Pages the TD still owns besides its TDR (the module's TDR child count)."""
        ctl = self.of(td)
        live = sum(1 for e in td.entries.values() if e.state != SeptState.FREE)
        return ctl.tdcs + sum(ctl.vcpu_pages) + len(td.nonleaf) + live

    def reclaim(self, td: ModuleTd, kind: PageKind, key: PageKey, now: int, until: int,
                me: Holder) -> int:
        """TDH.PHYMEM.PAGE.RECLAIM of one page of ``td``."""
        status = self._take(((td.tdr, kind == PageKind.TDR),), now, until, me)
        if status:
            return status
        if td.lifecycle != TdLifecycle.TEARDOWN:
            return LIFECYCLE_INCORRECT
        ctl = self.of(td)
        if kind == PageKind.PRIVATE:
            entry = td.entries.get(key) if isinstance(key, int) else None
            if entry is None or entry.state == SeptState.FREE:
                return NOT_THIS_PAGE
            del td.entries[key]  # type: ignore[arg-type]
        elif kind == PageKind.SEPT:
            if key not in td.nonleaf:
                return NOT_THIS_PAGE
            td.nonleaf.discard(key)
        elif kind in (PageKind.TDCX, PageKind.TDVPR):
            assert isinstance(key, int)
            # TDCX pages go first; the TDVPR page is the vCPU's last.
            wanted_tdvpr = ctl.vcpu_pages[key] == 1
            if ctl.vcpu_pages[key] == 0 or wanted_tdvpr != (kind == PageKind.TDVPR):
                return NOT_THIS_PAGE
            ctl.vcpu_pages[key] -= 1
        elif kind == PageKind.TDCS:
            if not ctl.tdcs:
                return NOT_THIS_PAGE
            ctl.tdcs -= 1
        else:
            if ctl.tdr_reclaimed:
                return NOT_THIS_PAGE
            if self.children(td):
                return int(Status.TD_ASSOCIATED_PAGES_EXIST)
            ctl.tdr_reclaimed = True
        return SUCCESS
