"""``snapbuild``: the command line. Each command parses options, calls one library
function, and renders its result; all the work lives in the library."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import exit_codes_help
from .common import (Group, emit_json, json_option, registry_option, render_error,
                     progress_option, s3_endpoint_option, set_option, transfer_display, verbose_option)

OFFLINE_HELP = ("Reach neither the Hub, S3 nor an image registry: floating references come from RECIPE.lock, "
                "files from the store, the Hugging Face cache and the Docker engine's images "
                "(also HF_HUB_OFFLINE=1).")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog="\b\n" + exit_codes_help())
@click.version_option(__version__, prog_name="snapbuild")
@verbose_option
def cli():
    """Build warmed, checkpointed inference servers as cached snapshots.

    A recipe (YAML) lists steps; steps form a DAG; each step's output is cached under a
    key derived from everything it depends on. `build` runs what changed and publishes
    a snapshot to a registry.

    \b
    Quick start:
      snapbuild plan recipes/examples/pipeline.yaml      # what would run, and why
      snapbuild build recipes/examples/pipeline.yaml --tag pipeline:dev
      snapbuild ls && snapbuild inspect pipeline:dev

    A REF is NAME:TAG (or NAME@sha256:...) with --registry URL, or a full reference
    that names its registry: oci://HOST[:PORT]/REPO/NAME:TAG, s3://BUCKET/PREFIX/NAME:TAG,
    file:///PATH/NAME:TAG. The store lives in $SNAPBUILD_HOME (default ~/.cache/snapbuild).
    """


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--offline", is_flag=True, help=OFFLINE_HELP)
@json_option
def plan(recipe, sets, offline, as_json):
    """Show each step's key, whether it runs or is cached, and why it runs.

    \b
    Reasons name the first thing that differs from the step's last build:
      never built | spec.run changed | files changed: app.py | input src changed
    """
    from ..build import plan as make_plans
    from ..plan import short
    from ..recipe import parse_sets

    plans = make_plans(recipe, sets=parse_sets(sets), offline=offline)
    if as_json:
        if len(plans) == 1:
            emit_json(plans[0].to_json())
        else:
            emit_json({"builds": [{"name": p.recipe.build_id, "variant": p.recipe.variant, **p.to_json()} for p in plans]})
        return
    for p in plans:
        n_run = len(p.to_run)
        click.echo(f"{p.recipe.build_id}: {len(p.steps)} steps, {n_run} to run, {len(p.steps) - n_run} cached")
        rows = [(s.name, s.kind, short(s.key), s.action, s.reason) for s in p.steps.values()]
        widths = [max(len(r[i]) for r in rows + [("STEP", "KIND", "KEY", "ACTION", "")]) for i in range(4)]
        click.echo("  " + "  ".join(h.ljust(w) for h, w in zip(("STEP", "KIND", "KEY", "ACTION"), widths, strict=True)) + "  WHY")
        for r in rows:
            click.echo("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[4])


@cli.command(epilog="\b\n" + exit_codes_help((0, 2, 3, 4, 5, 6, 7, 130)))
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--tag", metavar="NAME:TAG", help="Publish the snapshot under this tag (default: the recipe's `publish.tag`).")
@registry_option
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=2, show_default=True,
              help="How many independent steps run at once.")
@click.option("-k", "--keep-going", is_flag=True, help="After a failure, finish the steps that do not depend on it.")
@progress_option
@click.option("--push", "push_to", metavar="URL", multiple=True,
              help="After publishing, push the snapshot to this registry too (repeatable).")
@click.option("--cache-from", metavar="URL", multiple=True,
              help="Look up step results in this registry before running a step (repeatable; first hit wins). "
                   "Without --cache-trust, a result taken from it is named in a warning and recorded in the "
                   "snapshot, which `snapbuild sign` then refuses.")
@click.option("--cache-to", metavar="URL", multiple=True,
              help="Send the step results of this build to this registry's cache (repeatable).")
@click.option("--sign-key", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Sign each step result --cache-to sends with this private key (snapbuild keygen).")
@click.option("--cache-trust", metavar="PUBKEY", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Take from --cache-from only entries signed by this public key (repeatable): a job that can "
                   "write the cache cannot then poison this build.")
@click.option("--locked", is_flag=True,
              help="Refuse to build when a floating reference (Hub revision, S3 object, image tag) resolves "
                   "differently from RECIPE.lock.")
@click.option("--offline", is_flag=True, help=OFFLINE_HELP)
@json_option
def build(recipe, sets, tag, registry, jobs, keep_going, progress, push_to, cache_from, cache_to, sign_key,
          cache_trust, locked, offline, as_json):
    """Build a recipe: run what is not cached, then assemble and publish the snapshot."""
    from ..build import build as run_build
    from ..errors import BuildFailed
    from ..exec.report import make_reporter
    from ..recipe import parse_sets

    results = run_build(recipe, sets=parse_sets(sets), jobs=jobs, keep_going=keep_going, tag=tag,
                        registry=registry, reporter=make_reporter(progress), locked=locked, push=push_to,
                        cache_from=cache_from, cache_to=cache_to, sign_key=sign_key, cache_trust=cache_trust,
                        offline=offline)
    if as_json:
        if len(results) == 1:
            emit_json(results[0].to_json())
        else:
            emit_json({"builds": [{"name": r.build_id, **r.to_json()} for r in results]})
    else:
        for r in results:
            counts = {}
            for s in r.steps.values():
                counts[s.status] = counts.get(s.status, 0) + 1
            summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            click.echo(f"{r.build_id}: {summary} in {r.duration_s:.2f}s")
            if r.snapshot:
                click.echo(f"  snapshot {r.snapshot}")
            if r.tag:
                click.echo(f"  published {r.tag} to {r.registry}")
            for p in r.pushed:
                click.echo(f"  pushed to {p['registry']}: {p['blobs_sent']} of {p['blobs']} blobs sent, "
                           f"{_size(p['bytes_sent'])}")
    failed = [f"{r.build_id}/{n}" for r in results for n in r.failed]
    if failed or not all(r.ok for r in results):
        err = BuildFailed(f"build failed: {', '.join(failed) or 'steps were skipped'}",
                          hint=f"see a step's full log with: snapbuild logs {recipe} STEP")
        codes = {r.steps[n].exit_code for r in results for n in r.failed}
        if codes == {7}:  # every failure was a source that cannot be reached
            err.exit_code = 7
        click.echo(render_error(err), err=True)
        sys.exit(err.exit_code)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("step")
@set_option
def logs(recipe, step, sets):
    """Print the log of STEP's last build (or of the build its cached result came from)."""
    from ..logs import step_log
    from ..recipe import parse_sets

    sys.stdout.write(step_log(recipe, step, sets=parse_sets(sets)))


