"""A chat template that refuses, fails, or cannot be read: an OffloadError naming the file and
the template's message, never a traceback; raw prompts still work. The sandbox holds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from chat_template_samples import CONVERSATIONS, QWEN2
from tokenizer_json_factory import QWEN_SPECIAL, byte_level_bpe, write_tokenizer_folder
from transformers import PreTrainedTokenizerFast

from offload_rt.errors import OptionError, TokenizerError
from offload_rt.prompt import encode_messages, encode_text
from offload_rt.tokenizer import Tokenizer

USER = [{"role": "user", "content": "hi"}]


def folder_with(tmp_path: Path, template: object, **config: object) -> Path:
    return write_tokenizer_folder(tmp_path, byte_level_bpe(), special={**QWEN_SPECIAL, **config},
                                  chat_template=template)


def origin(folder: Path) -> str:
    return f"{folder / 'tokenizer_config.json'} (field 'chat_template')"


def test_raise_exception_names_the_file_and_says_the_message(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, "{% if messages|length > 1 %}"
                                   "{{ raise_exception('One message only, please: ' ~ "
                                   "messages|length) }}{% endif %}{{ messages[0].content }}")
    tok = Tokenizer.from_model_dir(folder)
    two = [*USER, {"role": "assistant", "content": "x"}, *USER]
    with pytest.raises(OptionError) as info:
        encode_messages(tok, two)
    assert str(info.value) == (f"{origin(folder)}: the chat template refused these messages: "
                               "One message only, please: 3")
    with pytest.raises(Exception, match="One message only, please: 3"):  # as transformers says
        PreTrainedTokenizerFast.from_pretrained(folder).apply_chat_template(two, tokenize=False)
    assert encode_messages(tok, USER) == tok.encode("hi", bos=False)


def test_syntax_error_warns_at_load_and_refuses_chats_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = folder_with(tmp_path, "{% for m in messages %}{{ m.content }\n{% endfor %}")
    with caplog.at_level(logging.WARNING, logger="offload_rt.chat_template_jinja"):
        tok = Tokenizer.from_model_dir(folder)
    assert "does not compile" in caplog.text
    with pytest.raises(TokenizerError) as info:
        encode_messages(tok, USER)
    assert str(info.value).startswith(f"{origin(folder)}: the chat template does not compile "
                                      "(line 1: unexpected '}')")
    assert encode_text(tok, "hi") == tok.encode("hi")  # raw prompts are unaffected


@pytest.mark.parametrize(("template", "what"), [
    ("{{ messages[3].content }}", "UndefinedError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ messages[0].content + 1 }}", "TypeError"),
])
def test_other_template_failures_name_the_file(tmp_path: Path, template: str,
                                               what: str) -> None:
    folder = folder_with(tmp_path, template)
    with pytest.raises(TokenizerError) as info:
        encode_messages(Tokenizer.from_model_dir(folder), USER)
    assert str(info.value).startswith(f"{origin(folder)}: the chat template failed on these "
                                      f"messages: {what}")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",  # immutable sandbox
    "{% set ns = namespace(_secret=1) %}",
])
def test_sandbox_refuses_unsafe_templates(tmp_path: Path, template: str) -> None:
    folder = folder_with(tmp_path, template)
    with pytest.raises(TokenizerError, match="SecurityError"):
        encode_messages(Tokenizer.from_model_dir(folder), USER)


def test_named_templates_without_default(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, [{"name": "tool_use", "template": "T"},
                                    {"name": "rag", "template": "R"}])
    with pytest.raises(TokenizerError, match=r"named chat templates \(rag, tool_use\) but none "
                                             "called 'default'"):
        encode_messages(Tokenizer.from_model_dir(folder), USER)


@pytest.mark.parametrize("value", [5, {"default": 5}, {}, [{"name": "default"}]])
def test_malformed_chat_template_field(tmp_path: Path, value: object,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """A field of the wrong type warns at load and refuses chat prompts only, as a template
    that does not compile does (break-it: it refused the folder, raw prompts too). (A
    {"name": template} object is a valid form: test_chat_template_jinja.py.)"""
    folder = folder_with(tmp_path, value)
    tok = Tokenizer.from_model_dir(folder)
    assert "must be a template" in caplog.text
    assert tok.encode("hi")  # raw prompts still work
    with pytest.raises(TokenizerError, match="field 'chat_template' in .*tokenizer_config.json "
                                             "must be a template"):
        encode_messages(tok, USER)


def test_unreadable_template_file(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, None)
    (folder / "chat_template.jinja").write_bytes(b"{{ bos_token }}\xff")
    with pytest.raises(TokenizerError, match=r"chat_template.jinja: cannot read the chat "
                                             "template"):
        Tokenizer.from_model_dir(folder)


def test_continuing_needs_a_template_that_reads_content(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, "{% for m in messages %}{{ m.role }}{% endfor %}")
    with pytest.raises(OptionError, match="never reads 'content'"):
        encode_messages(Tokenizer.from_model_dir(folder), CONVERSATIONS["continued"])


def test_messages_are_checked_before_the_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_model_dir(folder_with(tmp_path, QWEN2))
    with pytest.raises(OptionError, match="role must be one of"):
        encode_messages(tok, [{"role": "tool", "content": "x"}])
    with pytest.raises(OptionError, match="non-empty list"):
        encode_messages(tok, [])


def test_builtin_template_needs_bos_and_eos(tmp_path: Path) -> None:
    """No template of its own and no BOS (Qwen): the Mixtral fallback cannot be built."""
    tok = Tokenizer.from_model_dir(folder_with(tmp_path, None))
    with pytest.raises(TokenizerError, match="no chat template of its own"):
        encode_messages(tok, USER)


def test_bad_special_token_field(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, QWEN2)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = 7
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="field 'eos_token' must be a token"):
        Tokenizer.from_model_dir(folder)
