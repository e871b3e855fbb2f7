"""Pool sizes of a simulation: one size for every pool, or one per layer's pool.

Per-layer pools of unequal size are what a runtime budget's leftover slots make (the first
layers get one slot more: ``offload_rt.engine.budget.spare_slots``); the simulator and replay
take them as a sequence, layer by layer, so a trace of such a run replays exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from cache_policies.keys import ExpertKey

# Slots of every pool, or of each layer's pool in layer order.
Capacity = int | Sequence[int]


def pool_size(capacity: Capacity, layer: int) -> int:
    """The slots of ``layer``'s pool (one size: every pool's)."""
    return capacity if isinstance(capacity, int) else capacity[layer]


def check_capacity(capacity: Capacity, per_layer: bool, num_layers: int | None
                   ) -> int | tuple[int, ...]:
    """``capacity`` as ``simulate`` uses it: an int, or a tuple of each layer's pool size.
    ``ValueError`` for a size below 1, per-layer sizes with one global pool, or a count of
    sizes other than ``num_layers`` (when given)."""
    if isinstance(capacity, int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        return capacity
    sizes = tuple(capacity)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"per-layer capacities must be >= 1, got {list(sizes)}")
    if not per_layer:
        raise ValueError(f"per-layer capacities {list(sizes)} need per-layer pools")
    if num_layers is not None and len(sizes) != num_layers:
        raise ValueError(f"{len(sizes)} per-layer capacities for {num_layers} layers")
    return sizes


def check_steps_fit(
    accesses: Sequence[Sequence[ExpertKey]], capacity: int | tuple[int, ...], per_layer: bool
) -> None:
    """Every step's distinct keys of one pool must fit in that pool (they are pinned together)."""
    smallest = capacity if isinstance(capacity, int) else min(capacity)
    if not accesses or max(map(len, accesses)) <= smallest:
        return  # the common case, checked at C speed
    for index, step in enumerate(accesses):
        if len(step) <= smallest:
            continue
        for pool, needed in _distinct_per_pool(step, per_layer):
            size = pool_size(capacity, pool)
            if needed > size:
                where = f"layer {pool}'s pool" if per_layer else "the pool"
                raise ValueError(
                    f"step {index} needs {needed} distinct experts of {where} at once, more "
                    f"than capacity={size}; capacity must be >= the largest step"
                )


def _distinct_per_pool(step: Sequence[ExpertKey], per_layer: bool) -> Iterator[tuple[int, int]]:
    by_pool: dict[int, set[ExpertKey]] = {}
    for key in step:
        by_pool.setdefault(key[0] if per_layer else 0, set()).add(key)
    for pool, keys in by_pool.items():
        yield pool, len(keys)
