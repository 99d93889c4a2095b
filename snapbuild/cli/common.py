"""What every command shares: error rendering, exit codes, JSON output, common options."""

from __future__ import annotations

import json
import os
import sys

import click

from ..errors import RecipeError, SnapbuildError


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


def render_error(e: SnapbuildError) -> str:
    text = e.render() if isinstance(e, RecipeError) else str(e)
    out = f"ERROR {text}"
    if e.hint:
        out += f"\nTIP   {e.hint}"
    return out


def error_json(e: SnapbuildError) -> dict:
    err = {"type": type(e).__name__, "message": e.message, "exit_code": e.exit_code}
    if e.hint:
        err["hint"] = e.hint
    if isinstance(e, RecipeError):
        err.update(file=e.file, line=e.line, column=e.column, key_path=list(e.key_path))
    return {"error": err}


class Group(click.Group):
    """Turns :class:`SnapbuildError` into ``ERROR``/``TIP`` lines and its exit code."""

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


class TransferProgress:
    """``progress`` for registry transfers: a line on stderr at most every 2 seconds
    (``sent 1200/14702 blobs, 118.3 MiB``), none when JSON is asked for."""

    def __init__(self, quiet: bool) -> None:
        import threading
        import time

        self.quiet, self.time, self.lock = quiet, time.monotonic, threading.Lock()
        self.count = self.bytes = 0
        self.last = self.time()
        self.verb = None

    def __call__(self, verb: str, total: int, size: int) -> None:
        with self.lock:
            if verb != self.verb:
                self.verb, self.count, self.bytes = verb, 0, 0
            self.count += 1
            self.bytes += size
            now = self.time()
            if not self.quiet and (now - self.last >= 2 or self.count == total):
                self.last = now
                click.echo(f"{verb} {self.count}/{total} blobs, {self.bytes / 2**20:.1f} MiB", err=True)
