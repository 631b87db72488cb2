"""The emulator's model state at one event, for ``tdxtrace replay TRACE --until SEQ``.

:func:`snapshot` reads the TDX module model (TD lifecycle, TLB epoch and refcounts, S-EPT leaf
entries, try-locks, per-vCPU association and zero-step state) and KVM's side (vCPU run state,
mmu_lock, frozen mirror SPTEs) into plain JSON-able data with sorted keys.
:func:`tdxtrace.replay.text.render_state` turns it into text for people.

The state is the one at the moment event ``seq`` was written: everything the emulator did
before writing it, nothing after (the run is stopped right there, in the middle of its
simulation step if need be). For a SEAMCALL row that means the call has been decided (locks
taken, entries changed) and its completion has not run yet.
"""

from __future__ import annotations

from typing import Any

from tdxtrace.codes import STEPPING_EPF_THRESHOLD, leaf_name, operand_name, tdcall_name
from tdxtrace.events import GUEST_LEAF_BASE, SeptState
from tdxtrace.sim.kvm_state import KvmTd
from tdxtrace.sim.locks import Holder, SharexLock
from tdxtrace.sim.module_state import ModuleTd, TdLifecycle
from tdxtrace.sim.world import World

PAGE_SHIFT = 12


def _sorted(value: Any) -> Any:
    """``value`` with every dict's keys in sorted order (lists keep their order)."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _holder(holder: Holder) -> dict[str, Any]:
    lp, leaf, corr = holder
    name = (tdcall_name(leaf - GUEST_LEAF_BASE) if leaf >= GUEST_LEAF_BASE
            else leaf_name(leaf))
    return {"lp": lp, "leaf": leaf, "leaf_name": name, "corr": corr}


def _ranges(gfns: list[int]) -> list[list[int]]:
    """Sorted gfns as runs of consecutive pages: ``[[start_gpa, pages], ...]``."""
    runs: list[list[int]] = []
    for gfn in sorted(gfns):
        if runs and (runs[-1][0] >> PAGE_SHIFT) + runs[-1][1] == gfn:
            runs[-1][1] += 1
        else:
            runs.append([gfn << PAGE_SHIFT, 1])
    return runs


def _sept(mtd: ModuleTd) -> dict[str, Any]:
    by_state: dict[str, list[int]] = {}
    for gfn, entry in mtd.entries.items():
        if entry.state != SeptState.FREE:  # FREE entries are left-overs of removed pages
            by_state.setdefault(SeptState(entry.state).name, []).append(gfn)
    return {name: {"pages": len(gfns), "ranges": _ranges(gfns)}
            for name, gfns in by_state.items()}


def _locks(mtd: ModuleTd, now: int) -> list[dict[str, Any]]:
    """Module try-locks held at ``now``: the TD's sharex locks, then S-EPT entry locks."""
    held: list[dict[str, Any]] = []
    # Every SharexLock field of the TD, so locks added to the model later show up too.
    for lock in (v for v in vars(mtd).values() if isinstance(v, SharexLock)):
        name = operand_name(lock.operand)
        if lock.excl_until > now:
            held.append({"lock": name, "mode": "exclusive", "until_ns": lock.excl_until,
                         "holder": _holder(lock.excl_holder)})
        if lock.shared_until > now:
            held.append({"lock": name, "mode": "shared", "until_ns": lock.shared_until,
                         "holder": _holder(lock.shared_holder)})
    for gfn in sorted(g for g, e in mtd.entries.items() if e.lock_until > now):
        entry = mtd.entries[gfn]
        held.append({"lock": "SEPT_ENTRY", "mode": "exclusive", "gpa": gfn << PAGE_SHIFT,
                     "until_ns": entry.lock_until, "holder": _holder(entry.lock_holder)})
    held.sort(key=lambda h: (h["lock"] != "SEPT_ENTRY", h["lock"], h.get("gpa", 0), h["mode"]))
    return held


def _vcpus(td: KvmTd) -> list[dict[str, Any]]:
    out = []
    for v in td.vcpus:
        mv = td.module.vcpus[v.index]
        out.append({
            "vcpu": v.index,
            "lp": v.lp,
            "associated_lp": None if mv.assoc_lp < 0 else mv.assoc_lp,
            "in_guest": mv.in_guest,
            "entered_epoch": mv.entered_epoch,
            "rip": v.workload.current.rip,
            "stopped": v.stopped,
            "zero_step": {
                "count": mv.zs_count,
                "armed": mv.zs_count >= STEPPING_EPF_THRESHOLD,
                "gpas": list(mv.zs_gpas),
            },
        })
    return out


def _frozen(td: KvmTd) -> list[dict[str, Any]]:
    """Frozen mirror SPTEs: a leaf is keyed by gfn, a non-leaf by (TDX level, index)."""
    out = []
    for key, corr in td.mirror.frozen.items():
        if isinstance(key, int):
            out.append({"level": 0, "gpa": key << PAGE_SHIFT, "corr": corr})
        elif isinstance(key, tuple) and len(key) == 2:
            level, index = key
            out.append({"level": level, "gpa": index << (PAGE_SHIFT + 9 * level), "corr": corr})
    out.sort(key=lambda f: (f["level"], f["gpa"]))
    return out


def _td(td: KvmTd, now: int) -> dict[str, Any]:
    mtd = td.module
    return {
        "td": td.index,
        "hkid": mtd.hkid,
        # KEY.FREEID done: the HKID went back to the free pool (the TD keeps its number).
        "hkid_freed": mtd.lifecycle == TdLifecycle.TEARDOWN,
        "lifecycle": mtd.lifecycle.name,
        "bugged": td.bugged,
        "tlb_epoch": mtd.epoch,
        # refcount[epoch & 1]: vCPUs in guest mode that entered in an epoch of that parity.
        "epoch_refcount": {"even": mtd.refcount[0], "odd": mtd.refcount[1]},
        "associated_vcpus": mtd.num_assoc,
        "sept_leaves": _sept(mtd),
        "sept_nonleaf_entries": len(mtd.nonleaf),
        "locks_held": _locks(mtd, now),
        "mmu_lock": {"readers": td.mmu.readers, "writer": td.mmu.writer},
        # KVM_SET_MEMORY_ATTRIBUTES and memslot updates: one at a time, whole.
        "slots_lock": {"held": td.slots_lock.held, "waiters": td.slots_lock.waiters},
        "frozen_sptes": _frozen(td),
        "vcpus": _vcpus(td),
    }


def snapshot(world: World, seq: int, event: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model state when event ``seq`` was written (JSON-able, sorted keys)."""
    now = world.sim.now
    state: dict[str, Any] = _sorted({
        "seq": seq,
        "time_ns": now,
        "event": event,
        "tds": [_td(td, now) for td in world.tds],
    })
    return state
