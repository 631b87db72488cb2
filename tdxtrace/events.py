"""The trace's own vocabulary: event kinds, KVM flows and per-kind sub-codes.

TDX codes (leaves, statuses, exit reasons, TDVMCALLs) live in :mod:`tdxtrace.codes`; this module
names what *tdxtrace* adds on top of them: which tracepoint-like event a row is, which KVM
operation it belongs to, and small enumerations carried in the ``sub`` column.

Every value here is part of trace format v1. Values are never renumbered; new ones are appended.
Kinds below 100 are **observable** (a real host could record them with tracepoints, kprobes or a
guest kernel trace); kinds from 100 up are **truth** rows (emulator-internal facts, for measuring
analyzers against ground truth). The ``truth`` column repeats that split so a reader can filter
without knowing the numbers.
"""

from __future__ import annotations

from enum import IntEnum

TRUTH_KIND_BASE = 100

# A guest TDCALL named where a SEAMCALL leaf is expected (a lock holder in T_LOCK_HOLDER):
# GUEST_LEAF_BASE + the TDCALL leaf, so TDG.MEM.PAGE.ACCEPT (6) never reads as PAGE.AUG (6).
GUEST_LEAF_BASE = 0x10000


class Kind(IntEnum):
    """What one row is. The column meanings per kind are documented in :mod:`tdxtrace.schema`."""

    # --- observable -------------------------------------------------------------------------
    SEAMCALL = 1  # a host SEAMCALL other than TDH.VP.ENTER (kprobe on the tdh_* wrapper)
    TD_ENTRY = 2  # kvm:kvm_entry, just before TDH.VP.ENTER
    TD_EXIT = 3  # kvm:kvm_exit, after TDH.VP.ENTER returned (also for VP.ENTER BUSY: reason -1u)
    PAGE_FAULT = 4  # kvm:kvm_page_fault, once per EPT violation before the local-retry loop
    FAULT_RETRY = 5  # one RET_PF_RETRY turn of the fault path (sub = RetryCause)
    FAULT_DONE = 6  # the fault handler returned (sub = FaultOutcome)
    SPTE_CHANGED = 7  # kvmmmu:kvm_tdp_mmu_spte_changed (arg0 old, arg1 new, arg2 root id)
    KICK = 8  # kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE) (sub = KickReason)
    IPI = 9  # smp_call_function_single / on_each_cpu_mask to run a SEAMCALL elsewhere
    TDVMCALL = 10  # a TDG.VP.VMCALL exit handled by KVM (arg0 sub-function, gpa R12, arg1 R13)
    TDVMCALL_DONE = 11  # KVM's answer to the guest (status = R10, arg0 = R11)
    USERSPACE_EXIT = 12  # kvm:kvm_userspace_exit: MapGPA chunk, or KVM_EXIT_MEMORY_FAULT
    USERSPACE_RETURN = 13  # userspace re-entered KVM_RUN; status = run->hypercall.ret (or 0)
    MEM_ATTR = 14  # KVM_SET_MEMORY_ATTRIBUTES by the VMM (gpa, arg0 pages, arg1 attributes)
    ZAP = 15  # a KVM zap operation begins (sub = ZapReason, gpa, arg0 pages, arg1 ZapScope)
    ZAP_DONE = 16  # that zap ended (arg0 = SPTEs zapped)
    PHASE = 17  # a TD creation/teardown phase begins (sub = Phase)
    PHASE_DONE = 18  # that phase ended (status = its first failure, if any)
    VM_BUGGED = 19  # KVM_BUG_ON: the VM is bugged (leaf + status of the SEAMCALL that did it)
    VCPU_LOAD = 20  # tdx_vcpu_load() on lp (arg0 = previous lp, or null)
    GUEST_ACCEPT = 21  # guest TDG.MEM.PAGE.ACCEPT (guest kernel trace; status = TDCALL status)
    GUEST_MAPGPA = 22  # guest tdx_map_gpa() step (guest kernel trace; sub = GuestMapGpa)
    ROOT = 23  # a TDP MMU root changes state (sub = RootEvent, arg2 = root id, arg0 = RootKind)

    # --- truth (emulator-internal) ----------------------------------------------------------
    T_ZERO_STEP_ARMED = 100  # the module armed zero-step for this vCPU (rip, gpa)
    T_ZERO_STEP_RESET = 101  # forward progress disarmed an armed vCPU's zero-step state
    T_ZERO_STEP_GPA = 102  # a GPA was appended to the vCPU's zero-step list (arg0 = length)
    T_LOCK_HOLDER = 103  # who held the lock behind a BUSY (sub operand id, arg0 lp, arg1 leaf)
    T_SEPT_STATE = 104  # reserved, not written: an S-EPT entry changed state
    T_PRIVATE_ZAP_UNEXPECTED = 105  # a private leaf zapped outside conversion/truncation
    T_SYNTHESIZED_EXIT = 106  # the module synthesized an EPT-violation exit (zero-step)


