"""The built-in Mixtral-Instruct (mistral-common v1) chat prompt, as token ids: used for folders
without a chat template of their own (`chat_template_files.py`), such as mistral-inference
folders and the demo model.

    <s>[INST] user1 [/INST] assistant1</s>[INST] user2 [/INST]

This mirrors `mistral_common`'s `InstructTokenizerV1` token for token:
- `[INST]` / `[/INST]` are plain text in v1, not control tokens: each user turn is the string
  `f"[INST] {content} [/INST]"` encoded on its own, so it starts with SentencePiece's "▁".
- Each assistant turn is its content encoded on its own, followed by EOS.
- A system prompt is prepended to the FIRST user message as `system + "\\n\\n" + user`
  (mistral-common v2/v3 put it on the last one instead; v1 does not). An empty system
  prompt is dropped, as mistral-common does.
- A final assistant message is a prefix the model continues (mistral-common's
  `prefix=True`): encoded without EOS.

We accept a stricter conversation shape than mistral-common (which merges repeated roles):
an optional leading system message, then user and assistant strictly alternating.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from offload_rt.errors import OptionError, TokenizerError
from offload_rt.tokenizer import Tokenizer

SYSTEM_SEPARATOR = "\n\n"
_ROLES = ("system", "user", "assistant")


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Prompt ids for `messages`; the model answers next (or continues a final assistant turn)."""
    _check_v1_vocabulary(tokenizer)
    system, turns = _split_system(read_messages(messages))
    _check_turn_order(turns, offset=len(messages) - len(turns))
    ids = [tokenizer.bos_id]
    for index, (role, content) in enumerate(turns):
        if role == "user":
            if index == 0 and system:
                content = system + SYSTEM_SEPARATOR + content
            ids += tokenizer.encode(f"[INST] {content} [/INST]", bos=False)
        else:
            is_last = index == len(turns) - 1
            ids += tokenizer.encode(content, bos=False, eos=not is_last)
    return ids


def read_messages(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """(role, content) pairs, rejecting anything that is not a known role with string content."""
    if isinstance(messages, (str, bytes)) or len(messages) == 0:
        raise OptionError("chat messages: expected a non-empty list of {role, content} mappings")
    pairs = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise OptionError(
                f"messages[{index}]: expected a mapping, got {type(message).__name__}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise OptionError(f"messages[{index}]: role must be one of {_ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise OptionError(f"messages[{index}] ({role}): content must be a string")
        pairs.append((role, content))
    return pairs


def _split_system(pairs: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """The system prompt (or "") and the remaining turns."""
    if pairs[0][0] == "system":
        return pairs[0][1], pairs[1:]
    return "", pairs


def _check_turn_order(turns: list[tuple[str, str]], offset: int) -> None:
    """User and assistant must alternate, starting with user; assistant turns need text."""
    if not turns:
        raise OptionError("chat messages: need at least one user message after the system one")
    for index, (role, content) in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        where = f"messages[{index + offset}]"
        if role == "system":
            raise OptionError(f"{where}: a system message is only allowed first")
        if role != expected:
            raise OptionError(
                f"{where}: expected role {expected!r} (turns alternate), got {role!r}"
            )
        if role == "assistant" and not content:
            # mistral-common refuses empty assistant turns; an empty prefix means nothing either.
            raise OptionError(f"{where}: assistant content must not be empty")


def _check_v1_vocabulary(tokenizer: Tokenizer) -> None:
    """Refuse v2/v3 tokenizers, where `[INST]` is a control token and this format is wrong, and
    tokenizers without the BOS and EOS tokens it needs."""
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise TokenizerError(
            f"{tokenizer.path}: the folder has no chat template of its own, and the built-in "
            "Mixtral-Instruct one needs BOS and EOS tokens, which this tokenizer does not name "
            "(tokenizer_config.json's bos_token, eos_token); add the model's chat template")
    inst_id = tokenizer.piece_to_id("[INST]")
    if inst_id is not None and tokenizer.is_control(inst_id):
        raise TokenizerError(
            f"{tokenizer.path}: [INST] is a control token here (mistral-common v2/v3 tokenizer); "
            "encode_chat implements only the v1 (Mixtral-8x7B-Instruct) format"
        )
