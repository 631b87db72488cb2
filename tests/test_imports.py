"""Every module of the package imports on its own, first, in a fresh interpreter state.

A library user may import any module first (``import tdxtrace.outputs``); an import cycle
through a package ``__init__`` then fails with a partially initialized module, although the
CLI's own import order hides it. One child process imports each module after dropping every
``tdxtrace`` module from ``sys.modules`` (polars and pyarrow stay loaded, so this is fast).
"""

from __future__ import annotations

import subprocess
import sys

CHILD = '''
import importlib, pkgutil, sys
import tdxtrace, tdxtrace_plugins
names = sorted({m.name for pkg in (tdxtrace, tdxtrace_plugins)
                for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
                if not m.name.endswith(".__main__")})  # that one runs the CLI
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("tdxtrace", "tdxtrace_plugins")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed.append(f"{name}: {type(err).__name__}: {err}")
print(len(names))
print("\\n".join(failed))
'''


def test_every_module_imports_first() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    count, *failed = done.stdout.splitlines()
    assert int(count) > 60  # the walk found the package
    assert [line for line in failed if line] == []