OBSERVABLE_KINDS = tuple(k for k in Kind if k < TRUTH_KIND_BASE)
TRUTH_KINDS = tuple(k for k in Kind if k >= TRUTH_KIND_BASE)


class Flow(IntEnum):
    """The KVM operation a row belongs to (column ``flow``)."""

    NONE = 0
    RUN = 1  # the vCPU run loop: VP.ENTER and its exits
    FAULT = 2  # private/shared EPT-violation handling
    ZAP = 3  # runtime zap of private leaves (conversion, hole punch, memslot, notifier)
    TEARDOWN = 4  # TD destruction (private-page reclaim, release HKID, control pages)
    CREATE = 5  # TD and vCPU creation, finalize
    MIGRATION = 6  # vCPU moving between logical processors (VP.FLUSH on the old LP)
    MAPGPA = 7  # TDVMCALL<MapGPA> handling and the VMM's answer


class RetryCause(IntEnum):
    """Why the fault path returned RET_PF_RETRY (``sub`` of FAULT_RETRY)."""

    FROZEN_SPTE = 1  # the mirror SPTE was FROZEN_SPTE: another vCPU is mid-update
    SEAMCALL_BUSY = 2  # SEPT.ADD / PAGE.AUG returned TDX_OPERAND_BUSY; SPTE restored
    MMU_LOCK = 3  # a zap held mmu_lock for write; the fault waited for it (not written)
    # is_page_fault_stale(): an invalidation (a zap, an attribute change) ended after the
    # fault read mmu_invalidate_seq, so the pfn it found may be the one just zapped
    STALE = 4


class FaultOutcome(IntEnum):
    """How a fault handler invocation ended (``sub`` of FAULT_DONE)."""

    MAPPED = 1  # this fault installed the leaf (PAGE.AUG succeeded)
    ALREADY_MAPPED = 2  # another vCPU mapped it first; nothing to do
    RESUME_GUEST = 3  # policy resume_guest: returned to the guest with the fault unresolved
    PENDING_EVENT = 4  # local retry left because kvm_vcpu_has_events()
    SIGNAL = 5  # local retry left because signal_pending()
    ERROR = 6  # the VM was bugged or the fault failed (-EIO)
    SHARED = 7  # a shared-GPA fault, handled in the direct root without SEAMCALLs
    MEMORY_FAULT_EXIT = 8  # the GFN's attribute is shared: KVM_EXIT_MEMORY_FAULT to userspace


class KickReason(IntEnum):
    """Why KVM kicked every vCPU out of guest mode (``sub`` of KICK)."""

    TRACK = 1  # tdx_track(): after TDH.MEM.TRACK, so vCPUs in the old epoch exit
    NO_VCPUS_RETRY = 2  # tdh_do_no_vcpus(): a BUSY zap SEAMCALL, before its one retry
    ROOT_RELOAD = 3  # root invalidation: vCPUs must load a new root
    VM_DEAD = 4  # kvm_vm_dead() after KVM_BUG_ON: vCPUs in the guest leave, never re-enter
    # kvm_flush_remote_tlbs() after a zap removed SPTEs from a valid root: with no TDX hook
    # it is kvm_make_all_cpus_request(KVM_REQ_TLB_FLUSH), a kick that waits for the acks
    TLB_FLUSH = 5


class IpiPurpose(IntEnum):
    """What an IPI asks the target LP to do (``sub`` of IPI)."""

    VP_FLUSH = 1
    CACHE_WB = 2
    KEY_CONFIG = 3


class ZapReason(IntEnum):
    """Why KVM zaps (``sub`` of ZAP)."""

    CONVERSION = 1  # KVM_SET_MEMORY_ATTRIBUTES after MapGPA (private -> shared)
    TRUNCATION = 2  # guest_memfd hole punch / truncation
    MEMSLOT = 3  # memslot deletion or flags update
    NOTIFIER = 4  # mmu_notifier invalidation (host mm change on shared memory)
    TEARDOWN = 5  # guest_memfd release during TD destruction (late HKID release)


