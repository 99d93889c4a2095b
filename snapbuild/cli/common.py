"""What every command shares: error rendering, exit codes, JSON output, common options, sizes in words."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from ..errors import SnapbuildError, error_json, render_error


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


_VERBOSE_META = "snapbuild.verbose"


def _verbosity(ctx, _param, value):
    # -v counts before and after the command's name (`snapbuild -v build` and
    # `snapbuild build -vv`): ctx.meta is shared by the whole context tree.
    from .. import log

    if value or _VERBOSE_META not in ctx.meta:
        ctx.meta[_VERBOSE_META] = ctx.meta.get(_VERBOSE_META, 0) + value
        try:
            log.setup(ctx.meta[_VERBOSE_META])
        except SnapbuildError as e:
            click.echo(render_error(e), err=True)
            sys.exit(e.exit_code)
    return value


def verbose_option(f):
    return click.option("-v", "--verbose", count=True, expose_value=False, is_eager=True, callback=_verbosity,
                        help="Log more on stderr: -v what is done, -vv debugging detail "
                             "(also SNAPBUILD_LOG=debug|info|warning|error).")(f)


class Group(click.Group):
    """Turns :class:`SnapbuildError` into ``ERROR``/``TIP`` lines and its exit code;
    gives every command ``-v/--verbose``."""

    def add_command(self, cmd, name=None):
        if isinstance(cmd, click.Group) and not isinstance(cmd, Group):
            raise TypeError(f"{cmd.name}: sub-groups take cls=Group, so their commands get -v too")
        if not any(p.name == "verbose" for p in cmd.params):
            verbose_option(cmd)
        super().add_command(cmd, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SnapbuildError as e:
            if ctx.meta.get(_JSON_META):
                emit_json(error_json(e))
            click.echo(render_error(e), err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:  # click would print "Aborted!" and exit 1
            click.echo("ERROR interrupted; nothing partial was kept (the next build resumes from the cache)",
                       err=True)
            sys.exit(130)


_JSON_META = "snapbuild.json"


def _remember_json(ctx, _param, value):
    # ctx.meta is shared by the whole context tree, so the group sees it when it
    # renders an error raised inside the subcommand.
    ctx.meta[_JSON_META] = value
    return value


set_option = click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
                          help="Set a template variable (overrides `vars:`; a matrix variable picks one combination). Repeatable.")
json_option = click.option("--json", "as_json", is_flag=True, callback=_remember_json, is_eager=True,
                           help="Print machine-readable JSON on stdout (errors too).")
OFFLINE_HELP = ("Reach neither the Hub, S3 nor an image registry: floating references come from RECIPE.lock, "
                "files from the store, the Hugging Face cache and the Docker engine's images "
                "(also HF_HUB_OFFLINE=1).")
REGISTRY_URLS = "file:///PATH, s3://BUCKET/PREFIX or oci://HOST[:PORT]/REPO"


def _s3_endpoint(ctx, param, value):
    if value:  # read where every s3:// registry is opened, however deep
        os.environ["SNAPBUILD_S3_ENDPOINT"] = value
    return value


s3_endpoint_option = click.option("--s3-endpoint", metavar="URL", callback=_s3_endpoint, expose_value=False,
                                  help="Endpoint of an S3-compatible store, for s3:// registries "
                                       "(also SNAPBUILD_S3_ENDPOINT, or boto3's AWS_ENDPOINT_URL).")


def registry_option(f):
    """``--registry URL`` and ``--s3-endpoint URL``."""
    f = s3_endpoint_option(f)
    return click.option("--registry", metavar="URL", default=None,
                        help=f"Registry to use: {REGISTRY_URLS} (default: file://$SNAPBUILD_HOME/registry).")(f)


progress_option = click.option("--progress", type=click.Choice(["auto", "tty", "plain", "none"]), default="auto",
                               show_default=True,
                               help="Progress display on stderr: live on a terminal, plain lines otherwise.")


@contextlib.contextmanager
def transfer_display(mode: str, as_json: bool):
    """A registry transfer's ``progress``: ``--progress`` (none with --json unless asked)."""
    from ..exec.report import make_transfer_display

    display = make_transfer_display("none" if as_json and mode == "auto" else mode)
    try:
        yield display
    finally:
        display.close()


def human_size(n: float) -> str:
    """``n`` bytes in words: ``512 B``, ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
