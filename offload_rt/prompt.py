"""A request's prompt as token ids: raw text, a chat, or ids given directly, checked first.

Text must be valid Unicode (``text_input.check_text``: refused, never repaired). A raw text
prompt that spells control tokens or chat markers (``<s>``, ``[INST]``) gets a warning: they are
encoded as plain characters, which is rarely what was meant. Ids must index the model's
embedding; ids the tokenizer has no piece for (padding ids) are allowed there.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence

from offload_rt.chat_template import encode_chat, read_messages
from offload_rt.errors import OptionError
from offload_rt.text_input import check_text
from offload_rt.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def encode_text(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Ids of ``prompt`` as the tokenizer starts a raw text (``Tokenizer.encode``: BOS first
    for Mixtral); warns when it spells control pieces as plain text."""
    text = check_text(prompt, "prompt")
    markers = tokenizer.spelled_markers(text)
    if markers:
        log.warning("the prompt spells %s as plain text; a raw prompt encodes them as ordinary "
                    "characters, not as the chat template's tokens. Use --chat (messages=[...] "
                    "in the API) for the template, or --prompt-ids for exact ids",
                    ", ".join(markers))
    return tokenizer.encode(text, bos=True)


def encode_messages(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The chat template's ids for ``messages``: the model's own template
    (``tokenizer.chat_template``), else the built-in Mixtral-Instruct one. Each message is
    checked first (a known role, content that is valid Unicode)."""
    if not isinstance(messages, (str, bytes)):
        for index, message in enumerate(messages):
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                check_text(content, f"messages[{index}] content")
    if tokenizer.chat_template is None:
        return encode_chat(tokenizer, messages)
    read_messages(messages)
    return tokenizer.chat_template.encode(tokenizer, messages)


def check_ids(prompt: object, vocab_size: int) -> list[int]:
    """``prompt`` as a list of ints, each in 0 .. vocab_size - 1 (the model's embedding rows)."""
    if isinstance(prompt, (bytes, bytearray)):  # iterating would give byte values as ids
        raise OptionError("prompt is bytes: decode it to str (or pass a list of token ids)")
    try:
        ids = [operator.index(t) for t in prompt]  # type: ignore[attr-defined]
    except TypeError:
        raise OptionError(f"prompt must be a string or a sequence of int token ids, got "
                          f"{type(prompt).__name__}") from None
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise OptionError(f"prompt token ids {bad[:5]} are outside the model's vocabulary "
                          f"(0..{vocab_size - 1}: vocab_size {vocab_size})")
    return ids
