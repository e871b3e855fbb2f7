"""Stack depths: every pool size from one pass over a trace, for LRU and Belady's MIN.

Mattson, Gecsei, Slutz and Traiger, "Evaluation techniques for storage hierarchies" (IBM Systems
Journal, 1970): for a *stack algorithm* the cache of ``c`` slots always holds the top ``c`` keys
of one priority list (the stack), so an access hits at every size >= the depth of its key in the
stack. One pass that keeps the stack gives the depth of every access, hence the misses at every
size at once.

The runtime pins a whole step (the distinct experts one layer acquires together), so a key of
the step is never the victim of another key of the step. Both policies remain stack algorithms
with these pins for every size ``c`` that holds the largest step (the simulator refuses smaller
ones), with the step taken as one update. By induction, with ``S`` the stack before a step of
keys ``K`` (``n = |K| <= c``), ``cache(c) = S[:c]``, ``h`` of whose keys are in ``K``:

* the step's hits are ``K ∩ S[:c]``: pinned keys cannot leave during the step, and each miss
  evicts a resident key outside ``K``;
* LRU evicts the least recently used keys outside ``K`` (their order does not change during the
  step), so afterwards ``cache(c) = K ∪`` the ``c - n`` most recent keys of ``S \\ K``: the top
  ``c`` of ``S' = K + (S \\ K)``;
* MIN evicts the keys outside ``K`` used farthest in the future (their next uses do not change
  during the step), so ``cache(c) = K ∪`` the ``c - n`` keys of ``S[:c] \\ K`` used soonest.
  These sets grow with ``c`` (adding one candidate and one place never drops a kept key), and
  Mattson's update builds ``S'`` from them: walking ``S``, keys outside ``K`` enter a bag; from
  depth ``n + 1`` on, each depth takes from the bag the key used soonest.

A pool that is not yet full keeps every key, which both updates give too. The order of the
top ``n`` keys of ``S'`` only matters for sizes below ``n``, which are invalid. For sizes below
the largest step the runtime splits steps in groups of the pool's size, so the trace itself
changes: callers simulate those (``largest_step``). ``tests/test_stack_distance.py`` checks
every depth against the simulator on random and recorded traces.

Cost: LRU keeps each pool's last-use times sorted (a depth is one ``bisect``); MIN uses
``OptStack`` (a max-tree over depths). Both are pure Python.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

from cache_policies.keys import ExpertKey
from cache_policies.opt_stack import OptStack

Steps = Sequence[Sequence[ExpertKey]]


def largest_step(steps: Steps, per_layer: bool) -> int:
    """The most distinct keys one step needs from one pool: the smallest exact size."""
    largest = 0
    for step in steps:
        if len(step) <= largest:
            continue
        for _, at in _by_pool(step, per_layer):
            largest = max(largest, len({step[i] for i in at}))
    return largest


def lru_depths(steps: Steps, per_layer: bool = True) -> list[int]:
    """Per access (flattened order): its key's 1-based LRU stack depth at its step's start, or
    0 for a key's first use. An access hits in pools of ``c`` slots iff ``0 < depth <= c``.

    A key repeated within a step is a hit from its second use on (depth 1). The depth is the
    number of the pool's keys used at or after the key's last use (sorted last-use times)."""
    times: dict[int, list[int]] = {}  # pool -> last-use times of its keys, ascending
    last: dict[ExpertKey, int] = {}
    depths = [0] * sum(map(len, steps))
    clock = index = 0
    for step in steps:
        for pool, at in _by_pool(step, per_layer):
            held = times.setdefault(pool, [])
            keys = [step[i] for i in at]
            for i, depth in zip(at, _lru_step_depths(held, last, keys)):
                depths[index + i] = depth
            for key in _last_use_order(keys):
                if key in last:
                    del held[bisect_left(held, last[key])]
                clock += 1
                held.append(clock)
                last[key] = clock
        index += len(step)
    return depths


def _lru_step_depths(held: list[int], last: dict[ExpertKey, int],
                     keys: Sequence[ExpertKey]) -> list[int]:
    out = []
    seen: set[ExpertKey] = set()
    for key in keys:
        if key in seen:
            out.append(1)  # again in the same step: resident and pinned
            continue
        seen.add(key)
        t = last.get(key)
        out.append(0 if t is None else len(held) - bisect_right(held, t) + 1)
    return out


def opt_depths(steps: Steps, per_layer: bool = True, max_depth: int | None = None
               ) -> list[int]:
    """``lru_depths`` for Belady's MIN (farthest next use evicted; never beaten, see
    ``BeladyPolicy``), by Mattson's priority-stack update (``OptStack``).

    ``max_depth``: depths above it read 0 (exact for every size up to ``max_depth``; the cost
    grows with the stack's depth, so a sweep up to 512 slots of 4096 costs a fraction)."""
    ids = {key: i for i, key in enumerate(sorted({key for step in steps for key in step}))}
    flat = [ids[key] for step in steps for key in step]
    next_use = _next_uses(flat)
    pools = {key[0] if per_layer else 0 for key in ids}
    if max_depth is not None:
        max_depth = max(max_depth, largest_step(steps, per_layer))
    stacks = {pool: OptStack(len(ids) + 1, max_depth) for pool in pools}
    depths = [0] * len(flat)
    index = 0
    for step in steps:
        for pool, at in _by_pool(step, per_layer):
            stack = stacks[pool]
            last_at: dict[int, int] = {}
            for i in at:
                key = flat[index + i]
                depths[index + i] = 1 if key in last_at else stack.depth(key)
                last_at[key] = index + i
            order = list(last_at)  # dicts keep first insertion: re-sort by last use
            order.sort(key=last_at.__getitem__)
            stack.update(order, [next_use[last_at[key]] for key in order])
        index += len(step)
    return depths


def _next_uses(flat: list[int]) -> list[int]:
    """For each access, the index of the next access to the same key (len(flat): none)."""
    never = len(flat)
    out = [never] * len(flat)
    seen: dict[int, int] = {}
    for i in range(len(flat) - 1, -1, -1):
        out[i] = seen.get(flat[i], never)
        seen[flat[i]] = i
    return out


def _by_pool(step: Sequence[ExpertKey], per_layer: bool) -> list[tuple[int, Sequence[int]]]:
    """The positions of the step's keys, by pool (a trace's steps are of one layer)."""
    if not per_layer or not step:
        return [(0, range(len(step)))] if step else []
    layer = step[0][0]
    if all(key[0] == layer for key in step):
        return [(layer, range(len(step)))]
    pools: dict[int, list[int]] = {}
    for i, key in enumerate(step):
        pools.setdefault(key[0], []).append(i)
    return list(pools.items())


def _last_use_order(keys: Sequence[ExpertKey]) -> list[ExpertKey]:
    """The distinct keys ordered by their last use in the step (the order LRU touches them)."""
    return list(dict.fromkeys(reversed(keys)))[::-1]