class ZapScope(IntEnum):
    """What a zap covered (``arg1`` of ZAP). The policy ``zap_scope`` chooses it for memslot
    and notifier zaps; conversion and truncation zaps cover RANGE_LEAFS, teardown EVERYTHING."""

    RANGE_LEAFS = 1  # only the leaves of the changed range, in the roots that map it
    ALL_ROOTS = 2  # the changed range in every root, shared and mirror
    EVERYTHING = 3  # the big hammer: every SPTE of every root


class RootKind(IntEnum):
    MIRROR = 1  # the mirror root: private GPAs, propagated to the S-EPT
    DIRECT = 2  # the shared (direct) root: shared GPAs


class RootEvent(IntEnum):
    CREATED = 1
    INVALIDATED = 2  # marked invalid; vCPUs load a new root on their next entry
    FREED = 3  # last reference dropped


class Phase(IntEnum):
    """TD lifecycle phases (``sub`` of PHASE / PHASE_DONE)."""

    CREATE = 1  # MNG.CREATE .. VP.INIT for all vCPUs
    FINALIZE = 2  # MR.FINALIZE
    TEARDOWN = 10  # whole teardown: from the first private-page zap to the TDR WBINVD
    PRIVATE_PAGES = 11  # zap (late) or reclaim (early) of every private page
    RELEASE_HKID = 12  # tdx_mmu_release_hkid(): flush, VPFLUSHDONE, CACHE.WB, FREEID
    VP_FLUSH = 13  # VP.FLUSH of every vCPU on its last LP
    VPFLUSHDONE = 14  # TDH.MNG.VPFLUSHDONE (with retries)
    CACHE_WB = 15  # TDH.PHYMEM.CACHE.WB on one LP per package (with resumes)
    KEY_FREEID = 16  # TDH.MNG.KEY.FREEID
    RECLAIM_SEPT = 17  # RECLAIM of non-leaf S-EPT pages
    RECLAIM_VCPU = 18  # RECLAIM of TDCX and TDVPR pages
    RECLAIM_TD = 19  # RECLAIM of TDCS pages, the TDR, WBINVD of the TDR


class GuestMapGpa(IntEnum):
    """Guest-side MapGPA steps, as the guest kernel's tdx_map_gpa() sees them."""

    START = 1  # a conversion begins (gpa = start, arg0 = end, arg1 = 1 for ->private)
    RETRY_PROGRESS = 2  # RETRY with start < R11 < end: budget reset (arg0 = R11)
    RETRY_NO_PROGRESS = 3  # RETRY with R11 == start: one of the budget used (arg0 = R11)
    GIVE_UP = 4  # max_retries_per_page consecutive no-progress RETRYs
    BAD_R11 = 5  # R11 outside [start, end): fail at once (arg0 = R11)
    DONE = 6  # SUCCESS
    FAILED = 7  # a non-RETRY error status


class SeptState(IntEnum):
    """S-EPT entry states the emulator's module model tracks (truth rows only)."""

    FREE = 0
    PENDING = 1  # AUGed, not yet accepted by the guest
    MAPPED = 2  # accepted (or PAGE.ADDed)
    BLOCKED = 3  # RANGE.BLOCK done, waiting for TRACK + REMOVE
    PENDING_BLOCKED = 4  # blocked before the guest accepted it
    REMOVED = 5  # PAGE.REMOVE done (the entry is FREE again; the page goes to the host)


SUB_ENUMS: dict[Kind, type[IntEnum]] = {
    Kind.FAULT_RETRY: RetryCause,
    Kind.FAULT_DONE: FaultOutcome,
    Kind.KICK: KickReason,
    Kind.IPI: IpiPurpose,
    Kind.ZAP: ZapReason,
    Kind.ZAP_DONE: ZapReason,
    Kind.PHASE: Phase,
    Kind.PHASE_DONE: Phase,
    Kind.GUEST_MAPGPA: GuestMapGpa,
    Kind.ROOT: RootEvent,
    Kind.SPTE_CHANGED: RootKind,
    Kind.T_SEPT_STATE: SeptState,
}


def sub_name(kind: int, sub: int) -> str:
    """Display name of a ``sub`` value in the context of its row's kind."""
    enum = SUB_ENUMS.get(Kind(kind)) if kind in Kind._value2member_map_ else None
    if enum is None or sub not in enum._value2member_map_:
        return str(sub)
    return enum(sub).name.lower()


def kind_name(kind: int) -> str:
    """Display name of a kind, or its number when unknown (e.g. from a newer producer)."""
    if kind in Kind._value2member_map_:
        return Kind(kind).name.lower()
    return f"kind_{kind}"
