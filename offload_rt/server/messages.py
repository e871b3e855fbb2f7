"""``messages`` of a chat request, as the runtime's chat template takes them.

Each message is ``{"role": ..., "content": ...}``. Roles: ``system`` (``developer``, OpenAI's
newer name for it, is the same thing), ``user``, ``assistant``; the model's chat template
(its own Jinja template, else the built-in Mixtral one: ``offload_rt.chat_template``) then
checks the order (one leading system message, user and
assistant alternating; a final assistant message is a prefix the model continues). Content
is a string or a list of text parts (``[{"type": "text", "text": ...}]``, joined with
newlines as vLLM does). Anything the template cannot show the model is refused by name:
other roles (``tool``, ``function``), image or audio parts, tool calls, speaker ``name``s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from offload_rt.server.errors import bad_request, unsupported

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# fields of a message that carry nothing when null or empty
_INERT = {"tool_calls": ([],), "function_call": (), "refusal": (), "audio": ()}


def parse_messages(value: Any) -> list[dict[str, str]]:
    """``[{"role": role, "content": text}]`` for the chat template; 400 naming
    ``messages[i]...`` for anything else."""
    if not isinstance(value, list) or not value:
        raise bad_request("Invalid 'messages': expected a non-empty array of message objects",
                          "messages", "invalid_value")
    return [_message(item, f"messages[{i}]") for i, item in enumerate(value)]


def _message(item: Any, where: str) -> dict[str, str]:
    if not isinstance(item, Mapping):
        raise bad_request(f"Invalid '{where}': expected an object", where, "invalid_type")
    for key, value in item.items():
        if key in ("role", "content"):
            continue
        if key == "name":
            raise unsupported(f"{where}.name", "chat messages here carry no speaker names")
        if key not in _INERT:
            raise bad_request(f"Unrecognized argument supplied in '{where}': {key}",
                              f"{where}.{key}", "unrecognized_argument")
        if value is not None and value not in _INERT[key]:
            raise unsupported(f"{where}.{key}")
    role = item.get("role")
    if role not in ROLES:
        if role in ("tool", "function"):
            raise unsupported(f"{where}.role", f"role {role!r}: no tool calling")
        raise bad_request(f"Invalid '{where}.role': expected one of {sorted(ROLES)}, got "
                          f"{role!r}", f"{where}.role", "invalid_value")
    return {"role": ROLES[role], "content": _content(item.get("content"), f"{where}.content")}


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad_request(f"Invalid '{where}': expected a string or an array of text parts",
                          where, "invalid_type")
    texts = []
    for i, part in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise unsupported(f"{here}.type", f"got {kind!r}: this model reads text parts only")
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise bad_request(f"Invalid '{here}': expected {{\"type\": \"text\", \"text\": "
                              "string}", here, "invalid_value")
        texts.append(part["text"])
    return "\n".join(texts)