@cli.command(name="ls")
@registry_option
@json_option
def list_snapshots(registry, as_json):
    """List the snapshots and tags in a registry."""
    from ..inspect import list_registry

    rows = list_registry(registry)
    if as_json:
        emit_json({"snapshots": rows})
        return
    if not rows:
        click.echo("no snapshots (build one with: snapbuild build RECIPE --tag NAME:TAG)")
    for r in rows:
        click.echo(f"{r['name']}:{r['tag']}  {r['digest'][:19]}")


@cli.command()
@click.argument("ref")
@registry_option
@json_option
def inspect(ref, registry, as_json):
    """Show a snapshot: its outputs, sizes, and the step keys it was built from."""
    from ..inspect import inspect_snapshot

    info = inspect_snapshot(ref, registry)
    if as_json:
        emit_json(info)
        return
    click.echo(f"{info['ref']}  {info['digest']}")
    click.echo(f"  recipe {info['name']}" + (f" {info['variant']}" if info["variant"] else ""))
    click.echo(f"  {info['blobs']} blobs, {_size(info['stored_bytes'])} stored, "
               f"{_size(info['content_bytes'])} of content")
    ck = info.get("checkpoint")
    if ck:
        from ..steps.checkpoint import ANON_TIP_BYTES

        anon = ck.get("anonymous_bytes", 0)
        share = f" ({ck['anonymous_share']:.0%} of its resident memory)" if ck.get("anonymous_share") is not None else ""
        click.echo(f"  checkpoint: {_size(ck.get('pages_bytes', 0))} of memory pages")
        click.echo(f"    anonymous memory {_size(anon):>10}  in the checkpoint{share}")
        click.echo(f"    file-backed      {_size(ck.get('file_backed_bytes', 0)):>10}  left out: mapped files, "
                   "mapped again from the same paths on restore")
        if anon > ANON_TIP_BYTES:
            click.echo("    tip: if weights are in the anonymous memory, memory-map them from a mounted input "
                       "(docs/recipes.md, \"Small checkpoints\")")
    if info.get("secret_env"):
        click.echo(f"  warning: the warm-up's env or command has {', '.join(info['secret_env'])}, which look like "
                   "secrets: they are in the snapshot, and the checkpoint holds the server's memory "
                   "(docs/recipes.md, \"Secrets\")")
    if info.get("env_from_node"):
        click.echo(f"  env from the node: {', '.join(info['env_from_node'])} (values from the runner's environment "
                   "at each start, never in the snapshot)")
    click.echo("  outputs:")
    for o in info["outputs"]:
        click.echo(f"    {o['step']:<16} {o['files']:>5} files {_size(o['bytes']):>10}  {o['tree'][:19]}")
    if info.get("tree_images"):
        click.echo("  tree images (mounted by nodes that can, instead of writing the files out):")
        for t in info["tree_images"]:
            click.echo(f"    {t['kind']:<6} {t['of'][:19]}  {t['format']} image {t['image'][:19]}")
    click.echo("  steps:")
    for s in info["steps"]:
        click.echo(f"    {s['name']:<16} {s['kind']:<10} {s['key'][:12]}")


