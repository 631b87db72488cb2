"""The TDX module model: TD state, TLB epochs, try-locks, S-EPT entries, zero-step tracking.

Rules follow tdx-reference.md §5.1 (zero-step), §6.2 (who takes which lock), §6.4 (TLB epochs).
A SEAMCALL's outcome is decided when it starts; its locks are held for its whole duration
(``until``). Deviation, on purpose: state changes apply at the start, not the end, of a call.
Other calls cannot observe the difference because the entry/tree locks are held for the whole
interval and make them fail with OPERAND_BUSY instead.

Teardown leaves (VP.FLUSH, VPFLUSHDONE, CACHE.WB, FREEID, RECLAIM) live in
:mod:`tdxtrace.sim.module_teardown`; both work on the state of :mod:`.module_state`.
"""

from __future__ import annotations

from tdxtrace.codes import (
    EPF_GPA_LIST_SIZE,
    STEPPING_EPF_THRESHOLD,
    ExitReason,
    Leaf,
    OperandId,
    Status,
    with_operand,
)
from tdxtrace.events import SeptState
from tdxtrace.sim.locks import Holder, SharexLock
from tdxtrace.sim.module_state import (
    Busy,
    ModuleTd,
    SeptEntry,
    nonleaf_keys,
)

BUSY = int(Status.OPERAND_BUSY)
SUCCESS = int(Status.SUCCESS)
EPT_VIOLATION = int(ExitReason.EPT_VIOLATION)
MAPPED_STATES = (SeptState.MAPPED, SeptState.PENDING)


# Enum members as module globals: a class attribute lookup on an Enum costs ~70 ns,
# which the hot paths below pay many times per event.
_OPERANDID_RCX = OperandId.RCX
_SEPTSTATE_BLOCKED = SeptState.BLOCKED
_SEPTSTATE_FREE = SeptState.FREE
_SEPTSTATE_MAPPED = SeptState.MAPPED
_SEPTSTATE_PENDING = SeptState.PENDING
_SEPTSTATE_PENDING_BLOCKED = SeptState.PENDING_BLOCKED
_STATUS_EPT_ENTRY_FREE = Status.EPT_ENTRY_FREE
_STATUS_EPT_ENTRY_NOT_FREE = Status.EPT_ENTRY_NOT_FREE
_STATUS_EPT_ENTRY_STATE_INCORRECT = Status.EPT_ENTRY_STATE_INCORRECT
_STATUS_EPT_WALK_FAILED = Status.EPT_WALK_FAILED
_STATUS_GPA_RANGE_ALREADY_BLOCKED = Status.GPA_RANGE_ALREADY_BLOCKED
_STATUS_GPA_RANGE_NOT_BLOCKED = Status.GPA_RANGE_NOT_BLOCKED
_STATUS_OPERAND_BUSY_HOST_PRIORITY = Status.OPERAND_BUSY_HOST_PRIORITY
_STATUS_PAGE_ALREADY_ACCEPTED = Status.PAGE_ALREADY_ACCEPTED
_STATUS_PREVIOUS_TLB_EPOCH_BUSY = Status.PREVIOUS_TLB_EPOCH_BUSY
_STATUS_TLB_TRACKING_NOT_DONE = Status.TLB_TRACKING_NOT_DONE
_STATUS_VCPU_ASSOCIATED = Status.VCPU_ASSOCIATED


