"""The TDX module's state of each TD: lifecycle, S-EPT entries, vCPUs, locks, TLB epoch, and
what its lifecycle leaves track (control pages, caches to write back).

The SEAMCALLs that read and change it are in :mod:`tdxtrace.sim.module` (and the teardown
leaves in :mod:`tdxtrace.sim.module_teardown`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from tdxtrace.codes import OperandId
from tdxtrace.events import SeptState
from tdxtrace.sim.locks import Holder, SharexLock


class TdLifecycle(IntEnum):
    CREATED = 0  # MNG.CREATE done (HKID assigned)
    KEYS_CONFIGURED = 1
    INITIALIZED = 2  # MNG.INIT done, not finalized
    RUNNABLE = 3  # MR.FINALIZE done
    BLOCKED = 4  # VPFLUSHDONE done
    TEARDOWN = 5  # KEY.FREEID done: pages may be reclaimed


@dataclass(slots=True)  # slotted: read and written by every fault, zap and accept
class SeptEntry:
    """A leaf S-EPT entry (4K): its state, blocking epoch and entry lock."""

    state: SeptState = SeptState.FREE
    bepoch: int = -1
    lock_until: int = -1
    lock_holder: Holder = (-1, -1, -1)


@dataclass(slots=True)
class ModuleVcpu:
    assoc_lp: int = -1
    in_guest: bool = False
    entered_epoch: int = 0
    rip_on_entry: int = -1
    zs_count: int = 0  # possibly_epf_stepping
    zs_gpas: list[int] = field(default_factory=list)  # last_epf_gpa_list


@dataclass
class ModuleTd:
    td: int
    hkid: int
    lifecycle: TdLifecycle = TdLifecycle.CREATED
    tdr: SharexLock = field(default_factory=lambda: SharexLock(OperandId.TDR))
    epoch_lock: SharexLock = field(default_factory=lambda: SharexLock(OperandId.TD_EPOCH))
    sept_tree: SharexLock = field(default_factory=lambda: SharexLock(OperandId.SEPT_TREE))
    epoch: int = 1
    refcount: list[int] = field(default_factory=lambda: [0, 0])
    entries: dict[int, SeptEntry] = field(default_factory=dict)  # gfn -> leaf entry
    nonleaf: set[tuple[int, int]] = field(default_factory=set)  # (tdx level, index)
    vcpus: list[ModuleVcpu] = field(default_factory=list)
    num_assoc: int = 0

    def entry(self, gfn: int) -> SeptEntry:
        found = self.entries.get(gfn)
        if found is None:
            found = self.entries[gfn] = SeptEntry()
        return found


@dataclass(frozen=True)
class Busy:
    """An OPERAND_BUSY outcome and who held the lock (for truth rows)."""

    status: int
    holder: Holder


def nonleaf_keys(gfn: int) -> tuple[tuple[int, int], ...]:
    """The non-leaf S-EPT entries a 4K mapping of ``gfn`` needs, top level first."""
    return ((3, gfn >> 27), (2, gfn >> 18), (1, gfn >> 9))


class PageKind(IntEnum):
    """What a reclaimed page is; the module reads it from the PAMT, the model is told."""

    PRIVATE = 1  # guest memory (key: gfn)
    SEPT = 2  # a non-leaf S-EPT page (key: (tdx level, index))
    TDCX = 3  # a vCPU's TDCX page (key: vCPU index)
    TDVPR = 4  # a vCPU's root page (key: vCPU index)
    TDCS = 5
    TDR = 6


PageKey = int | tuple[int, int] | None


@dataclass
class TdControl:
    """Per-TD state of the lifecycle leaves that :class:`ModuleTd` does not carry."""

    keys_on: int = 0  # bitmap of packages where KEY.CONFIG programmed the HKID
    tdcs: int = 0  # TDCS pages added and not reclaimed
    vcpu_pages: list[int] = field(default_factory=list)  # TDVPR + TDCX pages per vCPU
    vcpu_ready: list[bool] = field(default_factory=list)  # VP.INIT done
    wbinvd_bitmap: int = 0  # packages whose caches still hold this HKID's lines
    tdr_reclaimed: bool = False
