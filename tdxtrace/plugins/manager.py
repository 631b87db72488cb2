"""The one factory that builds a plugin manager, and how plugins are found and loaded.

Plugins come from two places, both loaded the same way: the entry-point group ``tdxtrace``
(installed packages, the built-in analyzers included) and ``*.py`` files in folders given with
``--plugins-dir``. ``TDXTRACE_LOAD_PLUGINS`` (comma-separated plugin names) limits which of
them load; set but empty (or only spaces and commas) it means the same as unset: every plugin
loads. A plugin whose module fails to import is recorded as a failed plugin and the rest still
load; a plugin that implements an unknown (misspelled) hook is an error.
Nothing registers at import time: every call of :func:`make_plugin_manager` starts empty.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pluggy

from tdxtrace import PROJECT_NAME, hookspecs
from tdxtrace.analysis import error_line
from tdxtrace.errors import TdxtraceError

ENTRY_POINT_GROUP = PROJECT_NAME
LOAD_PLUGINS_ENV = "TDXTRACE_LOAD_PLUGINS"
SOURCE_ENTRY_POINT = "entry point"
SOURCE_PLUGINS_DIR = "plugins dir"
_NOT_WORD = re.compile(r"\W")


@dataclass(frozen=True)
class PluginOrigin:
    """Where a plugin came from: shown by ``tdxtrace plugins`` and in error messages."""

    name: str
    version: str  # the distribution's version for entry points, "-" for plugins-dir files
    source: str  # SOURCE_ENTRY_POINT or SOURCE_PLUGINS_DIR
    where: str  # "module (distribution version)" or the file's path


@dataclass(frozen=True)
class FailedPlugin:
    """A plugin that could not be used, with the one-line reason."""

    name: str
    where: str
    error: str


class TdxtracePluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers each plugin's origin and the plugins that failed."""

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, PluginOrigin] = {}
        self.failed: list[FailedPlugin] = []


@dataclass(frozen=True)
class _Candidate:
    origin: PluginOrigin
    load: Callable[[], ModuleType] = field(compare=False)


def make_plugin_manager(*, plugins_dirs: Sequence[Path] = (), load_entry_points: bool = True,
                        env: Mapping[str, str] | None = None) -> TdxtracePluginManager:
    """Build a plugin manager with every allowed plugin loaded and its hooks checked.

    ``env`` defaults to ``os.environ`` (only ``TDXTRACE_LOAD_PLUGINS`` is read; unset, empty
    or only spaces and commas, every plugin loads). Raises
    :class:`TdxtraceError` for a plugins dir that is not a folder, a name in
    ``TDXTRACE_LOAD_PLUGINS`` that matches no plugin, and a plugin implementing a hook that
    does not exist or with the wrong arguments.
    """
    pm = TdxtracePluginManager()
    candidates = list(_entry_point_candidates()) if load_entry_points else []
    for folder in plugins_dirs:
        candidates += _dir_candidates(Path(folder))
    allowed = _allowed_names(os.environ if env is None else env, candidates)
    for candidate in candidates:
        if allowed is None or candidate.origin.name in allowed:
            _load(pm, candidate)
    _check_hooks(pm)
    return pm


def _entry_point_candidates() -> list[_Candidate]:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    # Sorted by name (then value) so the load order never depends on the installation.
    candidates = []
    for ep in sorted(found, key=lambda e: (e.name, e.value)):
        dist = ep.dist
        version = dist.version if dist is not None else "-"
        dist_name = dist.metadata["Name"] if dist is not None else "unknown distribution"
        origin = PluginOrigin(ep.name, version, SOURCE_ENTRY_POINT,
                              f"{ep.value} ({dist_name} {version})")
        candidates.append(_Candidate(origin, _entry_point_loader(ep)))
    return candidates