class TdxModule:
    """SEAMCALL semantics. Methods take the call's start time and end time (``until``)."""

    def __init__(self) -> None:
        self.tds: list[ModuleTd] = []
        self.last_busy: Busy | None = None  # set by a method that returned OPERAND_BUSY

    def _busy(self, lock: SharexLock, holder: Holder) -> int:
        status = with_operand(BUSY, lock.operand)
        self.last_busy = Busy(status, holder)
        return status

    def _take(self, lock: SharexLock, now: int, until: int, exclusive: bool,
              me: Holder) -> int:
        held_by = lock.try_take(now, until, exclusive, me)
        if held_by is not None:
            return self._busy(lock, held_by)
        return SUCCESS

    def _take_td(self, td: ModuleTd, lock: SharexLock, exclusive: bool, now: int, until: int,
                 me: Holder) -> int:
        """TDR shared, then ``lock``: what every TD-scope TDH.MEM.* call takes first (§6.2).
        On a conflict the call releases what it took (the module's error path)."""
        tdr = td.tdr
        before = tdr.snapshot()
        held_by = tdr.try_take(now, until, False, me)
        if held_by is not None:
            return self._busy(tdr, held_by)
        held_by = lock.try_take(now, until, exclusive, me)
        if held_by is not None:
            tdr.restore(before)
            return self._busy(lock, held_by)
        return SUCCESS

    def _take_leaf(self, td: ModuleTd, gfn: int, tree_exclusive: bool, now: int, until: int,
                   me: Holder) -> tuple[int, SeptEntry]:
        """TDR, the S-EPT tree, then the leaf's entry lock: a TDH.MEM.* call on one 4K GPA."""
        # td.entry() and the lock takes inlined: every fault and zap SEAMCALL comes here.
        entry = td.entries.get(gfn)
        if entry is None:
            entry = td.entries[gfn] = SeptEntry()
        tdr, tree = td.tdr, td.sept_tree
        # A conflict releases what the call took so far (the module's error path).
        tdr_before, tree_before = tdr.snapshot(), tree.snapshot()
        held_by = tdr.try_take(now, until, False, me)
        if held_by is not None:
            return self._busy(tdr, held_by), entry
        held_by = tree.try_take(now, until, tree_exclusive, me)
        if held_by is not None:
            tdr.restore(tdr_before)
            return self._busy(tree, held_by), entry
        if entry.lock_until > now:
            tdr.restore(tdr_before)
            tree.restore(tree_before)
            self.last_busy = Busy(with_operand(BUSY, _OPERANDID_RCX), entry.lock_holder)
            return self.last_busy.status, entry
        entry.lock_until = until
        entry.lock_holder = me
        return SUCCESS, entry

    # --- S-EPT building (fault path) -------------------------------------------------------
    def sept_add(self, td: ModuleTd, key: tuple[int, int], now: int, until: int,
                 me: Holder) -> int:
        status = self._take_td(td, td.sept_tree, False, now, until, me)
        if status:
            return status
        if key in td.nonleaf:
            return with_operand(int(_STATUS_EPT_ENTRY_NOT_FREE), _OPERANDID_RCX)
        td.nonleaf.add(key)
        return SUCCESS

    def page_aug(self, td: ModuleTd, gfn: int, now: int, until: int, me: Holder) -> int:
        if not td.nonleaf.issuperset(nonleaf_keys(gfn)):  # C-level, not a generator
            return with_operand(int(_STATUS_EPT_WALK_FAILED), _OPERANDID_RCX)
        status, entry = self._take_leaf(td, gfn, False, now, until, me)
        if status:
            return status
        if entry.state != _SEPTSTATE_FREE:
            return with_operand(int(_STATUS_EPT_ENTRY_NOT_FREE), _OPERANDID_RCX)
        entry.state = _SEPTSTATE_PENDING
        return SUCCESS

    # --- removal (zap path): BLOCK -> TRACK -> REMOVE ----------------------------------------
    def range_block(self, td: ModuleTd, gfn: int, now: int, until: int, me: Holder) -> int:
        status, entry = self._take_leaf(td, gfn, True, now, until, me)
        if status:
            return status
        if entry.state == _SEPTSTATE_FREE:
            return with_operand(int(_STATUS_EPT_ENTRY_FREE), _OPERANDID_RCX)
        if entry.state in (_SEPTSTATE_BLOCKED, _SEPTSTATE_PENDING_BLOCKED):
            return int(_STATUS_GPA_RANGE_ALREADY_BLOCKED)
        entry.state = (_SEPTSTATE_PENDING_BLOCKED if entry.state == _SEPTSTATE_PENDING
                       else _SEPTSTATE_BLOCKED)
        entry.bepoch = td.epoch
        return SUCCESS

    def track(self, td: ModuleTd, now: int, until: int, me: Holder) -> int:
        status = self._take_td(td, td.epoch_lock, True, now, until, me)
        if status:
            return status
        if td.refcount[(td.epoch - 1) & 1]:
            return int(_STATUS_PREVIOUS_TLB_EPOCH_BUSY)
        td.epoch += 1
        return SUCCESS

    def page_remove(self, td: ModuleTd, gfn: int, now: int, until: int, me: Holder) -> int:
        status, entry = self._take_leaf(td, gfn, False, now, until, me)
        if status:
            return status
        if entry.state not in (_SEPTSTATE_BLOCKED, _SEPTSTATE_PENDING_BLOCKED):
            return with_operand(int(_STATUS_GPA_RANGE_NOT_BLOCKED), _OPERANDID_RCX)
        tracked = entry.bepoch < td.epoch - 1 or (
            entry.bepoch == td.epoch - 1 and td.refcount[entry.bepoch & 1] == 0)
        if not tracked:
            return with_operand(int(_STATUS_TLB_TRACKING_NOT_DONE), _OPERANDID_RCX)
        entry.state = _SEPTSTATE_FREE
        entry.bepoch = -1
        return SUCCESS

    # --- guest side -----------------------------------------------------------------------
    def guest_accept(self, td: ModuleTd, gfn: int, now: int, until: int, me: Holder) -> int:
        """TDG.MEM.PAGE.ACCEPT; the host has priority on the entry lock (§6.1)."""
        entry = td.entry(gfn)
        if entry.lock_until > now:
            return int(_STATUS_OPERAND_BUSY_HOST_PRIORITY)
        if entry.state == _SEPTSTATE_MAPPED:
            return int(_STATUS_PAGE_ALREADY_ACCEPTED)
        if entry.state != _SEPTSTATE_PENDING:
            return with_operand(int(_STATUS_EPT_ENTRY_STATE_INCORRECT), _OPERANDID_RCX)
        entry.lock_until = until
        entry.lock_holder = me
        entry.state = _SEPTSTATE_MAPPED
        return SUCCESS

    # --- VP.ENTER and TD exit ---------------------------------------------------------------
    def vp_enter(self, td: ModuleTd, vcpu: int, lp: int, rip: int, now: int, until: int,
                 me: Holder) -> tuple[int, int | None]:
        """Returns (status, synthesized GPA). Status SUCCESS with a GPA: an emulated exit 48."""
        mv = td.vcpus[vcpu]
        if mv.assoc_lp not in (-1, lp):
            return int(_STATUS_VCPU_ASSOCIATED), None
        tdr, epoch = td.tdr, td.epoch_lock
        tdr_before, epoch_before = tdr.snapshot(), epoch.snapshot()
        status = self._take_td(td, epoch, False, now, until, me)
        if status:
            return status, None
        if mv.assoc_lp == -1:
            mv.assoc_lp = lp
            td.num_assoc += 1
        if mv.zs_gpas:
            # Zero-step enforcement: the S-EPT tree lock, exclusively, before entering. BUSY
            # on it releases the TDR and the epoch again (the association stays).
            tree = td.sept_tree
            tree_before = tree.snapshot()
            status = self._take(tree, now, until, True, me)
            if status:
                tdr.restore(tdr_before)
                epoch.restore(epoch_before)
                return status, None
            for gpa in mv.zs_gpas:
                if td.entry(gpa >> 12).state not in MAPPED_STATES:
                    # §5.1: release the tree lock, then emulate an EPT-violation TD exit.
                    tree.restore(tree_before)
                    return SUCCESS | EPT_VIOLATION, gpa
        td.refcount[td.epoch & 1] += 1
        mv.in_guest = True
        mv.entered_epoch = td.epoch
        mv.rip_on_entry = rip
        return SUCCESS, None

    def td_exit(self, td: ModuleTd, vcpu: int, rip: int, private_ept_gpa: int | None
                ) -> tuple[bool, bool, int]:
        """A real TD exit. Returns (armed_now, reset, list length after appending the GPA, or
        0 if none was appended) for the zero-step truth rows."""
        mv = td.vcpus[vcpu]
        if mv.in_guest:
            td.refcount[mv.entered_epoch & 1] -= 1
            mv.in_guest = False
        reset = False
        if rip != mv.rip_on_entry and (mv.zs_count or mv.zs_gpas):
            # Only a reset of an armed vCPU is worth a truth row ("disarmed").
            reset = mv.zs_count >= STEPPING_EPF_THRESHOLD
            mv.zs_count = 0
            mv.zs_gpas.clear()
        if private_ept_gpa is None:
            return False, reset, 0
        if mv.zs_count < STEPPING_EPF_THRESHOLD:
            mv.zs_count += 1
            return mv.zs_count == STEPPING_EPF_THRESHOLD, reset, 0
        if private_ept_gpa not in mv.zs_gpas and len(mv.zs_gpas) < EPF_GPA_LIST_SIZE:
            mv.zs_gpas.append(private_ept_gpa)
            return False, reset, len(mv.zs_gpas)
        return False, reset, 0


SEAMCALL_LEAVES_USING_GPA = frozenset({
    Leaf.TDH_MEM_SEPT_ADD, Leaf.TDH_MEM_PAGE_AUG, Leaf.TDH_MEM_RANGE_BLOCK,
    Leaf.TDH_MEM_PAGE_REMOVE, Leaf.TDH_MEM_PAGE_ADD,
})
