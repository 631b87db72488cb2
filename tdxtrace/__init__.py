"""tdxtrace: record, replay and analyze how Linux KVM drives the Intel TDX module.

Public API for plugin authors: :data:`hookimpl` (decorate your hook implementations),
:class:`tdxtrace.trace.Trace` (what analyzers receive) and :mod:`tdxtrace.testing`.
"""

from __future__ import annotations

PROJECT_NAME = "tdxtrace"

# typing.TYPE_CHECKING without importing typing (see __getattr__); mypy and ruff know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    import pluggy

    __version__: str
    hookimpl: pluggy.HookimplMarker
    hookspec: pluggy.HookspecMarker


def __getattr__(name: str) -> Any:
    # Made on first use, not at import. The `tdxtrace` console script imports tdxtrace._entry,
    # which imports this package first: whatever ran here would run before _entry can answer a
    # Ctrl-C with one line (importing pluggy took 20-80 ms, and printed a traceback).
    if name == "__version__":
        from tdxtrace._version import __version__ as value

        globals()[name] = value
        return value
    if name not in ("hookimpl", "hookspec"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import pluggy

    markers = {"hookimpl": pluggy.HookimplMarker(PROJECT_NAME),
               "hookspec": pluggy.HookspecMarker(PROJECT_NAME)}
    globals().update(markers)  # made once: later lookups find them without this function
    return markers[name]


__all__ = ["PROJECT_NAME", "__version__", "hookimpl", "hookspec"]
