"""``tdxtrace scenarios``: the built-in scenarios, one line each."""

from __future__ import annotations

import click

from tdxtrace.sim.scenario import builtin_names, load_scenario


@click.command("scenarios")
def scenarios_command() -> None:
    """List the built-in scenarios with a one-line description each.

    \b
    Example:
      tdxtrace scenarios
    """
    names = builtin_names()
    width = max((len(n) for n in names), default=0)
    for name in names:
        scenario = load_scenario(name)
        click.echo(f"{name:<{width}}  {scenario.data['description']}")
