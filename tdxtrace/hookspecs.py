"""Every hook a tdxtrace plugin can implement (pluggy project name ``tdxtrace``).

A plugin is a module (an entry point in the ``tdxtrace`` group, or a ``.py`` file in a folder
given with ``--plugins-dir``) with functions decorated by :data:`tdxtrace.hookimpl` whose names
are hook names below. A decorated function whose name is not a hook here is an error, so a
misspelled hook is reported instead of silently doing nothing.

Hooks are named by verb family, as in datasette: ``register_*`` hooks return new things. New
hooks are added here, never elsewhere, each with a docstring stating its contract.

Cross-cutting work needs no extra hook: a plugin may implement any hook as a pluggy wrapper
(``@hookimpl(wrapper=True)``), but tdxtrace calls ``register_analyzers`` once per plugin so that
every analyzer is attributed to the plugin that registered it; wrappers therefore do not see the
other plugins' lists and are ignored for that hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tdxtrace import hookspec

if TYPE_CHECKING:
    from tdxtrace.analysis import Analyzer


@hookspec
def register_analyzers() -> list[Analyzer]:  # type: ignore[empty-body]
    """Return the analyzers this plugin provides (new instances, possibly an empty list).

    Contract:
    - Called once per plugin manager, without arguments, after every plugin is loaded.
    - Each item is an instance of a :class:`tdxtrace.analysis.Analyzer` subclass whose ``name``
      is snake_case and unique across all loaded plugins (a duplicate is an error naming both
      plugins).
    - Must not read traces, files or the clock: analyzers do their work in ``analyze``.
    - Raising, or returning something that is not a list of analyzers, marks the plugin as
      failed (``tdxtrace plugins`` and ``tdxtrace analyze`` report it); the other plugins'
      analyzers still run.
    """
