"""Text for people: a divergence as two rows side by side, and a model-state snapshot."""

from __future__ import annotations

from typing import Any

from tdxtrace.codes import exit_reason_name, leaf_name, status_name, tdvmcall_status_name
from tdxtrace.events import Flow, Kind, kind_name, sub_name
from tdxtrace.replay.compare import Divergence
from tdxtrace.schema import COLUMN_NAMES

_HEX_FIELDS = ("gpa", "rip", "arg0", "arg1", "arg2")
MAX_RANGES_SHOWN = 8  # per S-EPT state in the text form; --json has them all


def describe(field: str, value: Any, row: dict[str, Any]) -> str:
    """One cell: the raw value, with the name of the code where there is one."""
    if value is None:
        return "null"
    if field == "kind":
        return f"{value} ({kind_name(value)})"
    if field == "flow":
        name = Flow(value).name.lower() if value in Flow._value2member_map_ else "?"
        return f"{value} ({name})"
    if field == "sub" and row.get("kind") is not None:
        name = sub_name(row["kind"], value)
        return str(value) if name == str(value) else f"{value} ({name})"
    if field == "leaf":
        return f"{value} ({leaf_name(value)})"
    if field == "status":
        kind = row.get("kind")
        if kind == Kind.TDVMCALL_DONE:  # R10, a TDVMCALL status
            return f"{value:#x} ({tdvmcall_status_name(value)})"
        if kind == Kind.USERSPACE_RETURN:  # hypercall.ret: 0 or a positive errno
            return str(value)
        return f"{value:#x} ({status_name(value)})"
    if field == "exit_reason":
        return f"{value} ({exit_reason_name(value)})"
    if field in _HEX_FIELDS:
        return f"{value:#x}"
    return str(value)


def render_divergence(source: str, divergence: Divergence) -> str:
    """The first divergent event: where, why, and both rows with the differing fields marked."""
    where = f"at seq {divergence.seq}" if divergence.seq is not None else "after the events"
    lines = [f"{source}: divergent {where}: {divergence.reason}"]
    if divergence.seq is None:
        return "\n".join(lines)
    if divergence.recorded is not None and divergence.replayed is not None:
        lines.append(f"fields that differ: {', '.join(divergence.fields)}")
    recorded, replayed = divergence.recorded or {}, divergence.replayed or {}
    left = [describe(f, recorded.get(f), recorded) if recorded else "-" for f in COLUMN_NAMES]
    right = [describe(f, replayed.get(f), replayed) if replayed else "-" for f in COLUMN_NAMES]
    name_w = max(len(f) for f in COLUMN_NAMES)
    left_w = max(len("recorded"), *(len(c) for c in left))
    lines.append(f"  {'field'.ljust(name_w)}  {'recorded'.ljust(left_w)}  replayed")
    for name, a, b in zip(COLUMN_NAMES, left, right, strict=True):
        mark = "*" if name in divergence.fields else " "
        lines.append(f"{mark} {name.ljust(name_w)}  {a.ljust(left_w)}  {b}".rstrip())
    return "\n".join(lines)


def _event_line(event: dict[str, Any]) -> str:
    shown = [describe("kind", event["kind"], event)]
    for field in ("td", "vcpu", "lp", "leaf", "status", "gpa", "corr"):
        if event.get(field) is not None:
            shown.append(f"{field} {describe(field, event[field], event)}")
    return ", ".join(shown)


def _ranges_text(ranges: list[list[int]]) -> str:
    parts = [f"{start:#x}" + (f"+{pages}p" if pages > 1 else "")
             for start, pages in ranges[:MAX_RANGES_SHOWN]]
    if len(ranges) > MAX_RANGES_SHOWN:
        parts.append(f"... {len(ranges) - MAX_RANGES_SHOWN} more ranges")
    return " ".join(parts)


def _lock_line(lock: dict[str, Any]) -> str:
    holder = lock["holder"]
    what = lock["lock"] + (f" {lock['gpa']:#x}" if "gpa" in lock else "")
    return (f"{what} {lock['mode']} until {lock['until_ns']} ns, held by lp {holder['lp']} "
            f"{holder['leaf_name']} corr {holder['corr']}")


def _td_lines(td: dict[str, Any]) -> list[str]:
    refs = td["epoch_refcount"]
    freed = " (freed)" if td["hkid_freed"] else ""
    lines = [f"TD {td['td']}: hkid {td['hkid']}{freed}, {td['lifecycle']}"
             + (", BUGGED" if td["bugged"] else "")
             + f", TLB epoch {td['tlb_epoch']} (refcount even {refs['even']}, odd "
             f"{refs['odd']}), {td['associated_vcpus']} vCPUs associated"]
    leaves = td["sept_leaves"]
    counts = ", ".join(f"{name} {leaves[name]['pages']}" for name in leaves) or "none"
    lines.append(f"  S-EPT leaves: {counts}; non-leaf entries {td['sept_nonleaf_entries']}")
    for name, info in leaves.items():
        lines.append(f"    {name}: {_ranges_text(info['ranges'])}")
    lines.append("  locks held:" + ("" if td["locks_held"] else " none"))
    lines += [f"    {_lock_line(lock)}" for lock in td["locks_held"]]
    mmu = td["mmu_lock"]
    lines.append(f"  mmu_lock: {mmu['readers']} readers"
                 + (", held for write" if mmu["writer"] else ""))
    slots = td["slots_lock"]
    lines.append("  slots_lock: " + ("held" if slots["held"] else "free")
                 + (f", {slots['waiters']} waiting" if slots["waiters"] else ""))
    frozen = td["frozen_sptes"]
    lines.append("  frozen mirror SPTEs: " + (", ".join(
        f"{f['gpa']:#x} {_level_text(f['level'])} (corr {f['corr']})" for f in frozen)
        or "none"))
    for v in td["vcpus"]:
        zs = v["zero_step"]
        assoc = "not associated" if v["associated_lp"] is None else \
            f"associated with lp {v['associated_lp']}"
        where = "in guest" if v["in_guest"] else "in host"
        gpas = ", ".join(f"{g:#x}" for g in zs["gpas"]) or "none"
        lines.append(
            f"  vCPU {v['vcpu']}: lp {v['lp']}, {assoc}, {where}, entered epoch "
            f"{v['entered_epoch']}, rip {v['rip']:#x}" + (", stopped" if v["stopped"] else "")
            + f"; zero-step count {zs['count']}" + (" (ARMED)" if zs["armed"] else "")
            + f", GPA list: {gpas}")
    return lines


def render_state(state: dict[str, Any]) -> str:
    """The ``--until`` snapshot as text."""
    seq = state["seq"]
    lines = [f"state when seq {seq} was written, at {state['time_ns']} ns"]
    if state.get("event") is not None:
        lines.append(f"event {seq}: {_event_line(state['event'])}")
    for td in state["tds"]:
        lines += _td_lines(td)
    return "\n".join(lines)


# TDX S-EPT levels, as the trace spells them (0 = 4K); KVM's PG_LEVEL_* is one more.
_PAGE_SIZES = {0: "4K", 1: "2M", 2: "1G"}


def _level_text(level: int) -> str:
    """``level 0 (4K)``: the page size too, since KVM counts levels from 1."""
    size = _PAGE_SIZES.get(level)
    return f"level {level} ({size})" if size else f"level {level}"
