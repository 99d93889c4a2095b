"""Which of the node's GPUs each server holds: the agent's bookkeeping, nothing more.

A :class:`GpuPool` knows the node's GPUs (their UUIDs, in index order) and who holds
each. The rules, in one place:

- a holder asking for N GPUs gets N of them or none (never part of a request);
- it gets free GPUs (held by nobody) lowest index first; the GPUs it ``prefer``\\ s
  (those its server had before it died) come first while they are free;
- a GPU someone holds goes to another holder only when both share (``share_gpus``):
  a sharing holder takes shared GPUs after the free ones, the least crowded first;
- too few: nothing is given, and the answer says what it waits for and who holds
  the GPUs it cannot have.

Holders are plain names (a server's, or a server's successor during a roll); the pool
never talks to the driver: the agent passes the UUIDs to the start of the server.
"""

from __future__ import annotations

from collections.abc import Iterable


class GpuPool:
    """The node's GPUs and their holders."""

    def __init__(self, uuids: Iterable[str]) -> None:
        self.uuids = list(uuids)
        self._held: dict[str, list[int]] = {}  # holder -> the indexes it holds, in the order given
        self._share: dict[str, bool] = {}

    @property
    def count(self) -> int:
        return len(self.uuids)

    def holders(self, index: int) -> list[str]:
        """Who holds GPU ``index``, in the order they got it."""
        return [h for h, held in self._held.items() if index in held]

    def held(self, holder: str) -> list[int]:
        return list(self._held.get(holder, []))

    def free_count(self) -> int:
        """How many GPUs nobody holds."""
        taken = {i for held in self._held.values() for i in held}
        return self.count - len(taken)

    def assignments(self) -> list[tuple[int, str, str]]:
        """Every (index, UUID, holder), by index."""
        return sorted((i, self.uuids[i], h) for h, held in self._held.items() for i in held)

    def _usable(self, index: int, holder: str, share: bool) -> bool:
        others = [h for h in self.holders(index) if h != holder]
        return not others or (share and all(self._share.get(h, False) for h in others))

    def assign(self, holder: str, count: int, *, share: bool = False, prefer: Iterable[int] = (),
               exclude: Iterable[int] = ()) -> list[int] | str:
        """Give ``holder`` ``count`` GPUs (added to any it holds already) and return their
        indexes; or give none and return why: ``waiting for N free GPU(s): held by A, B``.
        ``exclude``: GPUs it must not get (a successor's predecessor's)."""
        if count <= 0:
            return []
        if count > self.count:
            has = f"only {self.count}" if self.count else "no GPU (nvidia-smi sees none)"
            return f"waiting for {count} free GPU(s): this node has {has}"
        mine, excluded = set(self.held(holder)), set(exclude)
        candidates = [i for i in range(self.count) if i not in mine and i not in excluded]
        usable = [i for i in candidates if self._usable(i, holder, share)]
        wanted = [i for i in dict.fromkeys(prefer) if i in usable]
        # free ones first (preferred, then lowest index), then shared ones, least crowded first
        order = sorted(usable, key=lambda i: (bool(self.holders(i)), i not in wanted, len(self.holders(i)), i))
        if len(order) < count:
            blocking = dict.fromkeys(h for i in range(self.count) if i not in usable and i not in mine
                                     for h in self.holders(i))
            why = f"held by {', '.join(blocking)}" if blocking else f"only {len(order)} usable"
            return f"waiting for {count} free GPU(s): {why}"
        got = order[:count]
        self._held.setdefault(holder, []).extend(got)
        self._share[holder] = share
        return got

    def take(self, holder: str, indexes: Iterable[int], *, share: bool = False) -> None:
        """Record that ``holder`` holds these GPUs (an adopted server's, as recorded),
        whoever else holds them: the server runs on them already."""
        held = self._held.setdefault(holder, [])
        held.extend(i for i in indexes if 0 <= i < self.count and i not in held)
        self._share[holder] = share

    def free(self, holder: str) -> list[int]:
        """Give back what ``holder`` holds; returns those indexes."""
        self._share.pop(holder, None)
        return self._held.pop(holder, [])

    def rename(self, old: str, new: str) -> None:
        """``old``'s GPUs become ``new``'s (a successor's, once its predecessor is gone)."""
        if old in self._held:
            self._held[new] = self._held.pop(old)
            self._share[new] = self._share.pop(old, False)

    def indexes(self, uuids: Iterable[str]) -> list[int]:
        """The indexes of those UUIDs this node has (others are left out)."""
        return [self.uuids.index(u) for u in uuids if u in self.uuids]
