"""The ``tdxtrace`` console script: everything it imports and runs answers Ctrl-C in one line.

setuptools' script runs ``from tdxtrace._entry import run``, which imports the package
``tdxtrace`` first: so the package imports nothing slow (see ``tdxtrace/__init__.py``), and this
module imports only ``sys`` before :func:`run` takes over. Importing the CLI loads polars and
pyarrow (about 0.3 s); a Ctrl-C then, or while click parses the arguments, is one line and exit
status 130, as anywhere else in the command, never a traceback from inside an import.
"""

from __future__ import annotations

import sys


def run() -> None:
    try:
        from tdxtrace.cli import main

        main()
    except KeyboardInterrupt:
        print("tdxtrace: interrupted", file=sys.stderr)
        sys.exit(130)
