"""``snapbuild doctor``: the system parts snapbuild uses, and whether they work here."""

from __future__ import annotations

import sys

import click

from .common import emit_json, json_option


@click.command()
@json_option
def doctor(as_json):
    """Report the system parts snapbuild uses (criu, runc, docker, runsc, cuda-checkpoint):
    found or not, version, and whether each works here.

    Exits 1 when CRIU, which every process snapshot needs, does not work here; the
    other parts are needed only by the features named next to them."""
    from ..doctor import diagnose

    rows = diagnose()
    if as_json:
        emit_json({"checks": rows})
    else:
        for r in rows:
            mark = "ok  " if r["works"] else ("FAIL" if r["found"] else "--  ")
            click.echo(f"{mark} {r['name']:<16} {r.get('version') or '':<10} {r['detail']}")
            if r.get("hint"):
                click.echo(f"     {'':<16} needed for {r['needed_for']}; {r['hint']}")
    if not next(r for r in rows if r["name"] == "criu")["works"]:
        sys.exit(1)
