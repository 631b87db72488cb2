"""``tdxtrace plugins``: which plugins load, where from, what they provide, which failed."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click

from tdxtrace.commands.options import path_param
from tdxtrace.plugins import describe_plugins, load_analyzers, make_plugin_manager

F = TypeVar("F", bound=Callable[..., Any])


def plugins_dir_option(command: F) -> F:
    """``--plugins-dir DIR`` (repeatable), shared by every command that loads plugins."""
    return click.option(
        "--plugins-dir", "plugins_dirs", multiple=True, metavar="DIR",
        type=path_param(),
        help="Also load every *.py file in DIR as a plugin (repeatable).",
    )(command)


@click.command("plugins")
@plugins_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def plugins_command(plugins_dirs: Sequence[Path], as_json: bool) -> None:
    """List the plugins that load: name, version, origin, hooks and analyzers.

    Plugins come from the `tdxtrace` entry-point group (the built-in analyzers are plugins
    too) and from --plugins-dir folders; TDXTRACE_LOAD_PLUGINS=a,b limits which load. Plugins
    that failed to load are listed with their error, and the exit status is then 1.

    \b
    JSON: {"plugins": [{"name", "version", "source", "where", "hooks", "analyzers"}, ...],
           "failed": [{"name", "where", "error"}, ...]}, each list sorted by name.

    \b
    Example:
      tdxtrace plugins --plugins-dir ./my-plugins
    """
    pm = make_plugin_manager(plugins_dirs=plugins_dirs)
    loaded = load_analyzers(pm)
    infos = describe_plugins(pm, loaded)
    if as_json:
        doc = {"plugins": [asdict(i) for i in infos], "failed": [asdict(f) for f in loaded.failed]}
        click.echo(json.dumps(doc, indent=2))
    else:
        for info in infos:
            click.echo(f"{info.name}  {info.version}  {info.source}: {info.where}")
            click.echo(f"    hooks: {', '.join(info.hooks) or '-'}")
            click.echo(f"    analyzers: {', '.join(info.analyzers) or '-'}")
        if not infos:
            click.echo("no plugins loaded")
        if loaded.failed:
            click.echo("failed plugins:")
        for failed in loaded.failed:
            click.echo(f"{failed.name}  FAILED: {failed.where}")
            click.echo(f"    {failed.error}")
    if loaded.failed:
        sys.exit(1)
