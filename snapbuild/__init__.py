"""snapbuild: build warmed, checkpointed inference servers as cached snapshots.

The package is split so that the node-side runner (:mod:`snapbuild.runner`) imports
only :mod:`snapbuild.store`, :mod:`snapbuild.registry` and :mod:`snapbuild.errors`;
everything that parses recipes or plans builds lives in the build-side packages.
"""

__version__ = "0.1.0"
