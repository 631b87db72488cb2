"""Options shared by the commands that run analyzers."""

from __future__ import annotations

import click

timeout_option = click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
    help="Fail an analyzer that runs longer than this; the others still run "
         "[default: no limit].")
