"""``snapbuild logs``: the log of a step's last build."""

from __future__ import annotations

import sys

import click

from .common import set_option


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("step")
@set_option
def logs(recipe, step, sets):
    """Print the log of STEP's last build (or of the build its cached result came from)."""
    from ..logs import step_log
    from ..recipe import parse_sets

    sys.stdout.write(step_log(recipe, step, sets=parse_sets(sets)))
