"""Which pool sizes a trace can be replayed at, as the runtime would accept them.

Two spellings, one unit (slots: one expert each):

* ``--capacity K``: K slots per layer, the runtime's ``--cache-experts``: from the trace's
  top_k (a token's experts of one layer are pinned together) to its experts per layer (all fit).
  With ``--pool global`` the one pool gets K x layers slots.
* ``--slots N``: one global pool of N slots in all, what a memory budget buys with
  ``--pool global`` (the runtime's minimum: top_k slots); from top_k to layers x experts.

``all`` asks for every size in range.
"""

from __future__ import annotations

from collections.abc import Sequence

from cache_policies.trace import TraceHeader

ALL = "all"
DEFAULT_CAPACITIES = (2, 4, 6)


def parse_sizes(text: str) -> list[int] | str:
    """``"2,4,6"`` -> [2, 4, 6]; ``"all"`` -> ALL; ``ValueError`` otherwise."""
    if text.strip().lower() == ALL:
        return ALL
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers like 2,4,6 (or all), got {text!r}")
    return values


def capacities(header: TraceHeader, given: Sequence[int] | str | None, label: str = ""
               ) -> list[int]:
    """Slots per layer to replay: ``given`` (``ValueError`` for what the runtime refuses as
    --cache-experts), every valid one for ALL, or by default those of 2,4,6 in range."""
    top_k, experts = header.top_k, header.num_experts
    if given is None:
        return [c for c in DEFAULT_CAPACITIES if top_k <= c <= experts] or [top_k]
    if given == ALL:
        return list(range(top_k, experts + 1))
    where = f"{label}: " if label else ""
    for capacity in given:
        if capacity < top_k:
            raise ValueError(f"{where}--capacity {capacity} is below the trace's top_k "
                             f"({top_k}): a token's top_k experts of a layer must be resident "
                             "together, and the runtime refuses --cache-experts below top_k")
        if capacity > experts:
            raise ValueError(f"{where}--capacity {capacity} is above the trace's {experts} "
                             "experts per layer: every expert fits and none is ever evicted; "
                             "the runtime refuses --cache-experts above the number of experts")
    return list(given)


def global_slots(header: TraceHeader, given: Sequence[int] | str | None, label: str = ""
                 ) -> list[int]:
    """Total slots of one global pool to replay: ``given`` (``ValueError`` outside top_k ..
    layers x experts), every valid count for ALL, none when not given."""
    top_k, total = header.top_k, header.num_layers * header.num_experts
    if given is None:
        return []
    if given == ALL:
        return list(range(top_k, total + 1))
    where = f"{label}: " if label else ""
    for slots in given:
        if slots < top_k:
            raise ValueError(f"{where}--slots {slots} is below the trace's top_k ({top_k}): "
                             "a token's experts of one layer are pinned together, so a global "
                             f"pool needs at least {top_k} slots (the runtime's minimum)")
        if slots > total:
            raise ValueError(f"{where}--slots {slots} is above the trace's {total} experts "
                             f"({header.num_layers} layers x {header.num_experts}): every "
                             "expert fits and none is ever evicted")
    return list(given)
