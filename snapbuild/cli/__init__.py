"""The ``snapbuild`` command line (click). Needs the ``build`` extra."""

try:
    import click  # noqa: F401
except ImportError:  # pragma: no cover - exercised only on runner-only installs
    import sys

    sys.stderr.write("ERROR the snapbuild build tool needs its build dependencies\n"
                     "TIP   pip install 'snapbuild[build]' (runner-only nodes use snapbuild-runner)\n")
    sys.exit(1)
