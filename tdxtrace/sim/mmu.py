"""KVM's TDP MMU state for one TD: mmu_lock and the mirror root's SPTEs.

mmu_lock is a reader/writer lock: faults map under read (concurrent faults allowed), zaps
remove under write, so BLOCK/REMOVE never race PAGE.AUG inside KVM (tdx-reference.md §4(b),
§6.3). Waiters are callbacks, woken in FIFO order; a waiting writer holds back new readers
(rwlock fairness), which is what lets a zap make progress during a fault storm.

Mirror SPTEs are FROZEN_SPTE while one CPU propagates a change to the S-EPT: anyone else who
meets a frozen SPTE gets RET_PF_RETRY.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tdxtrace.codes import FROZEN_SPTE, SHADOW_NONPRESENT_VALUE

Callback = Callable[[], None]


class MmuLock:
    def __init__(self) -> None:
        self.readers = 0
        self.writer = False
        self._waiting: deque[tuple[bool, Callback]] = deque()

    def acquire_read(self, then: Callback) -> None:
        if self.writer or self._waiting:
            self._waiting.append((False, then))
            return
        self.readers += 1
        then()

    def try_read(self) -> bool:
        """Take it for read if that needs no wait (acquire_read without a callback)."""
        if self.writer or self._waiting:
            return False
        self.readers += 1
        return True

    def release_read(self) -> None:
        self.readers -= 1
        if self.readers == 0 and self._waiting:  # no call when nobody waits (every fault)
            self._wake()

    def contended(self) -> bool:
        """Someone waits for it (rwlock_is_contended())."""
        return bool(self._waiting)

    def acquire_write(self, then: Callback) -> None:
        if self.writer or self.readers or self._waiting:
            self._waiting.append((True, then))
            return
        self.writer = True
        then()

    def release_write(self) -> None:
        self.writer = False
        self._wake()

    def _wake(self) -> None:
        waiting = self._waiting
        while waiting and not self.writer:
            exclusive, then = waiting[0]
            if exclusive:
                if self.readers:
                    return
                waiting.popleft()
                self.writer = True
                then()
                return
            waiting.popleft()
            self.readers += 1
            then()


def present_spte(gfn: int, level: int) -> int:
    """A plausible present SPTE value: host PFN, RWX, and a leaf/non-leaf marker."""
    return ((gfn + 0x200000) << 12) | (0x87 if level == 0 else 0x07)


NONPRESENT = SHADOW_NONPRESENT_VALUE
FROZEN = FROZEN_SPTE


@dataclass(slots=True)
class MirrorRoot:
    """Mirror SPTEs: present leaves and non-leaves, and the frozen ones with their owner."""

    root_id: int
    leaves: set[int] = field(default_factory=set)  # gfns with a present leaf SPTE
    nonleaf: set[tuple[int, int]] = field(default_factory=set)
    frozen: dict[object, int] = field(default_factory=dict)  # key -> corr of the owner


def level_gpa(gfn: int, level: int) -> int:
    """The GPA of the S-EPT entry of TDX ``level`` that covers ``gfn``: the GFN rounded down
    to the 512**level pages that entry maps, as KVM passes it (gfn_to_gpa(iter->gfn))."""
    shift = 9 * level
    return (gfn >> shift) << (shift + 12)
