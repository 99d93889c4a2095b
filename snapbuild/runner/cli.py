"""``snapbuild-runner``: the node-side command. argparse, not click, to stay lean."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import SnapbuildError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="snapbuild-runner",
        description="Pull snapshots built by `snapbuild build` onto this node.",
        epilog="The node's store is $SNAPBUILD_HOME (default ~/.cache/snapbuild).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pull = sub.add_parser("pull", help="fetch a snapshot (verified) and optionally write its outputs out",
                          description="Fetch the blobs of a snapshot that this node lacks, verifying each "
                                      "against its digest; with --dest, write every output to DEST/<step>/.")
    pull.add_argument("ref", help="NAME:TAG or NAME@sha256:...")
    pull.add_argument("--registry", metavar="URL", help="registry URL (default: file://$SNAPBUILD_HOME/registry)")
    pull.add_argument("--dest", metavar="DIR", type=Path, help="write the snapshot's outputs here")
    pull.add_argument("--jobs", type=int, default=4, help="parallel blob fetches (default: 4)")
    pull.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "pull":
            from .pull import pull

            result = pull(args.ref, registry=args.registry, dest=args.dest, jobs=args.jobs)
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                t = result["timings"]
                print(f"pulled {result['ref']} ({result['digest'][:19]}): {result['blobs_fetched']} blobs, "
                      f"{result['bytes_fetched']} bytes in {t['total_s']:.2f}s")
                for step, path in result["outputs"].items():
                    print(f"  {step} -> {path}")
    except KeyboardInterrupt:
        print("ERROR interrupted", file=sys.stderr)
        sys.exit(130)
    except SnapbuildError as e:
        if getattr(args, "json", False):
            print(json.dumps({"error": {"type": type(e).__name__, "message": e.message, "hint": e.hint,
                                        "exit_code": e.exit_code}}, indent=2))
        print(f"ERROR {e}", file=sys.stderr)
        if e.hint:
            print(f"TIP   {e.hint}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
