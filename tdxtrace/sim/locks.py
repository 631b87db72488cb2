"""The TDX module's try-locks, modelled by the time interval each holder keeps them.

The module never waits: an acquisition that conflicts returns ``TDX_OPERAND_BUSY | operand``
at once (tdx-reference.md §6.1). Because the emulator decides a SEAMCALL's outcome when it
starts and knows how long it will run, a holder is simply "busy until t": no release events
are needed, and a conflict is a comparison with the current time.
"""

from __future__ import annotations

from dataclasses import dataclass

Holder = tuple[int, int, int]  # (lp, leaf, corr) of the SEAMCALL holding the lock
LockState = tuple[int, Holder, int, Holder]  # a SharexLock's fields, in order


@dataclass(slots=True)  # slotted: several try_take() per SEAMCALL
class SharexLock:
    """A shared/exclusive try-lock (``sharex_lock``) reported with ``operand`` on conflict."""

    operand: int
    excl_until: int = -1
    excl_holder: Holder = (-1, -1, -1)
    shared_until: int = -1
    shared_holder: Holder = (-1, -1, -1)

    def try_take(self, now: int, until: int, exclusive: bool, holder: Holder) -> Holder | None:
        """Take the lock until ``until``; or, when it is held, return who holds it."""
        if self.excl_until > now:
            return self.excl_holder
        if exclusive:
            if self.shared_until > now:
                return self.shared_holder
            self.excl_until = until
            self.excl_holder = holder
        elif until > self.shared_until:
            self.shared_until = until
            self.shared_holder = holder
        return None

    def snapshot(self) -> LockState:
        return self.excl_until, self.excl_holder, self.shared_until, self.shared_holder

    def restore(self, state: LockState) -> None:
        """Undo the takes since ``state`` (a call that failed releases what it took)."""
        self.excl_until, self.excl_holder, self.shared_until, self.shared_holder = state
