"""The console script configures the allocators before polars and pyarrow load them.

Analysis frees and reallocates hundreds of MB per query; how long the allocators keep freed
pages decides how much system time goes to faulting them in again (bench/README.md). The
settings are environment variables read once, when each library loads its allocator, so they
must be in place before the first import, and a user's own value must win.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tdxtrace._entry import ALLOCATOR_SETTINGS, tune_allocators

# Runs the console script's entry point with a trip wire: the first import of polars or
# pyarrow prints the allocator settings as they are at that moment.
PROBE = '''
import os, sys

class Probe:
    def find_spec(self, name, path=None, target=None):
        if name in ("polars", "pyarrow"):
            print(name, os.environ.get("MIMALLOC_PURGE_DELAY"),
                  os.environ.get("_RJEM_MALLOC_CONF"), flush=True)
        return None

sys.meta_path.insert(0, Probe())
sys.argv = ["tdxtrace", "--version"]
from tdxtrace._entry import run
try:
    run()
except SystemExit:
    pass
'''


def probe(env: dict[str, str]) -> list[list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return [line.split(" ", 2) for line in done.stdout.splitlines()
            if line.startswith(("polars ", "pyarrow "))]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ALLOCATOR_SETTINGS}


def test_the_settings_are_in_place_before_polars_or_pyarrow_first_loads() -> None:
    seen = probe(clean_env())
    assert seen, "the CLI never imported polars or pyarrow"
    first = seen[0]
    assert first[1:] == [ALLOCATOR_SETTINGS["MIMALLOC_PURGE_DELAY"],
                         ALLOCATOR_SETTINGS["_RJEM_MALLOC_CONF"]]


def test_a_users_own_setting_wins() -> None:
    env = {**clean_env(), "_RJEM_MALLOC_CONF": "dirty_decay_ms:0"}
    first = probe(env)[0]
    assert first[1:] == [ALLOCATOR_SETTINGS["MIMALLOC_PURGE_DELAY"], "dirty_decay_ms:0"]


def test_tune_allocators_only_fills_in_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("_RJEM_MALLOC_CONF", raising=False)
    monkeypatch.setenv("MIMALLOC_PURGE_DELAY", "0")
    tune_allocators()
    assert os.environ["MIMALLOC_PURGE_DELAY"] == "0"
    assert os.environ["_RJEM_MALLOC_CONF"] == ALLOCATOR_SETTINGS["_RJEM_MALLOC_CONF"]
