"""``files``: local files and folders, chosen by gitignore-style patterns, as an artifact.

```yaml
src:
  kind: files
  root: app            # relative to the recipe's folder (default: the folder itself)
  include: ["*.py", "templates/"]
  exclude: ["**/__pycache__/", "*.pyc"]
```

The key holds each selected file's relative path, mode and content digest, never a
modification time or an absolute path: moving the project or touching a file keeps
the cache; editing a byte, renaming a file or flipping an executable bit does not.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import ClassVar

import pathspec
from pydantic import Field

from ..errors import StepError
from ..store.fsutil import file_digest
from ..store.tree import build_tree
from .base import BuildContext, PinContext, StepSpec


class FilesSpec(StepSpec):
    root: str = "."
    include: list[str] = Field(default_factory=lambda: ["**"])
    exclude: list[str] = Field(default_factory=list)

    # What is selected is fully described by the pins (paths, modes, digests); the
    # patterns themselves change no output, so editing them alone keeps the cache.
    KEYLESS: ClassVar[frozenset[str]] = StepSpec.KEYLESS | {"root", "include", "exclude"}


def file_pin(path: Path) -> str:
    """A local file's identity in a key: ``MODE:sha256:...``, or ``symlink:TARGET``."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "symlink:" + os.readlink(path)
    return f"{stat.S_IMODE(st.st_mode):o}:{file_digest(path)}"


def select(spec: FilesSpec, base_dir: Path) -> tuple[Path, list[tuple[str, Path]]]:
    root = (base_dir / spec.root).resolve()
    if not root.is_dir():
        raise StepError(f"files root {spec.root!r} is not a folder (looked in {root})",
                        hint="`root:` is relative to the recipe's folder")
    inc = pathspec.GitIgnoreSpec.from_lines(spec.include)
    exc = pathspec.GitIgnoreSpec.from_lines(spec.exclude)
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        # Prune excluded folders instead of walking them (.venv, node_modules, ...).
        dirnames[:] = sorted(d for d in dirnames if not exc.match_file(prefix + d + "/"))
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(Path(dirpath, d))]:
            rel = prefix + name
            path = Path(dirpath, name)
            # FIFOs, sockets and devices are not content: reading a FIFO would block.
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                continue
            if inc.match_file(rel) and not exc.match_file(rel):
                items.append((rel, path))
    return root, sorted(items)


class FilesStep:
    name = "files"
    version = 1
    Spec = FilesSpec
    ephemeral = False

    def references(self, spec):
        return []

    def pins(self, spec: FilesSpec, ctx: PinContext) -> dict:
        _, items = select(spec, ctx.base_dir)
        if not items:
            raise StepError(f"no file under {spec.root!r} matches include {spec.include} "
                            f"(exclude {spec.exclude})",
                            hint="check the patterns: they are gitignore-style, relative to `root:`")
        return {"files": {rel: file_pin(path) for rel, path in items}}

    def build(self, spec: FilesSpec, ctx: BuildContext) -> str:
        _, items = select(spec, ctx.base_dir)
        ctx.log.write(f"storing {len(items)} files\n")
        digest, tree = build_tree(ctx.store.blobs, items)
        # The key was computed from the files at planning time; if they changed since,
        # storing them under that key would poison the cache.
        stored = {}
        for e in tree["entries"]:
            if e["type"] == "file":
                stored[e["path"]] = f"{e['mode']:o}:{e['digest']}"
            elif e["type"] == "symlink":
                stored[e["path"]] = "symlink:" + e["target"]
        pinned = ctx.pins.get("files", {})
        changed = sorted(p for p in set(stored) | set(pinned) if stored.get(p) != pinned.get(p))
        if changed:
            raise StepError(f"files changed while the build was running: {', '.join(changed[:5])}",
                            hint="run the build again once the files stop changing")
        return digest
