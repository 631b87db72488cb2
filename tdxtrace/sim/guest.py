"""Guest workloads: which private page each vCPU touches next, and at which RIP.

A workload is a stream of memory touches per vCPU. Each touch is one instruction: a new RIP
and the GFN it accesses. While the access cannot complete (the page is not mapped in the
S-EPT) the vCPU stays at that RIP, so repeated EPT violations there are what the TDX module's
zero-step detector counts. By default (``guest.accept = lazy``) the guest accepts AUGed pages
lazily from its #VE handler (TDG.MEM.PAGE.ACCEPT), i.e. a guest with ``pending_ve_disable = N``,
and ACCEPT only runs on pages that are already AUGed, so it never causes an EPT violation.
With ``guest.accept = before_touch`` (SEPT_VE_DISABLE, the Linux guest) the guest ACCEPTs a
page before it touches it, at ACCEPT_RIP; an ACCEPT of a page not yet AUGed exits with an EPT
violation whose extended exit qualification says ACCEPT, which the module does not count
toward zero-step (tdx-reference.md §5.1). Simplification: such a guest re-ACCEPTs any page it
finds unaccepted (after a conversion, but also after a zap, where a real guest would touch it
and KVM would kill the VM for an access before accept).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tdxtrace.errors import ScenarioError

WORKLOADS = ("sequential", "random", "hot")
CODE_BASE = 0xFFFFFFFF81000000  # guest kernel text
# guest.accept = before_touch: where the guest's TDG.MEM.PAGE.ACCEPT runs. One TDCALL in the
# kernel's accept-memory loop accepts every page, so all its EPT violations share this RIP
# (below the workload's code, which starts at CODE_BASE).
ACCEPT_RIP = CODE_BASE - 0x1000
# guest.tick_exit = tdvmcall: the RIP of the timer interrupt handler's WRMSR (its #VE handler
# makes the TDVMCALL there), away from the accept loop and the workload's code.
TICK_HANDLER_RIP = CODE_BASE - 0x2000
INSTRUCTION_BYTES = 7


@dataclass(slots=True)
class Touch:
    rip: int
    gfn: int


class Workload:
    """One vCPU's stream of touches over ``pages`` private pages starting at ``base_gfn``."""

    def __init__(self, kind: str, vcpu: int, vcpus: int, base_gfn: int, pages: int,
                 hot_pages: int, hot_fraction: float, rng: random.Random) -> None:
        if kind not in WORKLOADS:
            raise ScenarioError(f"guest.workload: unknown workload {kind!r} "
                                f"(allowed: {', '.join(WORKLOADS)})")
        self.kind = kind
        self._random = kind == "random"
        self._hot_set = kind == "hot"
        self._rng = rng
        self._base = base_gfn
        self._pages = pages
        span = max(1, pages // max(1, vcpus))
        self._own_start = vcpu * span
        self._own_span = span
        self._hot = max(1, min(hot_pages, pages))
        self._hot_fraction = hot_fraction
        self._cursor = 0
        self._instruction = vcpu * 4096  # distinct code paths per vCPU
        self.current = self.advance()

    def advance(self) -> Touch:
        """The touch completed: move to the next instruction (and the page it accesses)."""
        # One function, not three: the guest calls this for every memory touch.
        self._instruction += 1
        rip = CODE_BASE + (self._instruction % 65536) * INSTRUCTION_BYTES
        if self._random:
            page = self._rng.randrange(self._pages)
        elif self._hot_set and self._rng.random() < self._hot_fraction:
            page = self._rng.randrange(self._hot)
        else:
            page = (self._own_start + self._cursor % self._own_span) % self._pages
            self._cursor += 1
        self.current = touch = Touch(rip, self._base + page)
        return touch
