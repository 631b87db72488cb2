"""Processes on the simulator: a KVM code path written as a generator of operations.

A process yields *operations*; an operation is a function that starts something (a SEAMCALL,
a lock acquisition, a delay) and calls its ``done`` callback with the result when it finishes,
at once or from a later simulator event. :func:`spawn` resumes the generator with that result,
so a multi-step KVM sequence reads top to bottom like the kernel function it models.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from functools import partial
from typing import Any

from tdxtrace.sim.kernel import Simulator

Op = Callable[[Callable[[Any], None]], None]
Process = Generator[Op, Any, Any]
FOREVER = 1 << 62  # a simulator horizon no run reaches


def spawn(process: Process, then: Callable[[Any], None] | None = None) -> None:
    """Run ``process``: start each yielded op with a callback that resumes the generator."""

    def resume(value: Any) -> None:
        while True:  # a loop, not recursion, for ops that complete at once
            try:
                op = process.send(value)
            except StopIteration as stop:
                if then is not None:
                    then(stop.value)
                return
            box: list[Any] = []
            inline = [True]
            op(partial(_continue, box, inline, resume))
            inline[0] = False
            if not box:
                return
            value = box[0]

    resume(None)


def _continue(box: list[Any], inline: list[bool], resume: Callable[[Any], None],
              result: Any) -> None:
    """An op finished: hand its result back inline, or resume the process later."""
    if inline[0]:
        box.append(result)
    else:
        resume(result)


class KvmMutex:
    """A sleeping kernel mutex (KVM's global ``tdx_lock``): waiters queue in FIFO order."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.held = False
        self._waiting: deque[Callable[[Any], None]] = deque()

    def acquire(self, then: Callable[[Any], None]) -> None:
        if self.held:
            self._waiting.append(then)
            return
        self.held = True
        then(None)

    @property
    def waiters(self) -> int:
        """Callers queued for the mutex."""
        return len(self._waiting)

    def release(self) -> None:
        if self._waiting:
            self.sim.after(0, self._waiting.popleft(), None)  # ownership passes on
        else:
            self.held = False


def parallel(processes: list[Process]) -> Op:
    """An operation running ``processes`` concurrently; done when the last one is."""
    def start(done: Callable[[Any], None]) -> None:
        left = [len(processes)]

        def one(_: Any) -> None:
            left[0] -= 1
            if not left[0]:
                done(None)

        if not processes:
            done(None)
        for process in processes:
            spawn(process, one)
    return start