@cli.command()
@click.argument("ref")
@click.argument("dest", metavar="DEST")
@click.option("--as", "as_ref", metavar="NAME:TAG", help="Name and tag at the destination (default: the same as REF; "
              "or give DEST as a full reference).")
@registry_option
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=8, show_default=True,
              help="Blobs in flight at once.")
@progress_option
@json_option
def push(ref, dest, as_ref, registry, jobs, progress, as_json):
    """Copy snapshot REF from the local registry (or --registry) to DEST: a registry
    URL (the snapshot keeps its name and tag there), or a full reference that names
    the repository and tag to push to.

    Only the blobs DEST lacks are sent, in parallel, each checked against its
    digest; the tag is written last, so a push that is interrupted shows nothing at
    the destination, and running it again sends what is still missing.

    \b
      snapbuild push torch-mlp:dev oci://registry.example:5000/snapshots
      snapbuild push torch-mlp:dev oci://registry.example:5000/team/torch-mlp:v2
      snapbuild push torch-mlp:dev s3://my-bucket/snapshots --s3-endpoint http://127.0.0.1:9000
    """
    from ..errors import UsageError
    from ..registry import default_registry_url, locate, open_registry, parse_ref
    from ..registry.ref import names_a_snapshot, split_full
    from ..registry.transfer import copy
    from ..store import Store

    store = Store()
    ref, registry = locate(ref, registry)
    src_ref = parse_ref(ref)
    full = split_full(dest) if names_a_snapshot(dest) else None
    if full:
        if as_ref:
            raise UsageError(f"DEST {dest} names the tag to push to already: leave out --as {as_ref}")
        dest, as_ref = full
    with store.using(), transfer_display(progress, as_json) as show:
        out = copy(open_registry(registry or default_registry_url(store.home)), src_ref, open_registry(dest),
                   parse_ref(as_ref) if as_ref else src_ref, store.blobs, jobs=jobs, progress=show)
    if as_json:
        emit_json(out)
        return
    mounted = f" ({out['blobs_mounted']} mounted from other repositories)" if out["blobs_mounted"] else ""
    click.echo(f"pushed {out['ref']} ({out['digest'][:19]}) to {out['registry']}: {out['blobs_sent']} of "
               f"{out['blobs']} blobs sent{mounted}, {_size(out['bytes_sent'])}, in {out['seconds']:.2f}s")


@cli.command()
@click.argument("ref")
@registry_option
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=16, show_default=True,
              help="Blobs in flight at once.")
@progress_option
@json_option
def pull(ref, registry, jobs, progress, as_json):
    """Fetch snapshot REF from --registry into the local store and tag it in the local
    registry, so that `snapbuild run REF` and `inspect REF` work here without --registry.

    Every blob is checked against its digest; what the store already holds is not
    fetched again.
    """
    from ..registry import default_registry_url, locate, open_registry, parse_ref
    from ..registry.transfer import copy
    from ..store.snapshot import check_snapshot
    from ..store import Store

    store = Store()
    ref, registry = locate(ref, registry)
    r = parse_ref(ref)
    local = default_registry_url(store.home)
    with store.using(), transfer_display(progress, as_json) as show:
        out = copy(open_registry(registry or local), r, open_registry(local), r, store.blobs, jobs=jobs,
                   progress=show,
                   check=lambda manifest: check_snapshot(store.blobs, manifest, str(r)))
    if as_json:
        emit_json(out)
        return
    click.echo(f"pulled {out['ref']} ({out['digest'][:19]}): {out['blobs_fetched']} blobs fetched, "
               f"{_size(out['bytes_fetched'])}")


