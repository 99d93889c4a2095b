"""``snapbuild run``: start a snapshot's server here, with the runner's restore options."""

from __future__ import annotations

from pathlib import Path

import click

from .common import json_option, s3_endpoint_option


def restore_options(f):
    """The runner's restore options (snapbuild.runner.cli.RESTORE_OPTIONS), as click options."""
    from ..runner.cli import RESTORE_OPTIONS

    for o in reversed(RESTORE_OPTIONS):
        kind = click.Choice(o.choices) if o.choices else click.Path(dir_okay=False, path_type=Path) if o.path else str
        f = click.option(o.flag, o.dest, metavar=o.metavar, type=kind, default=o.default,
                         help=o.help[0].upper() + o.help[1:] + ".")(f)
    return f


@click.command(name="run")
@click.argument("ref")
@restore_options
@s3_endpoint_option
@json_option
def run_snapshot(ref, as_json, **options):
    """Start a snapshot's server here: restore it warm, or boot it cold and say why.

    The same as `snapbuild-runner restore`, with the same options. The server keeps
    running; stop it with `snapbuild-runner stop PID`.
    """
    from ..runner.cli import restore

    restore(ref, options, as_json)
