"""What a routing trace must hold to be replayed: header values, record fields and their order.

The rules are those of ``docs/trace_format.md`` (version 1): the header's model shape is
positive (``1 <= top_k <= num_experts``), per-layer pool sizes (``pool_capacities``) within
``top_k .. num_experts``; a record's ``experts`` are ``[T][top_k]`` distinct
expert ids (JSON integers) for ``T >= 1`` tokens; ``step`` indexes the forward calls 0, 1, ...
in order, and within a call the records run through the layers in ascending order, all for the
call's same tokens (``seq``, ``pos``, T). ``trace.read_trace`` applies them and prefixes the
file and line to the ``FieldError`` messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cache_policies.trace import Record

_MISSING = object()


class FieldError(ValueError):
    """A record field that breaks the format; the message names the field, not the line."""


def is_int(value: object) -> bool:
    """A JSON integer: ``int`` but not ``bool`` (``true`` is not expert 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def header_problem(obj: Mapping[str, Any]) -> str | None:
    """Why the header's shape fields cannot describe a model, or None when they can.

    ``num_layers``, ``num_experts`` >= 1; ``top_k`` in 1..num_experts; ``expert_bytes`` >= 1
    when present (None or absent: unknown); ``pool_capacities`` (``_pool_capacities_problem``);
    ``trunk`` and ``hybrid`` strings when present.
    Each message reads ``header field 'NAME' ...``.
    """
    rules: list[tuple[str, int, int | None, str]] = [
        ("num_layers", 1, None, ""), ("num_experts", 1, None, "")]
    if is_int(obj["num_experts"]) and obj["num_experts"] >= 1:
        rules.append(("top_k", 1, obj["num_experts"], "num_experts"))
    if obj.get("expert_bytes") is not None:
        rules.append(("expert_bytes", 1, None, ""))
    for name, low, high, high_name in rules:
        value = obj[name]
        if is_int(value) and value >= low and (high is None or value <= high):
            continue
        bound = f"between {low} and {high_name} ({high})" if high is not None else f">= {low}"
        return f"header field {name!r} must be an integer {bound}, got {value!r}"
    return _pool_capacities_problem(obj) or _run_options_problem(obj)


def _run_options_problem(obj: Mapping[str, Any]) -> str | None:
    """``trunk`` and ``hybrid``, when present: the run's option values, as text."""
    spellings = {"trunk": "'float' or 'int8'", "hybrid": "'off', 'auto' or 'always'"}
    for name, spelling in spellings.items():
        value = obj.get(name, "")
        if not isinstance(value, str):
            return (f"header field {name!r} must be a string (the run's --{name}: {spelling}), "
                    f"got {value!r}")
    return None


def _pool_capacities_problem(obj: Mapping[str, Any]) -> str | None:
    """``pool_capacities``, when present (not null): each layer's pool, as the runtime makes
    them: one integer per layer from ``top_k`` (a token's experts of a layer are pinned
    together) to ``num_experts`` (a pool of every expert of its layer cannot grow), and only
    with per-layer pools (``pool`` "global" has one pool: its size is ``capacity``).
    ``top_k`` and ``num_experts`` must be valid already (``header_problem``)."""
    sizes = obj.get("pool_capacities")
    if sizes is None:
        return None
    layers, low, high = obj["num_layers"], obj["top_k"], obj["num_experts"]
    if not (isinstance(sizes, list) and len(sizes) == layers
            and all(is_int(v) and low <= v <= high for v in sizes)):
        return (f"header field 'pool_capacities' must be a list of {layers} integers (one per "
                f"layer) between top_k ({low}) and num_experts ({high}), or null, got {sizes!r}")
    if obj.get("pool") == "global":
        return ("header field 'pool_capacities' lists per-layer pools, but header field 'pool' "
                "is 'global' (one pool, of 'capacity' slots): a trace has one or the other")
    return None


def record_object(obj: object) -> Mapping[str, Any]:
    """A record line's JSON value, which must be an object."""
    if isinstance(obj, dict):
        return obj
    raise FieldError(f"a record is a JSON object, got {type(obj).__name__}")


def field(obj: Mapping[str, Any], name: str, default: object = _MISSING) -> Any:
    """``obj[name]``; a missing required field is a ``FieldError`` naming it."""
    if name in obj:
        return obj[name]
    if default is _MISSING:
        raise FieldError(f"record has no field {name!r}")
    return default


def non_negative(obj: Mapping[str, Any], name: str, default: object = _MISSING) -> int:
    """A record field that must be an integer >= 0 (``step``, ``seq``, ``pos``, ``layer``)."""
    value = field(obj, name, default)
    if not is_int(value) or value < 0:
        raise FieldError(f"field {name!r} must be an integer >= 0, got {value!r}")
    return value


def expert_rows(obj: Mapping[str, Any], top_k: int, num_experts: int
                ) -> tuple[tuple[int, ...], ...]:
    """The record's ``experts``: T >= 1 rows, each ``top_k`` distinct ids in 0..num_experts-1."""
    rows = field(obj, "experts")
    if not isinstance(rows, list) or not rows:
        raise FieldError(f"field 'experts' must be a non-empty list of token rows, got {rows!r}")
    for t, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != top_k or not all(map(is_int, row)):
            raise FieldError(f"field 'experts' row {t} must be a list of top_k={top_k} integer "
                             f"expert ids, got {row!r}")
        outside = [e for e in row if not 0 <= e < num_experts]
        if outside:
            raise FieldError(f"field 'experts' row {t}: expert id {outside[0]} outside "
                             f"num_experts={num_experts}")
        if len(set(row)) != top_k:
            raise FieldError(f"field 'experts' row {t} repeats an expert: {row!r} (the router's "
                             "top-k ids are distinct)")
    return tuple(tuple(row) for row in rows)


def order_problem(record: Record, previous: Record | None) -> str | None:
    """Why ``record`` cannot follow ``previous`` (None: it is the first), or None when it can.

    Steps run 0, 1, ... one forward call after another; within a call the layers ascend and
    every record is for the call's tokens (same ``seq``, ``pos`` and T); ``seq`` never goes back.
    """
    if previous is None:
        if record.step == 0:
            return None
        return f"field 'step' is {record.step} in the first record: steps start at 0"
    if record.step not in (previous.step, previous.step + 1):
        return (f"field 'step' is {record.step} after step {previous.step}: steps number the "
                "forward calls 0, 1, ... in order")
    if record.step == previous.step:
        if record.layer <= previous.layer:
            return (f"field 'layer' {record.layer} after layer {previous.layer} in the same "
                    f"forward call (step {record.step}): layers ascend within a call")
        same = (record.seq, record.pos, record.num_tokens)
        if same != (previous.seq, previous.pos, previous.num_tokens):
            return (f"step {record.step} changes seq, pos or its number of token rows within "
                    "the forward call")
    elif record.seq < previous.seq:
        return f"field 'seq' goes back from {previous.seq} to {record.seq}"
    return None
