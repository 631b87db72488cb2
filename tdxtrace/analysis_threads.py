"""Running analyzers a few at a time, in threads, over a trace held in memory.

polars releases the GIL inside a query, but one analyzer alone keeps two cores only partly
busy: between its queries it runs Python (building the next plan, small eager steps), and
many of its queries (sorts, cumulative sums, joins on small frames) use one core. With two
analyzers at once, one's Python and single-core steps overlap the other's queries; on the
2-core machine of ``bench/`` the six built-in analyzers take 15-20 % less time.

Only over a trace held in memory (the shared decode): a trace streamed from its file is the
low-memory path, and two analyzers at once would each hold their own working set. Analyzers
are pure functions of the trace (design.md §6), so running them at once changes no result;
values several of them derive alike go through ``Trace.shared``, which builds each once under
a lock. The outcomes come back in the order the analyzers were given (by name).

The threads are daemons, as ``--timeout``'s are: a Ctrl-C reaches the main thread, which is
waiting for them, and stops the command; an analyzer still running is left behind.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")

# Two at a time: the gain on two cores, and no more working sets in memory than that.
DEFAULT_JOBS = 2
MAX_JOBS = 64


def run_in_threads(run: Callable[[T], U], items: Sequence[T], jobs: int,
                   missing: Callable[[T], U]) -> list[U]:
    """``[run(item) for item in items]``, with up to ``jobs`` items running at once.

    ``run`` must not raise (it reports failures in what it returns); an item whose thread
    ended without a result gets ``missing(item)`` instead, so no gap passes unnoticed.
    """
    pending = deque(enumerate(items))  # popleft is atomic: no lock needed to share it
    results: dict[int, U] = {}

    def worker() -> None:
        while True:
            try:
                index, item = pending.popleft()
            except IndexError:
                return
            results[index] = run(item)

    workers: list[threading.Thread] = []
    try:  # a Ctrl-C may land anywhere in here, even before the last thread has started
        for i in range(max(1, min(jobs, len(items)))):
            thread = threading.Thread(target=worker, name=f"tdxtrace-analyzers-{i}",
                                      daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no more threads to be had: those started do the rest
                break
            workers.append(thread)
        if not workers:
            worker()  # not even one: all in this thread
        for thread in workers:
            thread.join()  # interruptible: a Ctrl-C raises KeyboardInterrupt here
    except BaseException:
        pending.clear()  # nothing starts after it; what is running is left behind
        raise
    return [results[i] if i in results else missing(item) for i, item in enumerate(items)]
