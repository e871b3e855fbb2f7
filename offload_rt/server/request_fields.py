"""Reading one field of a request body: its type and range checked, a 400 naming it otherwise.

The project's rule for fields (as for the model's config files): each is honoured, harmless
(it changes no token) or refused by name. ``check_known`` refuses a field this server does
not know, as api.openai.com does ("Unrecognized request argument supplied"); ``check_inert``
refuses a known OpenAI field whose value would change the answer in a way offload_rt does not
implement (``n: 2``, ``logprobs: true``, ``tools``...), and lets its neutral value through.
JSON ``null`` always means "not given".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from offload_rt.server.errors import bad_request, unsupported

Body = Mapping[str, Any]


def check_known(body: Body, known: Iterable[str], where: str = "") -> None:
    """400 naming the first field of ``body`` that is not in ``known`` (``where``: the path of
    a nested object, e.g. ``stream_options.``)."""
    allowed = set(known)
    for name in body:
        if name not in allowed:
            raise bad_request(f"Unrecognized request argument supplied: {where}{name}",
                              f"{where}{name}", "unrecognized_argument")


def check_inert(body: Body, inert: Mapping[str, tuple[Any, ...]]) -> None:
    """400 ``unsupported_parameter`` for a field set to anything but null or its neutral
    values (``inert[name]``; an empty tuple: only null is neutral)."""
    for name, neutral in inert.items():
        value = body.get(name)
        if value is not None and not any(_same(value, n) for n in neutral):
            raise unsupported(name, f"got {value!r}")


def _same(value: Any, neutral: Any) -> bool:
    """Equal and of the same kind (``true`` is not the ``1`` of ``n: 1``)."""
    return isinstance(value, bool) == isinstance(neutral, bool) and value == neutral


def integer(body: Body, name: str, low: int | None = None, high: int | None = None
            ) -> int | None:
    """An integer field (a JSON number without fraction; not a boolean) or None."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(name, "an integer", value)
    _check_range(name, value, low, high)
    return value


def number(body: Body, name: str, low: float, high: float, low_open: bool = False
           ) -> float | None:
    """A finite number in [low, high] (``(low, high]`` when ``low_open``) or None."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(name, "a number", value)
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad_request(f"Invalid '{name}': expected a number in {span}, got {value!r}",
                          name, "invalid_value")
    return float(value)


def boolean(body: Body, name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _wrong_type(name, "a boolean", value)
    return value


def string(body: Body, name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(f"Missing required parameter: '{name}'", name, "missing_required")
        return None
    if not isinstance(value, str):
        raise _wrong_type(name, "a string", value)
    return value


def stop_strings(body: Body) -> tuple[str, ...] | None:
    """``stop``: one string or a list of non-empty strings (null: the model's default)."""
    value = body.get("stop")
    if value is None:
        return None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values):
        raise bad_request(f"Invalid 'stop': expected a non-empty string or a list of non-empty "
                          f"strings, got {value!r}", "stop", "invalid_value")
    return tuple(values)


def object_field(body: Body, name: str) -> Mapping[str, Any] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _wrong_type(name, "an object", value)
    return value


def _check_range(name: str, value: int, low: int | None, high: int | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f">= {low}" if high is None else f"<= {high}" if low is None
                  else f"in {low}..{high}")
        raise bad_request(f"Invalid '{name}': expected an integer {bounds}, got {value}", name,
                          "invalid_value")


def _wrong_type(name: str, expected: str, value: Any) -> Exception:
    return bad_request(f"Invalid type for '{name}': expected {expected}, but got "
                       f"{_json_type(value)} instead", name, "invalid_type")


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)
