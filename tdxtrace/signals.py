"""Finishing a file without being cut short by Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while a file is being finished, then deliver them.

    Closing writes the footer, fsyncs and renames: interrupted half way, it would leave a
    ``.partial`` behind (or a ``KeyboardInterrupt`` inside ``__exit__`` would try to close
    twice). Signals can only be caught in the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in _HELD_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(held):  # each once, in the order they came
            signal.raise_signal(signum)


@contextlib.contextmanager
def interrupt_once() -> Iterator[None]:
    """Ctrl-C or SIGTERM raise one KeyboardInterrupt; any more are ignored from then on.

    Unwinding a long run frees millions of objects before any clean-up code runs, so a user
    pressing Ctrl-C twice lands the second one there, where it would abort the clean-up (and
    leave a temporary file). The run is being stopped either way, so later signals are dropped.
    Signals can only be caught in the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    interrupted = False

    def first(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted = True
        for sig in _HELD_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, first) for sig in _HELD_SIGNALS}
    try:
        yield
    finally:
        # Once interrupted, the command is on its way out: a signal now would only turn its
        # exit status 130 into death by signal, so they stay ignored.
        if not interrupted:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
