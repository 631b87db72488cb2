"""tdxtrace: record, replay and analyze how Linux KVM drives the Intel TDX module.

Public API for plugin authors: :data:`hookimpl` (decorate your hook implementations),
:class:`tdxtrace.trace.Trace` (what analyzers receive) and :mod:`tdxtrace.testing`.
"""

from __future__ import annotations

import pluggy

from tdxtrace._version import __version__

PROJECT_NAME = "tdxtrace"

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
hookspec = pluggy.HookspecMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "__version__", "hookimpl", "hookspec"]
