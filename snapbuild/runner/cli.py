"""``snapbuild-runner``: the node-side command. argparse, not click, to stay lean."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import SnapbuildError, UsageError, error_json, exit_codes_help, render_error
from .. import settings


def _verbosity(dest: str) -> argparse.ArgumentParser:
    v = argparse.ArgumentParser(add_help=False)
    v.add_argument("-v", "--verbose", dest=dest, action="count", default=0,
                   help="log more on stderr: -v what is done, -vv debugging detail "
                        "(also SNAPBUILD_LOG=debug|info|warning|error)")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="snapbuild-runner", parents=[_verbosity("verbose")],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pull snapshots built by `snapbuild build` onto this node, restore their servers, "
                    "keep them running.",
        epilog="The node's store is $SNAPBUILD_HOME (default ~/.cache/snapbuild). Node settings: the file of "
               "--config (TOML), each overridden by its SNAPBUILD_* variable and by a command's flags; "
               "`snapbuild-runner config` lists them all with where each comes from.\n\n" + exit_codes_help())
    p.add_argument("--config", dest="node_config", metavar="FILE", type=Path, help=NODE_CONFIG_HELP)
    # -v before or after the command's name: two counts, added up
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    after = [_verbosity("verbose_after")]
    pull = sub.add_parser("pull", parents=after, help="fetch a snapshot (verified) and optionally write its outputs out",
                          description="Fetch the blobs of a snapshot that this node lacks, verifying each "
                                      "against its digest; with --dest, write every output to DEST/<step>/.")
    pull.add_argument("ref", help=REF_HELP)
    pull.add_argument("--registry", metavar="URL", help=REGISTRY_HELP)
    pull.add_argument("--dest", metavar="DIR", type=Path, help="write the snapshot's outputs here")
    pull.add_argument("--jobs", type=int, default=16, help="parallel blob fetches (default: 16)")
    pull.add_argument("--trust-policy", metavar="FILE", type=Path, help=TRUST_HELP)
    pull.add_argument("--cache-max", metavar="SIZE", help=CACHE_HELP)
    pull.add_argument("--json", action="store_true", help="print the result as JSON")

    rs = sub.add_parser("restore", parents=after, help="start a snapshot's server: restored warm, or booted cold",
                        description="Fetch a snapshot (verified), check this node can take it, restore its "
                                    "server with CRIU and probe it ready; when it cannot be restored (other "
                                    "CPU, PID taken, failed restore...) boot the same server cold, and say why. "
                                    "The server keeps running; stop it with `snapbuild-runner stop PID`.")
    add_restore_args(rs)
    lg = sub.add_parser("logs", parents=after, help="print the log of a snapshot's server on this node",
                        description="Print the end of the server log of a snapshot started here (restored "
                                    "or cold): the same file before and after a restore.")
    lg.add_argument("ref", help=REF_HELP)
    lg.add_argument("--registry", metavar="URL", help=REGISTRY_HELP)
    lg.add_argument("-n", "--lines", type=int, default=50, help="how many lines from the end (default: 50)")
    gc = sub.add_parser("gc", parents=after, help="free node caches that no pulled snapshot uses",
                        description="Let go of the written-out input trees, checkpoint images and unpacked "
                                    "container layers that this store used and that no snapshot pinned in "
                                    "it (the last pull of each name) uses; remove them when no other store "
                                    "uses them either; then remove blobs nothing references. Running "
                                    "servers belong to pinned snapshots.")
    gc.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    gc.add_argument("--json", action="store_true", help="print the result as JSON")
    st = sub.add_parser("stop", parents=after, help="stop a server started by restore", description="Stop a server (and "
                        "everything in its session): SIGTERM, then SIGKILL after 10 s. A container is "
                        "removed with its port forwarder, mounts and network namespace.")
    st.add_argument("pid", metavar="PID|CONTAINER",
                    help="the pid that restore printed, or a container's id")
    sv = sub.add_parser("serve", parents=after, help="run the node agent: keep the configured snapshots running",
                        description="Keep a declared set of snapshots running on this node: restore each (or "
                                    "boot it cold, with the reason), restart a server that dies (with backoff; "
                                    "marked failed after repeated deaths), roll to a new digest when its tag "
                                    "moves, stop everything on SIGTERM. Serves GET /servers, "
                                    "/servers/NAME/log, /metrics (Prometheus) and /healthz. Logs are JSON "
                                    "lines on stderr. The configuration is TOML: see docs/runner.md.")
    sv.add_argument("--config", metavar="FILE", type=Path,
                    help="the agent's configuration (TOML; its servers). Not the node settings file: that is "
                         "the global option, `snapbuild-runner --config NODE.toml serve --config AGENT.toml`")
    sv.add_argument("--server", metavar="NAME=REF[:PORT]", action="append", default=[],
                    help="a server to keep running, without a configuration file (repeatable); "
                         "`web=app:prod` or, for a container served on a node port, `web=app:prod:8080`")
    sv.add_argument("--registry", metavar="URL", help="with --server: " + REGISTRY_HELP)
    sv.add_argument("--trust-policy", metavar="FILE", type=Path, help="with --server: " + TRUST_HELP)
    sv.add_argument("--poll", metavar="SECONDS", type=float, help="how often tags are looked up again (default 30)")
    sv.add_argument("--state-dir", metavar="DIR", type=Path, help="where the agent records what it started")
    sv.add_argument("--api", metavar="ADDR", help="override the API address: HOST:PORT or unix:PATH")
    sv.add_argument("--check", action="store_true", help="check the configuration, print it as JSON, and exit")
    cf = sub.add_parser("config", parents=after, help="print every node setting, its value and where it comes from",
                        description="Print each node setting with its effective value, where that value comes "
                                    "from (default, file PATH, environment VAR, flag), the variable that "
                                    "overrides it and what it does. The file: --config FILE (before the "
                                    "command), else $SNAPBUILD_CONFIG, else /etc/snapbuild/node.toml when it "
                                    "exists. Precedence: default < file < environment < a command's flag.")
    cf.add_argument("--json", action="store_true",
                    help="print a list of {key, value, source, env, doc} as JSON")
    return p


NODE_CONFIG_HELP = ("the node settings file (TOML), read by every command; give it before the command "
                    "(default: $SNAPBUILD_CONFIG, else /etc/snapbuild/node.toml when it exists). Each key is "
                    "overridden by its SNAPBUILD_* variable; `snapbuild-runner config` lists them")


REF_HELP = ("NAME:TAG or NAME@sha256:... (with --registry), or a full reference such as "
            "oci://HOST[:PORT]/REPO/NAME:TAG, s3://BUCKET/PREFIX/NAME:TAG or file:///PATH/NAME:TAG")
REGISTRY_HELP = ("registry URL: file:///PATH, s3://BUCKET/PREFIX or oci://HOST[:PORT]/REPO (default: "
                 "file://$SNAPBUILD_HOME/registry; s3:// takes its endpoint from SNAPBUILD_S3_ENDPOINT or "
                 "AWS_ENDPOINT_URL)")
CACHE_HELP = ("bound the node's store (e.g. 50G; default $SNAPBUILD_NODE_CACHE_MAX, else unbounded): after the "
              "pull, the least recently used other snapshots are let go until it fits")
TRUST_HELP = ("a trust policy (JSON) naming the public keys that may sign each snapshot name: a snapshot it "
              "does not accept is refused before it is fetched (exit 10). Default: $SNAPBUILD_TRUST_POLICY, "
              "else /etc/snapbuild/policy.json when it exists; without one, snapshots are not verified")

LAZY_HELP = ("host-process snapshots: restore with CRIU's lazy pages, the server running while its memory "
             "follows on demand, the command returning once all of it is in place (default: "
             "$SNAPBUILD_LAZY_PAGES, else on; docs/runner.md)")

@dataclass(frozen=True)
class Option:
    """One option of a restore, defined once for ``snapbuild-runner restore`` (argparse)
    and ``snapbuild run`` (click), so the two take the same options."""

    flag: str
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    default: str | None = None
    path: bool = False

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


RESTORE_OPTIONS = (
    Option("--registry", REGISTRY_HELP, metavar="URL"),
    Option("--trust-policy", TRUST_HELP, metavar="FILE", path=True),
    Option("--cache-max", CACHE_HELP, metavar="SIZE"),
    Option("--fallback", "when restoring is impossible: boot cold (default) or fail (exit 9)",
           choices=("cold", "fail"), default="cold"),
    Option("--publish", "container snapshots and host processes in namespaces of their own (isolation: "
                        "namespaces): the host port that reaches the server (default: the same number as the "
                        "server's own port; 0 picks a free one)", metavar="HOST[:CONTAINER]"),
    Option("--lazy-pages", LAZY_HELP, choices=("on", "off")),
    Option("--gpu", "GPU snapshots: the node's GPU(s) the server goes to, by index or UUID (comma-separated, one "
                    "per GPU of the snapshot; default: the GPUs it was taken on when this node has them, else the "
                    "first ones). Other GPUs than at the checkpoint need NVIDIA driver r580+, else it boots cold "
                    "there; a cold boot sees only these", metavar="INDEX|UUID[,...]"),
)


def add_restore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", help=REF_HELP)
    for o in RESTORE_OPTIONS:
        p.add_argument(o.flag, metavar=o.metavar, choices=o.choices, default=o.default,
                       type=Path if o.path else str, help=o.help)
    p.add_argument("--json", action="store_true",
                   help='print {"mode", "reason", "pid", "timings": {...}} as JSON')


def restore(ref: str, options: dict, as_json: bool) -> None:
    """Run a restore with ``options`` (``{Option.dest: value}``) and print its result."""
    from ..signing import UNVERIFIED_WARNING, node_policy
    from .restore import run

    if node_policy(options["trust_policy"]) is None:
        print(f"WARNING {UNVERIFIED_WARNING}", file=sys.stderr)
    lazy = options["lazy_pages"]
    print_restore(run(ref, registry=options["registry"], fallback=options["fallback"] or "cold",
                      publish=options["publish"], trust_policy=options["trust_policy"],
                      cache_max=_size_arg(options["cache_max"]),
                      lazy_pages=None if lazy is None else lazy == "on", gpus=parse_gpus(options["gpu"])), as_json)


def parse_gpus(text: str | None) -> list[str] | None:
    from ..gpu.placement import parse

    return parse(text)


def _size_arg(text: str | None) -> int | None:
    from .node_cache import parse_size

    return parse_size(text) if text else None


def print_restore(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    t = result["timings"]
    how = "restored" if result["mode"] == "restore" else "booted cold"
    print(f"{result['ref']} {how}: pid {result['pid']}, ready in {t['total_s']:.2f}s "
          f"(fetch {t.get('fetch_s', 0):.2f}s, materialize {t.get('materialize_s', 0):.2f}s, "
          f"restore {t.get('restore_s', 0):.2f}s, ready {t.get('ready_s', 0):.2f}s)")
    if result["reason"]:
        print(f"  why not restored: {result['reason']}")
    if result.get("verify"):
        print(f"  check requests (verify): {result['verify']}")
    for m in result.get("mismatches", []):
        if not m["fatal"]:
            print(f"  note: {m['message']}")
    if result.get("gpus"):
        moved = result.get("device_map") or {}
        print(f"  GPU(s): {', '.join(result['gpus'])}" + (" (GPU state moved from "
              + ", ".join(moved) + ")" if moved else ""))
    if result.get("container"):
        print(f"  container: {result['container']}, reachable at {result.get('address')}")
    elif result.get("address"):
        print(f"  in namespaces of its own, reachable at {result['address']}")
    print(f"  log: {result['log']}")
    print(f"  stop it with: snapbuild-runner stop {result.get('container') or result['pid']}")


def print_settings(values: list[settings.Value], as_json: bool) -> None:
    if as_json:
        print(json.dumps([v.to_json() for v in values], indent=2))
        return
    path, _ = settings.config_file()
    print(f"# node settings file: {path}" if path else
          f"# no node settings file ({settings.DEFAULT_FILE} does not exist; --config FILE names one)")
    for v in values:
        shown = "(unset)" if v.value is None else json.dumps(v.to_json()["value"])
        print(f"{v.key} = {shown}  # {v.source}")
        print(f"    ${v.env}: {v.doc}")


def main(argv: list[str] | None = None) -> None:
    from .. import log

    args = _parser().parse_args(argv)
    if args.node_config:  # the children (workers, helpers) read the same file
        os.environ[settings.CONFIG_ENV] = str(args.node_config)
    try:
        settings.effective()  # a bad settings file stops every command before it does anything
        log.setup(args.verbose + getattr(args, "verbose_after", 0), json_lines=args.command == "serve")
        if args.command == "pull":
            from ..runtime.erofs import can_mount
            from .pull import pull

            result = pull(args.ref, registry=args.registry, dest=args.dest, jobs=args.jobs,
                          trust_policy=args.trust_policy, cache_max=_size_arg(args.cache_max),
                          images=can_mount())
            result.pop("config"), result.pop("snapshot"), result.pop("blobs")
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                t = result["timings"]
                print(f"pulled {result['ref']} ({result['digest'][:19]}): {result['blobs_fetched']} blobs, "
                      f"{result['bytes_fetched']} bytes in {t['total_s']:.2f}s"
                      + (" (tree images instead of their trees)" if result.get("tree_images") else ""))
                for step, path in result["outputs"].items():
                    print(f"  {step} -> {path}")
                if result.get("cache", {}).get("evicted"):
                    c = result["cache"]
                    print(f"  node cache over {c['max_bytes']} bytes: let go of {', '.join(c['evicted'])} "
                          f"({c['bytes_freed']} bytes)")
        elif args.command == "restore":
            restore(args.ref, {o.dest: getattr(args, o.dest) for o in RESTORE_OPTIONS}, args.json)
        elif args.command == "logs":
            from .restore import server_log

            sys.stdout.write(server_log(args.ref, registry=args.registry, lines=args.lines))
        elif args.command == "gc":
            from ..runtime.gc import node_gc

            r = node_gc(dry_run=args.dry_run)
            if args.json:
                print(json.dumps(r, indent=2))
            else:
                verb = "would free" if args.dry_run else "freed"
                print(f"{verb} {r['trees_removed']} written-out trees and layers ({r['tree_bytes_freed'] / 2**20:.1f} MiB) "
                      f"and {r['blobs_removed']} blobs ({r['blob_bytes_freed'] / 2**20:.1f} MiB)")
                for path in r["in_use"]:
                    print(f"kept {path}: mounted from its image and still in use (a server runs from it)")
        elif args.command == "serve":
            from .agent import Agent, config_from_flags, load_config
            from .agent.serve import serve_forever

            if bool(args.config) == bool(args.server):
                raise UsageError("serve needs --config FILE or --server NAME=REF (one of them)",
                                 hint="see docs/runner.md, 'The node agent'")
            config = load_config(args.config) if args.config else config_from_flags(
                args.server, registry=args.registry, trust_policy=args.trust_policy)
            if args.api:
                config.api = args.api
            if args.poll is not None:
                config.poll_s = args.poll
            if args.state_dir:
                config.state_dir = args.state_dir
            if args.check:
                from dataclasses import asdict

                print(json.dumps(asdict(config), indent=2, default=str))
                return
            serve_forever(Agent(config))
        elif args.command == "config":
            print_settings(settings.effective(), as_json=args.json)
        elif args.command == "stop":
            from .restore import stop

            if not stop(args.pid):
                print(f"no process {args.pid}", file=sys.stderr)
                sys.exit(6)
            print(f"stopped {args.pid}")
    except KeyboardInterrupt:
        print("ERROR interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`... | head`): nothing more to say, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except SnapbuildError as e:
        if getattr(args, "json", False):
            print(json.dumps(error_json(e), indent=2))
        print(render_error(e), file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
