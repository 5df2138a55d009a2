"""`GraphLRU`: the runtime's graph pairs by module settings and input signature, least recently used first.

Invariants:
- At most `capacity` pairs (and capture-failure reasons) are kept; only pairs of the current module
  settings hold device memory (`use_settings` releases the others' buffers and CUDA graphs).
- A settings tuple is kept only while a pair built under it is, so the processor objects it names stay
  alive (their ids cannot be reused by new ones) and are let go with the last such pair.
- `put` says when a key comes back after it was dropped for capacity: the workload uses more signatures
  than `capacity`, and every such return exports and compiles again. The runtime warns about it once.
"""

from __future__ import annotations

import collections
import logging

from .graph_cache import GraphEntry

logger = logging.getLogger(__name__)

# How many keys dropped for capacity are remembered (keys only: no graph or tensor is kept alive by them).
_DROPPED_KEPT = 64


class GraphLRU:
    """Entries by module settings and input signature, least recently used dropped past `capacity`.

    Lookups are made under the current module settings (`use_settings`): pairs built under others (FreeU
    on, another LoRA adapter, PAG's processors) stay until evicted, so switching back compiles nothing.
    A settings tuple is hashed once, when it becomes current, into the small token each lookup uses.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: collections.OrderedDict[tuple, GraphEntry | str] = collections.OrderedDict()
        # Keys dropped for capacity, the most recent few: a put of one of them is a rebuild the capacity cost.
        self._dropped: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self._tokens: dict[tuple, int] = {}  # module settings -> token, for the current and the cached ones
        self._token = 0
        self._next_token = 1

    def use_settings(self, settings: tuple) -> None:
        """Look up (and put) graphs built under `settings` from now on."""
        token = self._tokens.get(settings)
        if token is None:
            token, self._next_token = self._next_token, self._next_token + 1
            self._tokens[settings] = token
        if token != self._token:
            self._token = token
            for key, entry in self._entries.items():
                if key[0] != token and isinstance(entry, GraphEntry):
                    entry.release()
        self._forget_unused_settings()

    def _forget_unused_settings(self) -> None:
        used = {token for token, _ in self._entries} | {self._token}
        self._tokens = {s: t for s, t in self._tokens.items() if t in used}

    def get(self, signature: tuple) -> GraphEntry | str | None:
        """The entry, the reason its capture failed, or None if the signature was never built."""
        key = (self._token, signature)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            if isinstance(found, GraphEntry) and not found.allocated:
                found.allocate()
        return found

    def peek(self, signature: tuple) -> GraphEntry | None:
        """The pair for `signature` under the current settings if it holds its buffers; None otherwise. No
        use is recorded and nothing is allocated (`get` does both)."""
        found = self._entries.get((self._token, signature))
        return found if isinstance(found, GraphEntry) and found.allocated else None

    def put(self, signature: tuple, entry: GraphEntry | str) -> bool:
        """Keep `entry` for `signature` under the current settings; True if it had been dropped for capacity."""
        key = (self._token, signature)
        rebuilt = self._dropped.pop(key, False) is None
        self._entries[key] = entry
        self._entries.move_to_end(key)
        self._evict()
        return rebuilt

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._evict()

    def _evict(self) -> None:
        while len(self._entries) > self.capacity:
            dropped, _ = self._entries.popitem(last=False)
            logger.debug("dropped least recently used graph pair %s", dropped)
            self._dropped[dropped] = None  # a token is never reused, so a stale key cannot match a new one
            while len(self._dropped) > _DROPPED_KEPT:
                self._dropped.popitem(last=False)
        self._forget_unused_settings()

    def clear(self) -> None:
        self._entries.clear()
        self._forget_unused_settings()

    def relink(self) -> int:
        """`GraphEntry.relink` every pair, dropping those that cannot; returns how many were kept."""
        for key, entry in list(self._entries.items()):
            if isinstance(entry, GraphEntry) and not entry.relink():
                del self._entries[key]
        return len(self.entries())

    def release(self) -> None:
        for entry in self.entries():
            entry.release()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[GraphEntry]:
        return [e for e in self._entries.values() if isinstance(e, GraphEntry)]

