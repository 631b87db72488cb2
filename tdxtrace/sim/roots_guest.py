"""Shared memory as the guest sees it: the shared GPA bit and a workload with a shared share.

A TD reaches shared memory through GPAs with the shared bit set (bit 47 with a 4-level S-EPT,
tdx-reference.md §4(a) step 2). :class:`SharedMix` sends a scenario-chosen fraction of a
vCPU's touches to a small shared window (think swiotlb bounce buffers); its touches carry the
shared bit in their GFN, so the TD exit for them reports a shared GPA.
"""

from __future__ import annotations

import random
from typing import Any

from tdxtrace.sim.guest import Touch, Workload

SHARED_BIT = 1 << 47  # the TD's shared GPA bit with a 4-level S-EPT (GPAW 48)
SHARED_GFN = SHARED_BIT >> 12
GPA_LIMIT = 1 << 48  # GPAW 48: legal GPAs are below this


def gfn_range(start: int, end: int) -> range:
    """The GFNs of the GPA range [start, end), which may carry the shared bit."""
    return range((start & ~SHARED_BIT) >> 12, (((end - 1) & ~SHARED_BIT) >> 12) + 1)


class SharedMix(Workload):
    """Wraps a vCPU's workload: each touch goes to the shared window with probability ``p``.

    The inner workload advances exactly as it would alone (same random draws, same RIPs); a
    shared touch replaces the private page of that instruction.
    """

    def __init__(self, inner: Workload, p: float, window_gfn: int, window_pages: int,
                 rng: random.Random) -> None:
        # No super().__init__(): this wraps a built workload instead of being one.
        self._inner = inner
        self._p = p
        self._window_gfn = window_gfn
        self._window_pages = max(1, window_pages)
        self._mix_rng = rng
        self.current = inner.current

    def advance(self) -> Touch:
        touch = self._inner.advance()
        rng = self._mix_rng
        if rng.random() < self._p:
            touch = Touch(touch.rip, self._window_gfn + rng.randrange(self._window_pages))
        self.current = touch
        return touch

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)
