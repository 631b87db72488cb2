"""Plugin loading (:mod:`tdxtrace.plugins.manager`) and typed access to the hooks.

pluggy's ``pm.hook.*`` relay is untyped; the rest of tdxtrace reaches hooks only through the
small typed functions here. ``register_analyzers`` is called once per plugin, in plugin-name
order, so every analyzer is attributed to its plugin, a duplicate name can name both plugins,
and one plugin's broken hook marks only that plugin as failed.
"""

from __future__ import annotations

from dataclasses import dataclass

from tdxtrace.analysis import Analyzer, error_line
from tdxtrace.errors import TdxtraceError
from tdxtrace.plugins.contract import AnalyzerInfo, check_analyzer, describe_analyzer
from tdxtrace.plugins.manager import (
    LOAD_PLUGINS_ENV,
    FailedPlugin,
    PluginOrigin,
    TdxtracePluginManager,
    hook_names,
    make_plugin_manager,
)

__all__ = [
    "LOAD_PLUGINS_ENV",
    "AnalyzerInfo",
    "FailedPlugin",
    "LoadedAnalyzers",
    "PluginInfo",
    "PluginOrigin",
    "TdxtracePluginManager",
    "check_analyzer",
    "describe_analyzer",
    "describe_plugins",
    "hook_names",
    "load_analyzers",
    "make_plugin_manager",
]


@dataclass(frozen=True)
class LoadedAnalyzers:
    """Every analyzer the loaded plugins registered, and every plugin that failed."""

    analyzers: tuple[Analyzer, ...]  # sorted by name
    plugin_of: dict[str, str]  # analyzer name -> plugin name
    failed: tuple[FailedPlugin, ...]  # import failures, then hook failures; sorted by name


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin as ``tdxtrace plugins`` shows it."""

    name: str
    version: str
    source: str
    where: str
    hooks: tuple[str, ...]
    analyzers: tuple[str, ...]


def load_analyzers(pm: TdxtracePluginManager) -> LoadedAnalyzers:
    """Call ``register_analyzers`` on each plugin; a duplicate analyzer name is an error."""
    plugin_of: dict[str, str] = {}
    by_name: dict[str, Analyzer] = {}
    failed = list(pm.failed)
    impls = pm.hook.register_analyzers.get_hookimpls()
    for impl in sorted(impls, key=lambda i: i.plugin_name):
        if impl.wrapper or impl.hookwrapper:
            continue  # see tdxtrace.hookspecs: attribution needs one call per plugin
        try:
            returned = impl.function()
            if not isinstance(returned, list | tuple):
                raise TypeError(f"register_analyzers returned {type(returned).__name__}, "
                                "expected a list")
            analyzers = [check_analyzer(a, impl.plugin_name) for a in returned]
        except KeyboardInterrupt:  # the user's Ctrl-C (or SIGTERM) stops the command
            raise
        except BaseException as err:  # one plugin's bug (even SystemExit) must not hide
            # the others' analyzers
            where = pm.origins[impl.plugin_name].where
            failed.append(FailedPlugin(impl.plugin_name, where, error_line(err)))
            continue
        for analyzer in analyzers:
            other = plugin_of.get(analyzer.name)
            if other is not None:
                raise TdxtraceError(f"analyzer name {analyzer.name!r} is registered by both "
                                    f"plugin {other!r} and plugin {impl.plugin_name!r}")
            plugin_of[analyzer.name] = impl.plugin_name
            by_name[analyzer.name] = analyzer
    return LoadedAnalyzers(
        analyzers=tuple(by_name[n] for n in sorted(by_name)),
        plugin_of=plugin_of,
        failed=tuple(sorted(failed, key=lambda f: (f.name, f.where))),
    )


def require_analyzers(loaded: LoadedAnalyzers) -> None:
    """An error when nothing loaded and nothing failed: running no analyzer would print
    nothing and exit 0, which a script would read as a clean bill of health."""
    if not loaded.analyzers and not loaded.failed:
        raise TdxtraceError("no analyzers loaded (check TDXTRACE_LOAD_PLUGINS and "
                            "--plugins-dir; `tdxtrace plugins` lists what loads)")


def describe_plugins(pm: TdxtracePluginManager,
                     loaded: LoadedAnalyzers | None = None) -> list[PluginInfo]:
    """Every loaded plugin with its origin, hooks and analyzers, sorted by plugin name."""
    loaded = load_analyzers(pm) if loaded is None else loaded
    # A plugin whose register_analyzers failed is listed with the failed ones only.
    hook_failed = {f.name for f in loaded.failed if f not in pm.failed}
    infos = []
    for name in sorted(set(pm.origins) - hook_failed):
        origin = pm.origins[name]
        callers = pm.get_hookcallers(pm.get_plugin(name)) or []
        infos.append(PluginInfo(
            name=name, version=origin.version, source=origin.source, where=origin.where,
            hooks=tuple(sorted(c.name for c in callers)),
            analyzers=tuple(sorted(a for a, p in loaded.plugin_of.items() if p == name)),
        ))
    return infos
