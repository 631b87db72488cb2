"""Discrete-event simulation kernel: integer nanoseconds, ties broken by a sequence number.

Nothing here reads a clock or an unseeded random source. Random numbers come from named streams
derived from the run seed with SHA-256, so adding a stream never perturbs the others and the
derivation does not depend on ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections.abc import Callable
from typing import Any

_heappush = heapq.heappush  # a module global, not heapq's attribute: after() runs per step


class Simulator:
    """A heap of (time, sequence, callback, args); :meth:`run` pops them in order."""

    __slots__ = ("_heap", "_seq", "now")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count(1)  # next() is one C call; += on an attribute is four ops
        self.now = 0

    def at(self, when: int, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` at absolute time ``when`` (never in the past)."""
        if when < self.now:
            when = self.now
        _heappush(self._heap, (when, next(self._seq), callback, args))

    def after(self, delay: int, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` ``delay`` ns from now."""
        when = self.now + delay if delay > 0 else self.now
        _heappush(self._heap, (when, next(self._seq), callback, args))

    def run(self, until: int, should_stop: Callable[[], int] | None = None) -> None:
        """Process events up to simulated time ``until`` or until stopped."""
        heap = self._heap
        pop = heapq.heappop
        while heap:
            entry = pop(heap)
            when, _, callback, args = entry
            if when > until:
                heapq.heappush(heap, entry)  # not yet: leave it for a later run()
                break
            self.now = when
            callback(*args)
            if should_stop is not None and should_stop():
                break

    def pending(self) -> int:
        return len(self._heap)


class RandomStreams:
    """Independent ``random.Random`` streams keyed by name, all derived from one run seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._streams: dict[str, random.Random] = {}

    def stream(self, name: str) -> random.Random:
        rng = self._streams.get(name)
        if rng is None:
            digest = hashlib.sha256(f"tdxtrace:{self.seed}:{name}".encode()).digest()
            rng = random.Random(int.from_bytes(digest[:16], "little"))
            self._streams[name] = rng
        return rng
