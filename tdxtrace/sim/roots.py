"""KVM's TDP MMU roots of a TD and what memslot / mmu_notifier changes zap in them.

A TD has two kinds of roots (tdx-reference.md §4): the **mirror** root (private GPAs, propagated
to the S-EPT; modelled by :class:`~tdxtrace.sim.mmu.MirrorRoot`) and the **shared (direct)**
root (GPAs with the shared bit, an ordinary EPT: faults there need no SEAMCALL). This module
adds the direct root, its lifecycle (created on a vCPU's first entry, invalidated, reloaded by
every vCPU on its next entry, freed when its last reference drops), the shared fault path, and
the zaps the VMM causes (memslot changes, mmu_notifier invalidations) under the ``zap_scope``
policy (seed 004: "stop hitting everything with the big hammer"):

* ``range_leafs`` (mainline): only what the change requires. Both changes here concern shared
  memory (a notifier fires for the host mapping, which backs shared memory only; the VMM
  re-creates or re-flags the shared slot), so only the direct root's leaves in the range go;
* ``all_roots``: the range in every root, the mirror included (KVM before "only zap shared for
  mmu notifier"): private leaves in the range are zapped too;
* ``everything``: the big hammer (kvm_mmu_zap_all_fast): the direct root is invalidated and all
  of its SPTEs zapped, and every private leaf goes. Mirror non-leaves stay, as the S-EPT has no
  runtime SEPT.REMOVE.

A private leaf zapped by a memslot or notifier change makes the guest lose an accepted page: a
KVM bug for a TD. The model lets the wrong policy do it, with the real BLOCK/TRACK/REMOVE
sequence (:meth:`ZapPath.remove_leaf`), and marks each with a T_PRIVATE_ZAP_UNEXPECTED row.

Roots only exist (and ROOT rows only appear) when a scenario uses shared memory, memslot or
notifier changes, or MapGPA, so traces of scenarios that use none of them are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from tdxtrace.codes import EXIT_QUAL_GUEST_WRITE
from tdxtrace.events import (
    FaultOutcome,
    Flow,
    KickReason,
    Kind,
    RootEvent,
    RootKind,
    ZapReason,
    ZapScope,
)
from tdxtrace.sim.mmu import NONPRESENT, level_gpa, present_spte
from tdxtrace.sim.module_state import nonleaf_keys
from tdxtrace.sim.roots_guest import SHARED_BIT, SHARED_GFN, SharedMix
from tdxtrace.sim.roots_zap import RootZap

if TYPE_CHECKING:
    from tdxtrace.sim.kvm_state import KvmTd, Vcpu
    from tdxtrace.sim.scenario import Scenario
    from tdxtrace.sim.world import World

DIRECT = int(RootKind.DIRECT)
MIRROR = int(RootKind.MIRROR)
ZAP_FLOW = int(Flow.ZAP)
FAULT_FLOW = int(Flow.FAULT)
Done = Callable[[], None]


@dataclass
class DirectRoot:
    root_id: int
    leaves: set[int] = field(default_factory=set)  # gfns (shared bit stripped) mapped 4K
    nonleaf: set[tuple[int, int]] = field(default_factory=set)  # (level, index) of the GPA
    valid: bool = True
    refs: int = 1  # the root's own reference (until invalidated and zapped) + one per vCPU


@dataclass
class TdRoots:
    current: DirectRoot | None = None  # the valid direct root, None until a vCPU loads one
    live: list[DirectRoot] = field(default_factory=list)  # not yet freed, oldest first
    loaded: list[DirectRoot | None] = field(default_factory=list)  # per vCPU


class Roots:
    """Direct roots of every TD; installs its hooks into KVM when constructed."""

    @staticmethod
    def wanted(scenario: Scenario) -> bool:
        vmm = scenario.vmm
        return bool(scenario.guest.shared_fraction > 0 or vmm.memslot_interval_us
                    or vmm.notifier_interval_us or scenario.mapgpa.interval_us)

    def __init__(self, world: World) -> None:
        from tdxtrace.sim.world import PRIVATE_BASE_GFN  # world imports this module

        self.world = world
        self.sim, self.log, self.kvm = world.sim, world.log, world.kvm
        self.touch_ns = world.costs.base("guest_touch")
        guest, vmm = world.scenario.guest, world.scenario.vmm
        # The shared window (swiotlb-like buffers, its own memslot) follows private memory.
        self.window_gfn = PRIVATE_BASE_GFN + world.pages
        self.window_pages = int(guest.shared_pages)
        self.private_gfn = PRIVATE_BASE_GFN
        self.policy_scope = ZapScope(world.policy.zap_scope_code)
        self.notifier_pages = int(vmm.notifier_pages)
        self._next_id = 2 * len(world.tds) + 1  # ids 1..2n: each TD's first mirror/direct
        self._tds = [TdRoots(loaded=[None] * len(td.vcpus)) for td in world.tds]
        self._notifier_rng = world.rng.stream("vmm.notifier")
        self._private_fault = world.kvm.on_private_fault
        world.kvm.on_private_fault = self.on_ept_violation
        world.kvm.before_entry = self.before_entry
        self.log.count("shared_faults", 0)
        if guest.shared_fraction > 0:
            for td in world.tds:
                for v in td.vcpus:
                    rng = world.rng.stream(f"guest.shared.td{td.index}.vcpu{v.index}")
                    v.workload = SharedMix(v.workload, guest.shared_fraction,
                                           self.window_gfn | SHARED_GFN, self.window_pages, rng)

    def start(self) -> None:
        """Schedule the VMM's memslot changes and the host's mmu_notifier invalidations."""
        vmm = self.world.scenario.vmm
        for td in self.world.tds:
            if vmm.memslot_interval_us:
                self.sim.after(vmm.memslot_interval_us * 1000, self._memslot, td)
            if vmm.notifier_interval_us:
                self.sim.after(vmm.notifier_interval_us * 1000, self._notifier, td)

    # --- root lifecycle ---------------------------------------------------------------------
    def before_entry(self, v: Vcpu) -> None:
        """kvm_mmu_reload(): a vCPU whose root is invalid (or none) loads the valid one."""
        tr = self._tds[v.td.index]
        loaded, current = tr.loaded[v.index], tr.current
        if loaded is current and current is not None:
            return
        if current is None:
            current = self._create(v.td, tr)
        if loaded is not None:
            self.put(v.td, loaded, None)
        current.refs += 1
        tr.loaded[v.index] = current

    def _create(self, td: KvmTd, tr: TdRoots) -> DirectRoot:
        if not tr.live and not any(tr.loaded):  # the TD's first kvm_mmu_load(): both roots
            self._root_row(td, RootEvent.CREATED, MIRROR, td.mirror.root_id, None)
            root = DirectRoot(td.index * 2 + 2)
        else:
            root = DirectRoot(self._next_id)
            self._next_id += 1
        self._root_row(td, RootEvent.CREATED, DIRECT, root.root_id, None)
        tr.current = root
        tr.live.append(root)
        return root

    def put(self, td: KvmTd, root: DirectRoot, corr: int | None) -> None:
        """Drop one reference; the last one frees the root."""
        root.refs -= 1
        if root.refs == 0:
            self._tds[td.index].live.remove(root)
            self._root_row(td, RootEvent.FREED, DIRECT, root.root_id, corr)

    def invalidate(self, td: KvmTd, corr: int, then: Callable[[DirectRoot | None], None]) -> None:
        """Mark the direct root invalid and kick every vCPU so each reloads on next entry.

        The guest loses the root's pages now (kvm_mmu_zap_all_fast): a vCPU that reloads and
        touches one faults, before the obsolete root's SPTEs are torn down, and that fault is
        a refault of this zap.
        """
        tr = self._tds[td.index]
        root = tr.current
        if root is not None:
            root.valid = False
            tr.current = None
            td.zapped_gfns.update(gfn | SHARED_GFN for gfn in root.leaves)
            self._root_row(td, RootEvent.INVALIDATED, DIRECT, root.root_id, corr)
        self.kvm.kick_all(td, KickReason.ROOT_RELOAD, corr, ZAP_FLOW, td.vmm_lp,
                          lambda: then(root))

    def _root_row(self, td: KvmTd, event: RootEvent, kind: int, root_id: int,
                  corr: int | None) -> None:
        self.log.emit(Kind.ROOT, sub=event, flow=ZAP_FLOW if corr else 0, corr=corr,
                      td=td.index, lp=td.vmm_lp, arg0=kind, arg2=root_id)

    def loaded_root(self, v: Vcpu) -> DirectRoot | None:
        return self._tds[v.td.index].loaded[v.index]

    def live_roots(self, td: KvmTd) -> list[DirectRoot]:
        return list(self._tds[td.index].live)

    # --- the guest and the shared fault path ------------------------------------------------
    def guest_touch(self, v: Vcpu, token: int) -> bool:
        """A shared access: True (and the guest moves on) when the vCPU's root maps it."""
        root = self._tds[v.td.index].loaded[v.index]
        if root is None or (v.workload.current.gfn ^ SHARED_GFN) not in root.leaves:
            return False
        v.workload.advance()
        self.sim.after(self.touch_ns, self.world.guest_step, v, token)
        return True

    def on_ept_violation(self, v: Vcpu, gpa: int) -> None:
        if gpa & SHARED_BIT:
            self._shared_fault(v, gpa)
        else:
            self._private_fault(v, gpa)

    def _shared_fault(self, v: Vcpu, gpa: int) -> None:
        """Shared GPA: the direct root, no SEAMCALL, no local retry (§4(a) step 6)."""
        td = v.td
        if v.stopped or td.bugged:
            return
        corr = self.log.new_corr()
        self.log.count("faults")
        self.log.count("shared_faults")
        gfn = (gpa ^ SHARED_BIT) >> 12
        if gfn | SHARED_GFN in td.zapped_gfns:
            td.zapped_gfns.discard(gfn | SHARED_GFN)
            self.log.count("refaults")
        self.log.emit(Kind.PAGE_FAULT, flow=FAULT_FLOW, corr=corr, td=td.index, vcpu=v.index,
                      lp=v.lp, gpa=gpa, rip=v.rip(), arg0=EXIT_QUAL_GUEST_WRITE)
        walk = self.world.costs.step("mmu_walk")
        seq = td.mmu_invalidate_seq  # the fault's mmu_seq, read before it takes mmu_lock
        td.mmu.acquire_read(lambda: self.sim.after(walk, self._map_shared, v, gpa, corr, seq))

    def _map_shared(self, v: Vcpu, gpa: int, corr: int, seq: int) -> None:
        td = v.td
        root = self._tds[td.index].loaded[v.index]
        gfn = (gpa ^ SHARED_BIT) >> 12
        # is_page_fault_stale(): an invalid root, or a zap that ended since the fault began
        # (its pfn may be the one just zapped), maps nothing: re-enter and fault again.
        if root is not None and root.valid and seq == td.mmu_invalidate_seq:
            for key in nonleaf_keys(gfn | SHARED_GFN):
                if key not in root.nonleaf:
                    root.nonleaf.add(key)
                    self._spte(td, root, corr, FAULT_FLOW, level_gpa(gfn | SHARED_GFN, key[0]),
                               key[0], NONPRESENT,
                               present_spte(gfn, key[0]), v.index)
            if gfn not in root.leaves:
                root.leaves.add(gfn)
                self._spte(td, root, corr, FAULT_FLOW, gpa, 0, NONPRESENT,
                           present_spte(gfn, 0), v.index)
        td.mmu.release_read()
        self.log.emit(Kind.FAULT_DONE, sub=FaultOutcome.SHARED, flow=FAULT_FLOW, corr=corr,
                      td=td.index, vcpu=v.index, lp=v.lp, gpa=gpa, arg0=0)
        if self.sim.now >= v.next_timer:
            v.take_tick(self.sim.now, self.kvm.timer_period)
        self.kvm.enter(v)

    def _spte(self, td: KvmTd, root: DirectRoot, corr: int, flow: int, gpa: int, level: int,
              old: int, new: int, vcpu: int | None = None) -> None:
        self.log.emit(Kind.SPTE_CHANGED, sub=DIRECT, flow=flow, corr=corr, td=td.index,
                      vcpu=vcpu, gpa=gpa, level=level, arg0=old, arg1=new, arg2=root.root_id)

    # --- the VMM's changes ----------------------------------------------------------------
    def _memslot(self, td: KvmTd) -> None:
        """The VMM deletes and re-creates (or re-flags) the shared slot, under kvm->slots_lock
        (KVM_SET_USER_MEMORY_REGION holds it throughout, as attribute changes do)."""
        if self.world.stopping or td.dead:
            return
        due = self.sim.now + self.world.scenario.vmm.memslot_interval_us * 1000
        td.slots_lock.acquire(lambda _: self.zap(td, ZapReason.MEMSLOT, self.window_gfn,
                                                 self.window_pages, self.policy_scope,
                                                 partial(self._memslot_done, td, due)))

    def _memslot_done(self, td: KvmTd, due: int) -> None:
        """The ioctl returns. One VMM thread: the next change is due ``memslot_interval_us``
        after this one began, or now if this one took longer."""
        td.slots_lock.release()
        self.sim.at(max(due, self.sim.now), self._memslot, td)

    def _notifier(self, td: KvmTd) -> None:
        """The host mm invalidates part of the VMM's mapping of guest memory (shared view)."""
        if self.world.stopping or td.dead:
            return
        span = self.window_gfn + self.window_pages - self.private_gfn
        pages = min(self.notifier_pages, span)
        first = self.private_gfn + self._notifier_rng.randrange(span - pages + 1)
        self.zap(td, ZapReason.NOTIFIER, first, pages, self.policy_scope)
        self.sim.after(self.world.scenario.vmm.notifier_interval_us * 1000, self._notifier, td)

    def zap(self, td: KvmTd, reason: ZapReason, first_gfn: int, pages: int, scope: ZapScope,
            then: Done | None = None, lp: int = -1) -> None:
        """One zap operation: what ``scope`` says, in the direct and the mirror roots, from
        the thread on ``lp`` (-1: the VMM's)."""
        RootZap(self, td, reason, first_gfn, pages, scope, then, lp).begin()
