"""Options shared by the commands that run analyzers."""

from __future__ import annotations

import os
from pathlib import Path

import click

timeout_option = click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
    help="Fail an analyzer that runs longer than this; the others still run "
         "[default: no limit].")


class PathParam(click.Path):
    """A path parameter that refuses the empty string: ``Path("")`` is ``.``, the current
    folder, which nobody typing ``-o ''`` (or an unset shell variable) meant."""

    def convert(self, value: str | os.PathLike[str], param: click.Parameter | None,
                ctx: click.Context | None) -> str | bytes | os.PathLike[str]:
        if value == "":
            self.fail("the path is empty", param, ctx)
        return super().convert(value, param, ctx)


def path_param(**kwargs: bool) -> PathParam:
    """``click.Path`` converting to ``pathlib.Path``, the empty string refused."""
    return PathParam(path_type=Path, **kwargs)
