"""The ``tdxtrace`` console script: everything it imports and runs answers Ctrl-C in one line.

setuptools' script runs ``from tdxtrace._entry import run``, which imports the package
``tdxtrace`` first: so the package imports nothing slow (see ``tdxtrace/__init__.py``), and this
module imports only ``os`` and ``sys`` before :func:`run` takes over. Importing the CLI loads
polars and pyarrow (about 0.3 s); a Ctrl-C then, or while click parses the arguments, is one
line and exit status 130, as anywhere else in the command, never a traceback from inside an
import.
"""

from __future__ import annotations

import os
import sys

# How long the allocators keep memory that was freed before giving it back to the kernel.
# Analysis frees and allocates hundreds of MB per query; pages given back at once must be
# faulted in and zeroed again by the next query, which cost more system time than the
# queries' own work on a 10 M-event trace (bench/README.md, "Allocators"). Ten seconds keeps
# pages between the queries of one run and still returns them to an idle process.
KEEP_FREED_MS = "10000"
ALLOCATOR_SETTINGS = {
    "MIMALLOC_PURGE_DELAY": KEEP_FREED_MS,  # pyarrow's default pool (mimalloc)
    # polars' allocator (jemalloc, built with the _rjem_ prefix)
    "_RJEM_MALLOC_CONF": f"dirty_decay_ms:{KEEP_FREED_MS},muzzy_decay_ms:{KEEP_FREED_MS}",
}


def tune_allocators() -> None:
    """Set ALLOCATOR_SETTINGS in the environment, except those the user set.

    The allocators read them once, when pyarrow and polars load: call this before they are
    imported (the console script does; so do the benchmarks). Later, it changes nothing.
    """
    for name, value in ALLOCATOR_SETTINGS.items():
        os.environ.setdefault(name, value)


def run() -> None:
    try:
        tune_allocators()
        from tdxtrace.cli import main

        main()
    except KeyboardInterrupt:
        print("tdxtrace: interrupted", file=sys.stderr)
        sys.exit(130)
