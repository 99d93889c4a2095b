"""``snapbuild``: the command line. The group lives here; each verb is a module of its
own (snapbuild/cli/VERB.py) that parses options, calls one library function, and
renders its result; all the work lives in the library, what the verbs share in
:mod:`.common`. The verbs import the library inside their functions, so that
``snapbuild --help`` loads none of it."""

from __future__ import annotations

import click

from .. import __version__
from ..errors import exit_codes_help
from .bench import bench_snapshot
from .build import build
from .cache import cache
from .common import Group, verbose_option
from .doctor import doctor
from .inspect import inspect
from .keygen import keygen
from .lock import lock_cmd
from .logs import logs
from .ls import list_snapshots
from .plan import plan
from .pull import pull
from .push import push
from .rm import remove
from .run import run_snapshot
from .sign import sign


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


for _verb in (plan, build, logs, list_snapshots, inspect, push, pull, remove, keygen, sign, lock_cmd, run_snapshot,
              bench_snapshot, doctor, cache):
    cli.add_command(_verb)
del _verb


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
