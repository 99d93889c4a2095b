"""Where a node (or a build machine warming a server) keeps what it writes out: every
path under the run root and the image cache, in one place.

::

    $SNAPBUILD_RUN_ROOT (default /var/lib/snapbuild)    the run root: recorded in each
    |                                                    snapshot, the same on every node
    +-- trees/<hex>/               an input tree (code, environment, weights), written out;
    |                                once complete, shown read-only to servers (a read-only
    |                                bind mount of itself, runtime.trees.show_read_only)
    |     .snapbuild-complete        ... complete; lists the stores that use it, one a line
    +-- trees/<hex>.partial/       a tree being written out (never used; redone)
    +-- trees/<hex>.users          the users of a tree mounted from its image (read-only)
    +-- tree-images/<hex>.erofs    the image file of a tree or layer mounted from it
    +-- tree-images/<hex>.erofs.partial  an image being written
    +-- locks/tree-<hex>.lock      held while tree <hex> is written, mounted or released
    +-- layers/<hex>/              a container image layer, unpacked or mounted (root only)
    +-- layers/<hex>.snapbuild-layer-complete-v2   ... complete; lists its users
    +-- layers/<hex>.partial/      a layer being unpacked
    +-- layers/.locks/<hex>.lock   held while layer <hex> is unpacked, mounted or released
    +-- bundles/<container>/       a container's OCI bundle: config.json, rootfs/, overlay/
    +-- containers/<container>.json  the record of a running container (its forwarder...)
    +-- run/<name>-<key>/          a server's run folder: inputs/ (links to trees/),
          home/, server.log; a container's: one <container>/ folder per instance

    $SNAPBUILD_IMAGE_CACHE, else /dev/shm/snapbuild, else the run root: the image cache
    +-- trees/<hex>/ ...           checkpoint images written out, with the same rules
                                   (marker, .partial, locks/) as input trees

Lock order: a tree's lock before a layer's (``node gc`` takes both to delete an image
file). Complete trees and layers are trusted without being read again, so every folder
here is this user's and writable by nobody else (:func:`secure_dir`); layers are
root's alone, since they keep file capabilities.

A leaf: standard library and the error types only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import SnapbuildError

DEFAULT_RUN_ROOT = "/var/lib/snapbuild"
TREE_MARKER = ".snapbuild-complete"  # inside a tree: the stores (one path a line) that use it
LAYER_MARKER = ".snapbuild-layer-complete-v2"  # beside a layer; v2: modification times kept
IMAGE_SUFFIX = ".erofs"
#: In a run folder: the server's log (the runner opens it; CRIU reopens it by path) and
#: the links to its input trees. The runner's own: a checkpoint never carries them
#: (runtime.runfiles), a snapshot never writes them (schema.Runtime.run_files).
LOG_NAME = "server.log"
INPUTS_NAME = "inputs"
RUN_OWN = (LOG_NAME, INPUTS_NAME)


def run_root() -> Path:
    """Where servers run from. Recorded in each snapshot: build machine and nodes must agree."""
    from .. import settings

    return Path(settings.get("run_root"))


def images_root(run_root: str | Path) -> Path:
    """Where checkpoint images are written out: $SNAPBUILD_IMAGE_CACHE, else tmpfs when
    there is one (restore reads every page image), else the run root."""
    from .. import settings

    if settings.get("image_cache"):
        return Path(settings.get("image_cache"))
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / "snapbuild"
    return Path(run_root)


def hex_of(digest: str) -> str:
    return digest.split(":", 1)[1]


# --- trees ---------------------------------------------------------------------------------

def trees_dir(root: Path) -> Path:
    return root / "trees"


def tree_dir(root: Path, digest: str) -> Path:
    return trees_dir(root) / hex_of(digest)


def tree_partial(tree: Path) -> Path:
    return tree.with_name(tree.name + ".partial")


def tree_users(tree: Path) -> Path:
    """The users file beside a tree mounted from its image (its folder is read-only)."""
    return tree.with_name(tree.name + ".users")


def tree_lock(root: Path, hexpart: str) -> Path:
    return root / "locks" / f"tree-{hexpart}.lock"


# --- layers --------------------------------------------------------------------------------

def layer_cache(root: Path) -> Path:
    return root / "layers"


def layer_marker(cache: Path, hexpart: str) -> Path:
    return cache / f"{hexpart}{LAYER_MARKER}"


def layer_partial(cache: Path, hexpart: str) -> Path:
    return cache / f"{hexpart}.partial"


def layer_lock(cache: Path, hexpart: str) -> Path:
    return cache / ".locks" / f"{hexpart}.lock"


# --- images, containers, run folders --------------------------------------------------------

def image_files(root: Path) -> Path:
    return root / "tree-images"


def image_file(folder: Path) -> Path:
    """Where the image file of a tree or layer folder (``<root>/trees/<hex>``,
    ``<root>/layers/<hex>``) is kept: ``<root>/tree-images/<hex>.erofs``."""
    return image_files(folder.parent.parent) / f"{folder.name}{IMAGE_SUFFIX}"


def image_partial(image: Path) -> Path:
    """An image file (:func:`image_file`) while it is written."""
    return image.with_name(image.name + ".partial")


def bundle_dir(root: Path, container: str) -> Path:
    return root / "bundles" / container


def records_dir(root: Path) -> Path:
    """Where the records of running containers are kept."""
    return root / "containers"


def run_dir(root: Path, name: str, key: str) -> Path:
    """One run folder per warm-up definition: the same on the build machine and nodes."""
    return root / "run" / f"{name}-{key[:16]}"


def runner_owned(rel: str) -> bool:
    """Whether ``rel`` (a path relative to a run folder) is, or is below, one of
    :data:`RUN_OWN`."""
    return any(rel == name or rel.startswith(name + "/") for name in RUN_OWN)


# --- ownership ------------------------------------------------------------------------------

def secure_dir(d: Path) -> None:
    """Create ``d`` for this user; refuse it when another user owns it or everyone may write to it."""
    try:
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = os.lstat(d)
    except OSError as e:
        raise SnapbuildError(f"cannot create {d}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o002:
        why = ("is not a folder" if not stat.S_ISDIR(st.st_mode)
               else f"belongs to uid {st.st_uid}" if st.st_uid != os.geteuid()
               else "can be written by other users")
        raise SnapbuildError(f"refusing to use {d} for snapshot files: it {why}",
                             hint="remove it, or point SNAPBUILD_RUN_ROOT / SNAPBUILD_IMAGE_CACHE at a folder "
                                  "that only this user can write")


def secure_root(root: Path) -> None:
    """Create ``root`` (and ``root/trees``) for this user, and refuse one that another
    user owns or may write to: complete trees there are trusted without being read
    again, so nobody else may be able to put one there (``/dev/shm`` is shared)."""
    secure_dir(root)
    secure_dir(trees_dir(root))
