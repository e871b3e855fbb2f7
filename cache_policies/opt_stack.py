"""Belady's MIN priority stack for one pool, updated a whole step at a time.

Mattson et al.'s update (see ``stack_distance``) walks the stack from the top with a bag of
displaced keys and, at each depth below the step's ``n`` keys, places the bag's soonest-used
key if that is sooner than the key found there. A key used sooner than everything in the bag
stays where it is, and the bag's minimum never decreases during the walk, so only the depths
whose key is used later than the bag's minimum (and the depths of the step's own keys) change.
The next such depth is found by a scan that runs in C (``filter`` over ``islice``), and only
the keys that move cost Python work.

Keys are ints; a key's *item* is ``next_use * M + (M - 1 - key)`` (``M`` > every key), so
comparing items compares next uses, and among keys never used again (equal next use) the larger
key is kept higher, as ``BeladyPolicy`` evicts the smaller first. Items are distinct, so an
item found by the scan names its depth through ``where``.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from itertools import islice


class OptStack:
    """The MIN stack of one pool over int keys ``0 <= key < modulus``.

    ``depth(key)``: 1-based depth, 0 if absent. ``update(keys, nexts)``: the step of distinct
    ``keys`` (in last-use order) happened; ``nexts[i]`` is the next use of ``keys[i]`` after it.
    ``limit``: keep only the top ``limit`` depths (>= the largest step). The top ``c`` of the
    next stack depend only on the top ``c`` of this one, so depths up to ``limit`` stay exact
    and a deeper key reads as absent: a miss at every size up to ``limit``.
    """

    def __init__(self, modulus: int, limit: int | None = None) -> None:
        self.modulus, self.limit = modulus, limit
        self.items: list[int] = []  # depth - 1 -> item of the key there
        self.where: dict[int, int] = {}  # key -> depth - 1
        self.upcoming: dict[int, int] = {}  # key -> its next use, as of its latest step

    def depth(self, key: int) -> int:
        at = self.where.get(key)
        return 0 if at is None else at + 1

    def update(self, keys: Sequence[int], nexts: Sequence[int]) -> None:
        n = len(keys)
        step = set(keys)
        deeper = sorted(at for at in (self.where.get(k) for k in keys) if at is not None and
                        at >= n)
        modulus = self.modulus
        bag = [item for item in self.items[:n] if modulus - 1 - item % modulus not in step]
        heapq.heapify(bag)
        self._walk(n, bag, deeper)
        if len(self.items) < n:  # the step's depths, filled below
            self.items.extend([-1] * (n - len(self.items)))
        while bag:  # what is left went below the old bottom: the pool holds more keys now
            self._place(len(self.items), heapq.heappop(bag))
        for at, (key, nxt) in enumerate(zip(reversed(keys), reversed(nexts))):
            self.upcoming[key] = nxt
            self._place(at, nxt * modulus + (modulus - 1 - key))  # the step on top
        if self.limit is not None and len(self.items) > self.limit:
            for item in self.items[self.limit:]:
                del self.where[modulus - 1 - item % modulus]
            del self.items[self.limit:]

    def _walk(self, n: int, bag: list[int], deeper: list[int]) -> None:
        """Below the step's ``n`` depths: each step key's depth takes the bag's minimum; each
        depth holding a key used later than the bag's minimum swaps it with that minimum.

        One iterator scans the depths once, in C: a depth it passed held a key used sooner
        than the bag's minimum then, hence also later (the minimum only grows). A step key's
        own item holds a next use inside this step, below every bag item, so the scan never
        stops at one; those depths come from ``deeper``."""
        items, where, modulus = self.items, self.where, self.modulus
        scan = iter(items)
        next(islice(scan, n, n), None)  # skip the step's own depths
        q, found = 0, None
        while bag:
            if found is None or found < bag[0]:  # stays: look further down
                found = next(filter(bag[0].__lt__, scan), None)
            jump = None if found is None else where[modulus - 1 - found % modulus]
            if q < len(deeper) and (jump is None or deeper[q] < jump):
                self._place(deeper[q], heapq.heappop(bag))
                q += 1
            elif jump is not None:
                self._place(jump, heapq.heappushpop(bag, found))  # type: ignore[arg-type]
                found = None
            else:
                return

    def _place(self, at: int, item: int) -> None:
        """Put the key of ``item`` at 0-based depth ``at`` (appending when ``at`` is the end)."""
        if at == len(self.items):
            self.items.append(item)
        else:
            self.items[at] = item
        self.where[self.modulus - 1 - item % self.modulus] = at