@cli.command(name="rm")
@click.argument("ref")
@registry_option
@json_option
def remove(ref, registry, as_json):
    """Remove tag NAME:TAG (or with NAME@sha256:..., the tags of that manifest) from a
    registry. On oci:// the manifest itself is deleted, with every tag that names it
    (the distribution API deletes by digest). Blobs stay until the registry's own
    garbage collection (`snapbuild cache gc` for the local one)."""
    from ..registry import default_registry_url, locate, open_registry, parse_ref
    from ..store import Store

    ref, registry = locate(ref, registry)
    reg = open_registry(registry or default_registry_url(Store().home))
    r = parse_ref(ref)
    digest = reg.resolve(r)
    reg.delete(r)
    if as_json:
        emit_json({"removed": str(r), "digest": digest, "registry": reg.url})
        return
    click.echo(f"removed {r} ({digest[:19]}) from {reg.url}")


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@json_option
def keygen(path, as_json):
    """Make an ed25519 key pair for signing snapshots: PATH (private, mode 0600) and
    PATH.pub (public, for trust policies). Keep the private key in your CI's secrets."""
    from ..signing import key_id, keygen as make, load_public_key

    private, public = make(path)
    kid = key_id(load_public_key(public))
    if as_json:
        emit_json({"private_key": str(private), "public_key": str(public), "key_id": kid})
        return
    click.echo(f"wrote {private} (private) and {public} (public), key id {kid}")


@cli.command()
@click.argument("ref")
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The private key (from `snapbuild keygen`).")
@registry_option
@click.option("--allow-untrusted-cache", is_flag=True,
              help="Sign even when steps of the snapshot came from a remote build cache without --cache-trust "
                   "(the build warned, and its config records them).")
@json_option
def sign(ref, key_path, registry, allow_untrusted_cache, as_json):
    """Sign snapshot REF in a registry with an ed25519 key.

    The signature is stored beside the snapshot, as an OCI referrer of its manifest
    (with the OCI 1.1 fallback tag `sha256-<hex>` for registries without the referrers
    API). Nodes check it with `snapbuild-runner restore --trust-policy FILE`.

    Refuses (exit 10) a snapshot with steps taken from a remote build cache that
    nothing verified (`build --cache-from` without `--cache-trust`): whoever can write
    that cache chose them, and a signature would make nodes trust them.
    """
    from ..registry import default_registry_url, locate, open_registry, parse_ref
    from ..signing import sign_snapshot
    from ..store import Store

    ref, registry = locate(ref, registry)
    out = sign_snapshot(open_registry(registry or default_registry_url(Store().home)), parse_ref(ref),
                        Path(key_path), allow_unverified_cache=allow_untrusted_cache)
    if out["unverified_cache"]:
        names = ", ".join(s.get("name", "?") for s in out["unverified_cache"])
        click.echo(f"warning: signed anyway (--allow-untrusted-cache): steps {names} came from a remote build "
                   "cache that nothing verified; nodes that trust this key will run them", err=True)
    if as_json:
        emit_json(out)
        return
    click.echo(f"signed {out['ref']} ({out['digest'][:19]}) with key {out['key_id'][:19]}: signature "
               f"{out['signature'][:19]} in {out['registry']}")


@cli.command(name="lock")
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--update", is_flag=True, help="Write what the references resolve to now into RECIPE.lock.")
@json_option
def lock_cmd(recipe, sets, update, as_json):
    """Check RECIPE.lock against what the recipe's floating references (Hub revisions,
    S3 objects, image tags) resolve to now; with --update, refresh it.

    Exits 3 when the lock file is out of date (without --update), as `build --locked`
    does. `build` writes the lock file after every successful build.
    """
    from .. import lock
    from ..build import plan as make_plans
    from ..recipe import parse_sets

    plans = make_plans(recipe, sets=parse_sets(sets))
    current = {p.recipe.build_id: lock.entries(p) for p in plans}
    drift = {b: lock.drift(recipe, b, e) for b, e in current.items()}
    changed = lock.write(recipe, current) if update else False
    if as_json:
        emit_json({"lock_file": str(lock.lock_path(recipe)), "drift": drift, "updated": changed})
    else:
        for b, lines in drift.items():
            for line in lines:
                click.echo(f"{b}: {line}")
        if update:
            click.echo(f"{'updated' if changed else 'up to date:'} {lock.lock_path(recipe)}")
        elif not any(drift.values()):
            click.echo(f"up to date: {lock.lock_path(recipe)}")
    if not update and any(drift.values()):
        sys.exit(lock.LockDrift.exit_code)


