"""encode_chat must produce exactly mistral-common's v1 (Mixtral-Instruct) token ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import mistral_common
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from offload_rt.chat_template import encode_chat
from offload_rt.errors import OptionError, TokenizerError
from offload_rt.tokenizer import Tokenizer

DATA = Path(mistral_common.__file__).parent / "data"
SYSTEM = "You are a terse assistant. Answer in one line."
TURNS = [
    ("What is the capital of France?", "Paris."),
    ("And of Japan? 日本", "Tokyo — 東京 🗼"),
    ("Thanks!\nBye.", "Goodbye."),
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(DATA / "tokenizer.model.v1")


@pytest.fixture(scope="module")
def reference() -> MistralTokenizer:
    return MistralTokenizer.from_file(str(DATA / "tokenizer.model.v1"))


def reference_ids(reference: MistralTokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """mistral-common's own encoding; a final assistant message is a continuation prefix."""
    converted = []
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            converted.append(SystemMessage(content=content))
        elif role == "user":
            converted.append(UserMessage(content=content))
        else:
            prefix = index == len(messages) - 1
            converted.append(AssistantMessage(content=content, prefix=prefix))
    request = ChatCompletionRequest(messages=converted)
    return reference.encode_chat_completion(request).tokens


def conversation(n_turns: int, system: str | None) -> list[dict[str, str]]:
    """`n_turns` user messages, with the assistant's answer between them."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    for index, (user, assistant) in enumerate(TURNS[:n_turns]):
        messages.append({"role": "user", "content": user})
        if index < n_turns - 1:
            messages.append({"role": "assistant", "content": assistant})
    return messages


@pytest.mark.parametrize("system", [None, SYSTEM, ""])
@pytest.mark.parametrize("n_turns", [1, 2, 3])
def test_matches_mistral_common(
    tok: Tokenizer, reference: MistralTokenizer, n_turns: int, system: str | None
) -> None:
    messages = conversation(n_turns, system)
    assert encode_chat(tok, messages) == reference_ids(reference, messages)


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_final_assistant_is_continued(
    tok: Tokenizer, reference: MistralTokenizer, system: str | None
) -> None:
    messages = [*conversation(2, system), {"role": "assistant", "content": "Tokyo"}]
    ids = encode_chat(tok, messages)
    assert ids == reference_ids(reference, messages)
    assert ids[-1] != tok.eos_id


def test_system_prompt_goes_to_first_user_message(tok: Tokenizer) -> None:
    text = tok.decode(encode_chat(tok, conversation(2, "SYS")))
    assert text == (
        "[INST] SYS\n\nWhat is the capital of France? [/INST] Paris."
        " [INST] And of Japan? 日本 [/INST]"
    )


def test_regression_anchor(tok: Tokenizer) -> None:
    """Hand-checked ids: <s> ▁[ INST ] ▁Be ▁brief . \\n \\n Hi ▁[ / INST ] ▁Hello ! </s> ..."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    inst, end_inst = [733, 16289, 28793], [733, 28748, 16289, 28793]  # "▁[INST]", "▁[/INST]"
    expected = [
        1, *inst, 1739, 6817, 28723, 13, 13, 23809, *end_inst,  # [INST] Be brief.\n\nHi [/INST]
        22557, 28808, 2,  # Hello!</s>
        *inst, 2463, 28706, *end_inst,  # [INST] Bye [/INST]
    ]  # fmt: skip
    assert encode_chat(tok, messages) == expected
    assert [tok.piece(i) for i in inst + end_inst] == ["▁[", "INST", "]", "▁[", "/", "INST", "]"]


def test_empty_user_content_matches(tok: Tokenizer, reference: MistralTokenizer) -> None:
    messages = [{"role": "user", "content": ""}]
    assert encode_chat(tok, messages) == reference_ids(reference, messages)


_text = st.text(st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=40, deadline=None)
@given(system=st.one_of(st.none(), _text), texts=st.lists(_text, min_size=1, max_size=5))
def test_random_conversations_match(
    tok: Tokenizer, reference: MistralTokenizer, system: str | None, texts: list[str]
) -> None:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for index, text in enumerate(texts):
        if index % 2 == 0:
            messages.append({"role": "user", "content": text})
        else:  # mistral-common (and encode_chat) refuse empty assistant turns
            messages.append({"role": "assistant", "content": text or "x"})
    assert encode_chat(tok, messages) == reference_ids(reference, messages)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty"),
        ([{"role": "system", "content": "s"}], "at least one user"),
        ([{"role": "assistant", "content": "a"}], r"messages\[0\].*expected role 'user'"),
        ([{"role": "user", "content": "u"}, {"role": "user", "content": "v"}], "alternate"),
        (
            [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}],
            r"messages\[1\].*only allowed first",
        ),
        ([{"role": "tool", "content": "t"}], "role must be one of"),
        ([{"content": "no role"}], "role must be one of"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}], "not be empty"),
        (["just a string"], "expected a mapping"),
        ("a bare string", "non-empty list"),
    ],
)
def test_bad_conversations(tok: Tokenizer, messages: list, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        encode_chat(tok, messages)


def test_v3_tokenizer_is_refused() -> None:
    v3 = Tokenizer.from_file(DATA / "mistral_instruct_tokenizer_240323.model.v3")
    with pytest.raises(TokenizerError, match="control token"):
        encode_chat(v3, [{"role": "user", "content": "Hi"}])
