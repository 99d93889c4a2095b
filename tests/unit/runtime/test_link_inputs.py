"""The input links of a run folder, which two restores of one snapshot share."""

from __future__ import annotations

import os
import threading
import time

from snapbuild.runtime.trees import link_inputs


def test_two_restores_linking_one_run_folder_at_once_neither_fails_nor_leaves_it_missing(tmp_path):
    trees = {name: tmp_path / "trees" / name for name in ("app", "weights")}
    for t in trees.values():
        t.mkdir(parents=True)
    dest = tmp_path / "run" / "inputs"
    link_inputs(trees, dest)  # the first restore; from here on a link must never be missing
    errors: list[BaseException] = []
    missing = []

    def restore() -> None:
        try:
            for _ in range(100):
                link_inputs(trees, dest)
        except BaseException as e:  # what a racing unlink-then-symlink raised: FileExistsError
            errors.append(e)

    def reader() -> None:
        while any(t.is_alive() for t in writers):
            if not os.path.lexists(dest / "app"):
                missing.append(1)
            time.sleep(0)  # let the writers run

    writers = [threading.Thread(target=restore) for _ in range(2)]
    for t in writers:
        t.start()
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in writers:
        t.join()
    watcher.join()
    assert errors == []
    assert missing == [], "a link was missing for a moment"
    assert {p.name: os.readlink(p) for p in dest.iterdir()} == {n: str(t) for n, t in trees.items()}
