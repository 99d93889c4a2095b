"""``snapbuild cache``: look after the local store (ls, du, verify, gc)."""

from __future__ import annotations

import sys

import click

from .common import Group, emit_json, human_size, json_option, render_error


@click.group(cls=Group)
def cache():
    """Look after the local store ($SNAPBUILD_HOME)."""


@cache.command(name="ls")
@json_option
def cache_ls(as_json):
    """List cached step outputs."""
    from ..inspect import cache_entries

    rows = cache_entries()
    if as_json:
        emit_json({"entries": rows})
        return
    for r in rows:
        click.echo(f"{r['key'][:12]}  {r['kind']:<10} {r['name']:<20} {human_size(r['bytes']):>10}")


@cache.command(name="du")
@json_option
def cache_du(as_json):
    """Show how much the store holds."""
    from ..store import Store

    info = Store().du()
    if as_json:
        emit_json(info)
        return
    click.echo(f"{info['home']}: {info['steps']} cached steps, {info['blobs']} blobs, "
               f"{human_size(info['stored_bytes'])} on disk for {human_size(info['artifact_bytes'])} of artifacts")


@cache.command(name="verify")
@click.option("--repair", is_flag=True, help="Delete corrupt blobs and the cache entries that use them; the next build rebuilds them.")
@json_option
def cache_verify(repair, as_json):
    """Re-hash every blob and check every cache entry. Exit status 5 on any problem."""
    from ..errors import IntegrityError
    from ..store import Store

    rep = Store().verify(repair=repair)
    if as_json:
        emit_json({"ok": rep.ok, "blobs_checked": rep.blobs_checked, "refs_checked": rep.refs_checked,
                   "corrupt_blobs": rep.corrupt_blobs,
                   "broken_refs": [{"key": k, "why": w} for k, w in rep.broken_refs], "repaired": rep.repaired})
    else:
        click.echo(f"checked {rep.blobs_checked} blobs and {rep.refs_checked} cache entries")
        for d in rep.corrupt_blobs:
            click.echo(f"  corrupt blob {d}" + (" (removed)" if repair else ""))
        for k, w in rep.broken_refs:
            click.echo(f"  broken entry {k[:12]}: {w}" + (" (removed)" if repair else ""))
    if not rep.ok and not repair:
        e = IntegrityError(f"{len(rep.corrupt_blobs)} corrupt blobs, {len(rep.broken_refs)} broken cache entries",
                           hint="run `snapbuild cache verify --repair`, then build again")
        click.echo(render_error(e), err=True)
        sys.exit(e.exit_code)


@cache.command(name="gc")
@click.option("--older-than", metavar="AGE", help="Also forget cache entries unused for AGE (e.g. 7d, 12h, 30m).")
@click.option("--dry-run", is_flag=True, help="Say what would go, remove nothing.")
@json_option
def cache_gc(older_than, dry_run, as_json):
    """Remove blobs no cache entry or snapshot uses, and leftovers of killed builds."""
    from ..store import Store

    rep = Store().gc(older_than_s=_age(older_than) if older_than else None, dry_run=dry_run)
    if as_json:
        emit_json(vars(rep) | {"dry_run": dry_run})
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {rep.blobs_removed} blobs ({human_size(rep.bytes_freed)}), {rep.refs_removed} cache entries, "
               f"{rep.logs_removed} logs, {rep.temp_removed} leftovers")


def _age(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        return float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise click.BadParameter(f"{text!r}: expected a number and a unit (s, m, h, d, w), e.g. 7d",
                                 param_hint="--older-than") from None