def _entry_point_loader(ep: importlib.metadata.EntryPoint) -> Callable[[], ModuleType]:
    def load() -> ModuleType:
        loaded = ep.load()
        if not isinstance(loaded, ModuleType):
            raise TypeError(f"entry point {ep.value} is not a module")
        return loaded

    return load


def _dir_candidates(folder: Path) -> list[_Candidate]:
    if not folder.is_dir():
        raise TdxtraceError(f"--plugins-dir {folder}: not a folder")
    # Files starting with "_" (such as __init__.py) are helpers, not plugins.
    files = sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))
    return [
        _Candidate(PluginOrigin(p.stem, "-", SOURCE_PLUGINS_DIR, str(p)), _file_loader(p))
        for p in files
    ]


def _file_loader(path: Path) -> Callable[[], ModuleType]:
    def load() -> ModuleType:
        # A unique, deterministic module name per file: two folders may hold the same file
        # name, and a plugin file must never shadow a real module.
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        module_name = f"tdxtrace_dir_plugin_{digest}_{_NOT_WORD.sub('_', path.stem)}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        # In sys.modules while it runs: dataclasses and typing resolve names through it.
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        return module

    return load


def _allowed_names(env: Mapping[str, str], candidates: Sequence[_Candidate]) -> set[str] | None:
    allowed = {name.strip() for name in env.get(LOAD_PLUGINS_ENV, "").split(",") if name.strip()}
    if not allowed:
        # Empty is "no limit", not "load nothing": `VAR= cmd` or a blank CI variable is far
        # more often a limit left unset than a wish to run without analyzers, and loading
        # nothing made `analyze` print nothing and exit 0.
        return None
    known = {c.origin.name for c in candidates}
    unknown = sorted(allowed - known)
    if unknown:
        raise TdxtraceError(f"{LOAD_PLUGINS_ENV} names unknown plugin(s) {', '.join(unknown)}; "
                            f"available: {', '.join(sorted(known)) or 'none'}")
    return allowed


def _load(pm: TdxtracePluginManager, candidate: _Candidate) -> None:
    origin = candidate.origin
    taken = pm.origins.get(origin.name)
    if taken is not None:
        pm.failed.append(FailedPlugin(origin.name, origin.where,
                                      f"name already used by the plugin from {taken.where}"))
        return
    try:
        module = candidate.load()
    except KeyboardInterrupt:  # the user's Ctrl-C (or SIGTERM) stops the command
        raise
    except BaseException as err:  # a broken plugin (even `raise GeneratorExit`) fails alone
        pm.failed.append(FailedPlugin(origin.name, origin.where, error_line(err)))
        return
    try:
        pm.register(module, name=origin.name)
    except pluggy.PluginValidationError as err:
        raise TdxtraceError(f"plugin {origin.name!r} ({origin.where}): "
                            f"{' '.join(str(err).split())}") from err
    pm.origins[origin.name] = origin


def hook_names(pm: pluggy.PluginManager) -> list[str]:
    """The names of every hook a plugin may implement, sorted."""
    return sorted(n for n in dir(hookspecs) if pm.parse_hookspec_opts(hookspecs, n) is not None)


def _check_hooks(pm: TdxtracePluginManager) -> None:
    """Reject hook implementations that match no hook spec (a misspelled hook name)."""
    known = ", ".join(hook_names(pm))
    for name in sorted(pm.origins):
        plugin = pm.get_plugin(name)
        for caller in pm.get_hookcallers(plugin) or []:
            if caller.has_spec():
                continue
            mandatory = [i for i in caller.get_hookimpls()
                         if i.plugin_name == name and not i.optionalhook]
            if mandatory:
                raise TdxtraceError(f"plugin {name!r} ({pm.origins[name].where}) implements "
                                    f"unknown hook {caller.name!r}; known hooks: {known}")
    try:
        pm.check_pending()  # the same check done by pluggy, in case a rule is added there
    except pluggy.PluginValidationError as err:
        raise TdxtraceError(" ".join(str(err).split())) from err