def restore_options(f):
    """The runner's restore options (snapbuild.runner.cli.RESTORE_OPTIONS), as click options."""
    from ..runner.cli import RESTORE_OPTIONS

    for o in reversed(RESTORE_OPTIONS):
        kind = click.Choice(o.choices) if o.choices else click.Path(dir_okay=False, path_type=Path) if o.path else str
        f = click.option(o.flag, o.dest, metavar=o.metavar, type=kind, default=o.default,
                         help=o.help[0].upper() + o.help[1:] + ".")(f)
    return f


@cli.command(name="run")
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


@cli.command(name="bench")
@click.argument("ref")
@registry_option
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Runs of each mode (cold boot, restore), alternated.")
@click.option("--drop-caches/--no-drop-caches", default=None,
              help="Also measure with the page cache dropped before every run (default: when root).")
@json_option
def bench_snapshot(ref, registry, runs, drop_caches, as_json):
    """Cold boot to ready versus restore to ready, medians and ratio.

    Both modes start the same server from the same snapshot, and each server is asked
    the snapshot's check requests (`verify:` of its checkpoint step), whose answers must
    be the warm-up's; without any, nothing is compared and the report says so. The port
    must be free.
    """
    from ..runner.bench import bench

    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    r = bench(ref, runs=runs, registry=registry, drop=drop_caches, progress=say)
    if as_json:
        emit_json(r)
        return
    click.echo(f"{ref}: {runs} runs per mode, alternated; seconds from runner start to ready")
    click.echo(f"  {'page cache':<12} {'cold median':>12} {'restore median':>15} {'speedup':>8}")
    for label, phase in (("warm", r["warm"]), ("dropped", r["page_cache_dropped"])):
        if phase:
            click.echo(f"  {label:<12} {phase['cold_s']['median']:>12.3f} {phase['restore_s']['median']:>15.3f} "
                       f"{phase['speedup']:>7.1f}x")
    own = r["warm"].get("overhead")
    if own:
        share = f" ({own['share_of_criu']:.0%} of it)" if own["share_of_criu"] is not None else ""
        click.echo(f"  a warm restore's own overhead (all but CRIU and the first probe): {own['own_s']:.3f}s; "
                   f"CRIU {own['criu_s']:.3f}s{share}")
    click.echo(f"  first restore on this node (writes the images out): {r['restore_first_s']:.3f}s")
    click.echo(f"  answers: {_bench_answers(r['answers'])}")
    if r.get("verify"):
        click.echo("  check requests after each restore: "
                   + ", ".join(f"{n} {how}" for how, n in sorted(r["verify"].items())))
    if r.get("note"):
        click.echo(f"  note: {r['note']}")


def _bench_answers(a: dict) -> str:
    """The bench report's ``answers``, in words."""
    if a["compared"] is None:
        return f"not compared ({a['why']})"
    if a["same"]:
        return f"the warm-up's, from every server ({a['compared']}, {a['asked']} servers asked)"
    return (f"DIFFERENT from the warm-up's on {a['different']} of {a['asked']} servers ({a['compared']}); "
            f"first: {a['first_difference']}")


@cli.command()
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


@cli.group(cls=Group)
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
        click.echo(f"{r['key'][:12]}  {r['kind']:<10} {r['name']:<20} {_size(r['bytes']):>10}")


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
               f"{_size(info['stored_bytes'])} on disk for {_size(info['artifact_bytes'])} of artifacts")


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
    click.echo(f"{verb} {rep.blobs_removed} blobs ({_size(rep.bytes_freed)}), {rep.refs_removed} cache entries, "
               f"{rep.logs_removed} logs, {rep.temp_removed} leftovers")


def _age(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        return float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise click.BadParameter(f"{text!r}: expected a number and a unit (s, m, h, d, w), e.g. 7d",
                                 param_hint="--older-than") from None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def main() -> None:
    import signal

    def _terminate(signum, _frame):
        # CI cancels jobs with SIGTERM: unwind like Ctrl-C so running commands are
        # stopped and nothing half-written is left visible.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="snapbuild")


if __name__ == "__main__":
    main()
