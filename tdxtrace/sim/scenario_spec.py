"""The scenario spec: every key a scenario may set, with its type, default, allowed values or
range, and a line of documentation (data only; ``scenario.py`` validates against it).

A range's upper bound is the largest size tdxtrace will attempt; a value above it is refused
before any work starts, with the limit named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tdxtrace.sim.costs import CALLED_LEAVES, cost_key


@dataclass(frozen=True)
class Key:
    type: type
    default: Any
    allowed: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    doc: str = ""
    # Applied to a value of the right type before it is checked and stored, so that two
    # spellings of one choice give one scenario (and one trace).
    normalize: Callable[[Any], Any] | None = None


def leaf_key(text: str) -> str:
    """A leaf as its cost-table key: ``TDH.MEM.PAGE.AUG`` and `` mem.page.aug`` are
    ``mem.page.aug``."""
    return text.strip().lower().removeprefix("tdh.")


SPEC: dict[str, dict[str, Key]] = {
    "run": {
        "duration_us": Key(int, 20000, low=1, high=3_600_000_000,
                           doc="simulated time to run the TDs (µs)"),
        "max_events": Key(int, 0, low=0, high=2_000_000_000,
                          doc="stop the run after about this many events (0: no limit); TD "
                              "creation and teardown come on top"),
    },
    "host": {
        "lps": Key(int, 8, low=1, high=4096,
                   doc="logical processors: one per TD runs its VMM (from the last down, "
                       "skipping each package's first), the rest vCPUs"),
        "packages": Key(int, 2, low=1, high=64, doc="CPU packages (sockets)"),
    },
    "td": {
        "count": Key(int, 1, low=1, high=64, doc="TDs on the host"),
        "vcpus": Key(int, 4, low=1, high=1024, doc="vCPUs per TD"),
        "memory_mb": Key(int, 64, low=1, high=4 * 1024 * 1024, doc="private memory per TD"),
    },
    "policy": {
        "frozen_spte": Key(str, "local_retry", ("local_retry", "resume_guest"),
                           doc="what RET_PF_RETRY does on the private fault path"),
        "zap_busy": Key(str, "kick_retry_once",
                        ("kick_retry_once", "retry_loop", "seamcall_spinlock"),
                        doc="OPERAND_BUSY handling on the zap path"),
        "zap_scope": Key(str, "range_leafs", ("range_leafs", "all_roots", "everything"),
                         doc="what a memslot/notifier change zaps"),
        "hkid_release": Key(str, "late", ("late", "early"), doc="TD teardown order"),
    },
    "guest": {
        "workload": Key(str, "sequential", ("sequential", "random", "hot"),
                        doc="which private pages the vCPUs touch"),
        "accept": Key(str, "lazy", ("lazy", "before_touch"),
                      doc="lazy: the #VE handler accepts an AUGed page on first touch; "
                          "before_touch: SEPT_VE_DISABLE, the guest ACCEPTs each page before "
                          "touching it, as Linux does (ACCEPT faults do not arm zero-step)"),
        "hot_pages": Key(int, 16, low=1, high=1 << 30, doc="size of the shared hot set"),
        "hot_fraction": Key(float, 0.5, low=0.0, high=1.0,
                            doc="share of touches that go to the hot set"),
        "timer_hz": Key(int, 250, low=1, high=100_000, doc="guest timer interrupts per second"),
        "tick_exit": Key(str, "none", ("none", "tdvmcall"),
                         doc="the guest's timer interrupt handler: none: makes no exit; "
                             "tdvmcall: re-arms the TSC-deadline timer with TDVMCALL<WRMSR> "
                             "at its own RIP, as a Linux guest does (an exit at another RIP "
                             "resets the module's zero-step count)"),
        "max_touches": Key(int, 64, low=1, high=100_000,
                           doc="touches of mapped pages the guest does per scheduling step"),
        "shared_fraction": Key(float, 0.0, low=0.0, high=1.0,
                               doc="share of touches that go to shared memory (direct root)"),
        "shared_pages": Key(int, 512, low=1, high=1 << 30,
                            doc="size of the shared window (its own memslot), in 4K pages"),
    },
    "kvm": {
        "preempt_p": Key(float, 0.0, low=0.0, high=1.0,
                         doc="chance the host thread is preempted while a mirror SPTE it "
                             "froze is held"),
        "preempt_ns": Key(int, 50000, low=0, high=10_000_000_000, doc="length of it"),
        "signal_p": Key(float, 0.0, low=0.0, high=1.0,
                        doc="chance a local-retry turn finds a signal pending"),
        "preempt_model": Key(str, "voluntary", ("voluntary", "full"),
                             doc="the host kernel's: voluntary (or none): a conversion or "
                                 "truncation zap holds mmu_lock to its end; full: it yields the "
                                 "lock between leaves to waiting faults (rwlock_needbreak())"),
    },
    "vmm": {
        "zap_interval_us": Key(int, 0, low=0, high=3_600_000_000,
                               doc="how often the VMM zaps private memory; one still under "
                                   "way delays the next (0: never)"),
        "zap_pages": Key(int, 64, low=1, high=1 << 30, doc="pages per zap"),
        "zap_reason": Key(str, "truncation", ("truncation", "conversion"),
                          doc="hole punch, or a private->shared attribute change"),
        "memslot_interval_us": Key(int, 0, low=0, high=3_600_000_000,
                                   doc="how often the VMM changes the shared memslot; one still "
                                       "under way delays the next (0: never)"),
        "notifier_interval_us": Key(int, 0, low=0, high=3_600_000_000,
                                    doc="how often an mmu_notifier invalidation hits the VMM's "
                                        "mapping of guest memory (0: never)"),
        "notifier_pages": Key(int, 64, low=1, high=1 << 30,
                              doc="pages per mmu_notifier invalidation"),
    },
    "mapgpa": {
        "interval_us": Key(int, 0, low=0, high=3_600_000_000,
                           doc="how often a vCPU of each TD converts a range (0: never)"),
        "size_kb": Key(int, 4096, low=1, high=64 * 1024 * 1024,
                       doc="bytes per conversion in KiB (not a multiple of 4: ALIGN_ERROR)"),
        "direction": Key(str, "alternate", ("alternate", "to_shared", "to_private"),
                         doc="alternate: to shared, then the same range back to private"),
        "max_retries": Key(int, 3, low=1, high=1000,
                           doc="guest: consecutive no-progress RETRYs before giving up"),
        "vmm": Key(str, "complete", ("complete", "partial", "no_progress", "bad_r11", "reject"),
                   doc="how the VMM answers each userspace exit"),
        "partial_pages": Key(int, 512, low=1, high=1 << 30,
                             doc="partial: pages converted per TDVMCALL before EAGAIN"),
        "no_progress_calls": Key(int, 3, low=0, high=1000,
                                 doc="no_progress: EAGAINs without progress per conversion"),
    },
    "faults": {
        "spurious_busy_leaf": Key(str, "", ("", *sorted(map(cost_key, CALLED_LEAVES))),
                                  normalize=leaf_key,
                                  doc="leaf that sometimes returns OPERAND_BUSY "
                                      "(mem.page.aug or TDH.MEM.PAGE.AUG); empty: none"),
        "spurious_busy_p": Key(float, 0.0, low=0.0, high=1.0, doc="its probability"),
        "ipi_delay_p": Key(float, 0.0, low=0.0, high=1.0, doc="chance an IPI is delayed"),
        "ipi_delay_ns": Key(int, 20000, low=0, high=10_000_000_000, doc="by how much"),
        "mapgpa_interrupt_p": Key(float, 0.0, low=0.0, high=1.0,
                                  doc="chance an interrupt is pending after each MapGPA chunk"),
        "vcpu_load_during_teardown_p": Key(
            float, 0.0, low=0.0, high=1.0,
            doc="chance, per TD teardown, that a vCPU is loaded and entered again between the "
                "VP.FLUSH round and VPFLUSHDONE (seed 001)"),
        "skip_flush_on_migrate_p": Key(
            float, 0.0, low=0.0, high=1.0,
            doc="chance a migration skips VP.FLUSH on the old LP (an injected KVM bug)"),
    },
    # TD teardown after the run (lifecycle.py, docs/calibration.md).
    "teardown": {
        "enabled": Key(bool, True, doc="tear every TD down after the run"),
        "flush_loop": Key(str, "resend_flush", ("resend_flush", "vpflushdone_only"),
                          doc="on FLUSHVP_NOT_DONE: VP.FLUSH every vCPU again, or only "
                              "re-issue VPFLUSHDONE (seed 001)"),
        # Mainline by default, as every policy: no loop, FLUSHVP_NOT_DONE leaks the HKID.
        "vpflushdone_tries": Key(int, 1, low=1, high=10000,
                                 doc="VPFLUSHDONE attempts before the HKID is leaked (1: "
                                     "mainline, no loop; more: the flush_loop of seed 001)"),
        "cache_wb_blocks": Key(int, 4, low=1, high=100_000,
                               doc="sub-blocks of a package's CACHE.WB; every one but the last "
                                   "returns INTERRUPTED_RESUMABLE"),
        "prepopulate": Key(bool, False, doc="start with all private memory mapped and "
                                            "accepted (no rows), as a long-running TD"),
        "row_pages": Key(int, 64, low=0, high=1 << 30,
                         doc="pages per teardown phase recorded one row per SEAMCALL; the "
                             "rest are batched rows with arg1 = pages"),
    },
    "migration": {
        "rate_hz": Key(float, 0.0, low=0.0, high=1_000_000.0,
                       doc="migrations per second per vCPU between LPs (0: none)"),
    },
}
TOP_LEVEL = {"name": str, "description": str}
COST_FIELDS = ("base_ns", "jitter", "tail_p", "tail_x")


# Each key has its own limit; the emulator's work grows with the vCPUs of all TDs together
# (about 3 s per 1024 vCPUs per simulated millisecond), so their product has one too.
MAX_TOTAL_VCPUS = 4096


# --- the spec in words, for error messages ------------------------------------------------
def bound_text(key: Key, bound: float) -> str:
    return f"{bound:g}" if key.type is float else str(int(bound))


def allowed_text(key: Key) -> str:
    """What a key accepts, in words, for error messages."""
    if key.allowed:
        return "one of " + ", ".join(map(shown_choice, key.allowed))
    kinds = {int: "an integer", float: "a number", str: "text", bool: "true or false"}
    kind = kinds.get(key.type, key.type.__name__)
    if key.low is not None and key.high is not None:
        return f"{kind} from {bound_text(key, key.low)} to {bound_text(key, key.high)}"
    return kind


def shown_choice(choice: Any) -> str:
    return '""' if choice == "" else str(choice)


def toml_value(value: Any) -> str:
    """A value read from TOML (or ``--set``) as its author wrote it: ``true``, not True."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)  # a string keeps its quotes and escapes (one line, always)
