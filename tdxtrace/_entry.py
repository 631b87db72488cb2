"""The ``tdxtrace`` console script: the CLI, imported only once Ctrl-C can be answered.

Importing the CLI loads polars and pyarrow (about 0.3 s); a Ctrl-C in that time would print
a traceback from deep inside an import. Here it is one line and exit status 130, as anywhere
else in the command.
"""

from __future__ import annotations

import sys


def run() -> None:
    try:
        from tdxtrace.cli import main
    except KeyboardInterrupt:
        print("tdxtrace: interrupted", file=sys.stderr)
        sys.exit(130)
    main()
