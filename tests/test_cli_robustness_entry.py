"""Ctrl-C while the ``tdxtrace`` console script is still starting: one line, exit status 130.

setuptools' script runs ``from tdxtrace._entry import run; sys.exit(run())``. Importing
``tdxtrace._entry`` imports the package ``tdxtrace`` first, so whatever the package's
``__init__`` imports (it imported pluggy, 20-80 ms) ran before ``run`` could answer a Ctrl-C,
and printed a traceback. Now the package imports nothing and ``run`` guards the rest.

The test is exact: a child process sends itself SIGINT (a real signal, through Python's
handler) at the moment a given module is first looked up. Sending SIGINT to the real console
script after a delay proved flaky: a signal can land while Python itself starts (site, .pth
files) or in the few bytecodes of the two module bodies before ``run`` takes over, which no
code of ours can answer; the trip wire exercises the same path without the race.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import default_sigint

import tdxtrace

# The console script as setuptools writes it, with a trip wire in the import system.
TRIPPED_SCRIPT = '''
import os, signal, sys

TARGET = sys.argv.pop(1)


class TripWire:
    fired = False

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == TARGET and not cls.fired:
            cls.fired = True
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: right here
        return None


sys.meta_path.insert(0, TripWire)
from tdxtrace._entry import run
sys.exit(run())
'''

PACKAGE_DIR = str(Path(tdxtrace.__file__).parent)


@pytest.mark.parametrize("module", [
    "tdxtrace._version", "pluggy", "click", "pyarrow", "polars", "jinja2", "tdxtrace.cli",
    "tdxtrace.commands.replay_cmd"])
def test_ctrl_c_during_any_import_of_the_console_script_is_one_line(module: str) -> None:
    done = subprocess.run([sys.executable, "-c", TRIPPED_SCRIPT, module, "--version"],
                          capture_output=True, text=True, timeout=120, preexec_fn=default_sigint)
    assert (done.returncode, done.stderr) == (130, "tdxtrace: interrupted\n")
    assert done.stdout == ""


def test_importing_the_package_imports_nothing_slow() -> None:
    code = ("import sys; before = set(sys.modules); import tdxtrace; "
            "print(sorted(m for m in set(sys.modules) - before))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert set(eval(done.stdout)) <= {"tdxtrace", "__future__"}, done.stdout


def test_plugins_still_import_the_markers() -> None:
    from tdxtrace import __version__, hookimpl, hookspec

    assert hookimpl.project_name == hookspec.project_name == "tdxtrace"
    assert __version__ == tdxtrace.__version__
    with pytest.raises(AttributeError):
        tdxtrace.no_such_name  # noqa: B018
