"""Which KV cells each sequence holds, shared prefixes, and the LRU prefix cache over them.

The embedded engine keeps one unified llama.cpp KV cache: a cell is one token at one position,
and a cell may belong to several sequences. Copying a prefix from one sequence to another
(``llama_memory_seq_cp`` over a position range) tags the same cells with one more sequence, so a
shared prefix costs its memory once; a cell is freed when the last sequence holding it drops it.
``CellPool`` mirrors that bookkeeping exactly, in Python, because llama.cpp does not say how many
cells are in use: every cell gets an id and a reference count, so ``used`` is the number of
cells llama.cpp holds, and admission can keep it under the cache's size.

Owners are llama.cpp sequence ids: the sequences being decoded (active) and the prefix cache's
entries (retired sequences whose cells stay, for later prompts that start the same way). Cache
entries are evicted least recently used first. Every change goes through ``KVOps`` as it is made
here, so the model's cache and this pool never disagree.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class KVOps(Protocol):
    """The two cache operations the pool needs (llama.cpp's, or a fake's in tests)."""

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None: ...

    def seq_rm(self, seq: int, p0: int, p1: int) -> None: ...


@dataclass(slots=True)
class Owner:
    seq_id: int
    tokens: list[int] = field(default_factory=list)
    """The token in each cell held, by position."""
    cells: list[int] = field(default_factory=list)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n and a[n - 1] == b[n - 1] and list(a[:n]) == list(b[:n]):
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class CellPool:
    """Cells in use, per owner, under a capacity; the LRU cache of retired owners.

    ``capacity`` is the KV cache's size in cells; ``cache_cells`` bounds the cells only cache
    entries hold (the rest of the capacity is for sequences being decoded)."""

    def __init__(self, kv: KVOps, capacity: int, seq_ids: Iterable[int], cache_cells: int) -> None:
        self.kv = kv
        self.capacity = capacity
        self.cache_cells = cache_cells
        self._free_ids = sorted(seq_ids, reverse=True)
        self.active: dict[int, Owner] = {}
        self.cache: OrderedDict[int, Owner] = OrderedDict()  # least recently used first
        self._refs: dict[int, int] = {}
        self._next_cell = itertools.count()
        self.evictions = 0

    @property
    def used(self) -> int:
        return len(self._refs)

    def owner(self, seq_id: int) -> Owner:
        return self.active.get(seq_id) or self.cache[seq_id]

    def new_owner(self) -> int | None:
        """A fresh, empty sequence id for a sequence to decode, evicting the least recently
        used cache entry if none is free; None when every id is an active sequence."""
        if not self._free_ids and not self.evict_one():
            return None
        seq_id = self._free_ids.pop()
        self.active[seq_id] = Owner(seq_id)
        return seq_id

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Cells just decoded for ``seq_id`` at its next positions."""
        owner = self.active[seq_id]
        for token in tokens:
            cell = next(self._next_cell)
            self._refs[cell] = 1
            owner.cells.append(cell)
            owner.tokens.append(token)

    def share(self, src: int, dst: int, length: int) -> None:
        """Give the empty active ``dst`` the cells of ``src``'s first ``length`` positions."""
        source, target = self.owner(src), self.active[dst]
        if target.cells or length > len(source.cells):
            raise ValueError("share needs an empty target and a source that holds the prefix")
        self.kv.seq_cp(src, dst, 0, length)
        target.cells = source.cells[:length]
        target.tokens = source.tokens[:length]
        for cell in target.cells:
            self._refs[cell] += 1
        if src in self.cache:
            self.cache.move_to_end(src)

    def release(self, seq_id: int) -> None:
        """Drop every cell of an owner (active or cached) and free its id."""
        owner = self.active.pop(seq_id, None) or self.cache.pop(seq_id)
        self.kv.seq_rm(seq_id, -1, -1)
        self._drop(owner.cells)
        self._free_ids.append(seq_id)

    def retire(self, seq_id: int) -> None:
        """An active owner becomes the newest cache entry, keeping its cells; entries beyond the
        cache's bound are evicted oldest first."""
        owner = self.active.pop(seq_id)
        if not owner.cells:
            self.active[seq_id] = owner
            self.release(seq_id)
            return
        self.cache[seq_id] = owner
        while self.cache and self.cache_only() > self.cache_cells:
            self.evict_one()

    def evict_one(self) -> bool:
        if not self.cache:
            return False
        seq_id = next(iter(self.cache))
        self.release(seq_id)
        self.evictions += 1
        return True

    def cache_only(self) -> int:
        """Cells that no active owner holds: what evicting every cache entry would free."""
        held = {cell for owner in self.active.values() for cell in owner.cells}
        return self.used - len(held)

    def match(self, tokens: Sequence[int], exclude: int = -1) -> tuple[int, int]:
        """The owner (active or cached) whose cells hold the longest prefix of ``tokens``, and
        that prefix's length: (-1, 0) when none shares a first token."""
        best, best_len = -1, 0
        for owner in itertools.chain(self.active.values(), self.cache.values()):
            if owner.seq_id == exclude or not owner.tokens or owner.tokens[0] != tokens[0]:
                continue
            n = common_prefix(owner.tokens, tokens)
            if n > best_len:
                best, best_len = owner.seq_id, n
        return best, best_len

    def _drop(self, cells: list[int]) -> None:
        refs = self._refs
        for cell in cells:
            left = refs[cell] - 1
            if left:
                refs[cell] = left
            else:
                del refs[cell]
