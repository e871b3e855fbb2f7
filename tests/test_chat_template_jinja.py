"""The model's own chat template, rendered and encoded exactly as transformers'
apply_chat_template does on the same tokenizer_config.json: real-world templates (Qwen2 and
Qwen3 ChatML, Mixtral-Instruct's two HF templates, OLMoE's, a block-tag one that relies on
trim_blocks/lstrip_blocks, one using transformers' extras) and several conversations."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from chat_template_samples import (
    BLOCKS,
    CONVERSATIONS,
    EXTRAS,
    MIXTRAL,
    MIXTRAL_V0,
    OLMOE,
    QWEN2,
    QWEN3,
)
from checkpoint_factory import mixtral_tokenizer_path
from tokenizer_json_factory import (
    MIXTRAL_SPECIAL,
    QWEN_SPECIAL,
    byte_level_bpe,
    mixtral_tokenizer_json,
    write_tokenizer_folder,
)
from transformers import PreTrainedTokenizerFast

from offload_rt.prompt import encode_messages
from offload_rt.tokenizer import Tokenizer

OLMOE_SPECIAL = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                 "pad_token": "<|im_start|>"}
# name -> (template, tokenizer kind, named special tokens)
TEMPLATES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen2": (QWEN2, "byte_level", QWEN_SPECIAL),
    "qwen3": (QWEN3, "byte_level", QWEN_SPECIAL),
    "mixtral": (MIXTRAL, "mixtral", MIXTRAL_SPECIAL),
    "mixtral_v0": (MIXTRAL_V0, "mixtral", MIXTRAL_SPECIAL),
    "olmoe": (OLMOE, "byte_level", OLMOE_SPECIAL),
    "blocks": (BLOCKS, "mixtral", MIXTRAL_SPECIAL),
    "extras": (EXTRAS, "byte_level", QWEN_SPECIAL),
}
# conversations each template refuses (raise_exception) or cannot continue, as transformers does
REFUSED = {("mixtral_v0", "system"), ("mixtral_v0", "multi_turn"), ("extras", "continued")}


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizer_files")
    return {"byte_level": write_tokenizer_folder(root / "bl", byte_level_bpe(), special={}),
            "mixtral": write_tokenizer_folder(root / "mix",
                                              mixtral_tokenizer_json(mixtral_tokenizer_path()),
                                              special={})}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory,
            tokenizer_files: dict[str, Path]) -> dict[str, Path]:
    """One folder per template: its tokenizer.json, tokenizer_config.json with the template."""
    root = tmp_path_factory.mktemp("templates")
    out = {}
    for name, (template, kind, special) in TEMPLATES.items():
        folder = root / name
        folder.mkdir()
        shutil.copyfile(tokenizer_files[kind] / "tokenizer.json", folder / "tokenizer.json")
        config = json.loads((tokenizer_files[kind] / "tokenizer_config.json").read_text())
        config.update(special, chat_template=template)
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
        out[name] = folder
    return out


@functools.cache
def load(folder: Path) -> tuple[Tokenizer, PreTrainedTokenizerFast]:
    """Ours and transformers' tokenizer of a template folder (loaded once per module)."""
    return Tokenizer.from_model_dir(folder), PreTrainedTokenizerFast.from_pretrained(folder)


def reference_text(ref: PreTrainedTokenizerFast, messages: list[dict[str, str]],
                   generation_prompt: bool) -> str:
    continued = messages[-1]["role"] == "assistant"
    return ref.apply_chat_template(messages, tokenize=False, continue_final_message=continued,
                                   add_generation_prompt=generation_prompt and not continued)


CASES = [(t, c) for t in TEMPLATES for c in CONVERSATIONS if (t, c) not in REFUSED]


@pytest.mark.parametrize(("template", "conversation"), CASES)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendered_text_matches_transformers(folders: dict[str, Path], template: str,
                                            conversation: str, generation_prompt: bool) -> None:
    tok, ref = load(folders[template])
    messages = CONVERSATIONS[conversation]
    continued = messages[-1]["role"] == "assistant"
    assert tok.chat_template is not None
    ours = tok.chat_template.render(messages, continue_final_message=continued,
                                    add_generation_prompt=generation_prompt and not continued)
    assert ours == reference_text(ref, messages, generation_prompt)


@pytest.mark.parametrize(("template", "conversation"), CASES)
def test_prompt_ids_match_transformers(folders: dict[str, Path], template: str,
                                       conversation: str) -> None:
    """A chat prompt: the generation prompt after the messages, or the final assistant
    message continued."""
    tok, ref = load(folders[template])
    messages = CONVERSATIONS[conversation]
    continued = messages[-1]["role"] == "assistant"
    expected = ref.apply_chat_template(messages, return_dict=False,
                                       continue_final_message=continued,
                                       add_generation_prompt=not continued)
    assert encode_messages(tok, messages) == expected


def test_qwen3_prompt_reads_as_chatml(folders: dict[str, Path]) -> None:
    tok = Tokenizer.from_model_dir(folders["qwen3"])
    ids = encode_messages(tok, CONVERSATIONS["no_system_multi"])
    assert tok.decode(ids) == "user\n2+2?\nassistant\n4\nuser\n3+3?\nassistant\n"  # specials
    assert ids.count(tok.piece_to_id("<|im_start|>")) == 4 and "<think>" not in tok.decode(ids)


def test_sentencepiece_folder_with_a_template(folders: dict[str, Path], tmp_path: Path) -> None:
    """tokenizer.model + tokenizer_config.json's template: the template's "<s>"/"</s>" text
    becomes BOS/EOS, the rest is encoded stretch by stretch, as transformers encodes it."""
    shutil.copyfile(mixtral_tokenizer_path(), tmp_path / "tokenizer.model")
    shutil.copyfile(folders["mixtral"] / "tokenizer_config.json",
                    tmp_path / "tokenizer_config.json")
    tok = Tokenizer.from_model_dir(tmp_path)
    _, ref = load(folders["mixtral"])
    assert tok.path.name == "tokenizer.model" and tok.chat_template is not None
    for messages in CONVERSATIONS.values():
        continued = messages[-1]["role"] == "assistant"
        assert encode_messages(tok, messages) == ref.apply_chat_template(
            messages, return_dict=False, continue_final_message=continued,
            add_generation_prompt=not continued)


@pytest.mark.parametrize("named", [
    [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": QWEN2}],
    # break-it: {"name": template} (the form transformers holds the list in, and renders from
    # the file too) was refused, and with it even raw prompts
    {"tool_use": "TOOLS", "default": QWEN2},
], ids=["list", "object"])
def test_named_templates_use_default(tokenizer_files: dict[str, Path], tmp_path: Path,
                                     named: object) -> None:
    folder = write_tokenizer_folder(tmp_path, byte_level_bpe(), special=QWEN_SPECIAL,
                                    chat_template=named)
    tok = Tokenizer.from_model_dir(folder)
    ref = PreTrainedTokenizerFast.from_pretrained(folder)
    messages = CONVERSATIONS["system"]
    assert encode_messages(tok, messages) == ref.apply_chat_template(
        messages, return_dict=False, add_generation_prompt=True)
    assert "template 'default'" in tok.chat_template.origin  # type: ignore[union-attr]


def test_chat_template_jinja_file_wins(tmp_path: Path) -> None:
    """Newer folders ship chat_template.jinja; it replaces tokenizer_config.json's template."""
    folder = write_tokenizer_folder(tmp_path, byte_level_bpe(), special=QWEN_SPECIAL,
                                    chat_template="IGNORED {{ messages[0].content }}")
    (folder / "chat_template.jinja").write_text(QWEN3)
    tok = Tokenizer.from_model_dir(folder)
    ref = PreTrainedTokenizerFast.from_pretrained(folder)
    messages = CONVERSATIONS["multi_turn"]
    assert tok.chat_template is not None
    assert tok.chat_template.origin == str(folder / "chat_template.jinja")
    assert encode_messages(tok, messages) == ref.apply_chat_template(
        messages, return_dict=False, add_generation_prompt=True)


def test_folder_without_template_keeps_the_builtin_mixtral_one(
        tokenizer_files: dict[str, Path], tmp_path: Path) -> None:
    """The fallback: a tokenizer.json Mixtral folder without a template gets mistral-common's
    v1 prompt, as a tokenizer.model folder does."""
    folder = write_tokenizer_folder(tmp_path, mixtral_tokenizer_json(mixtral_tokenizer_path()),
                                    special=MIXTRAL_SPECIAL)
    tok = Tokenizer.from_model_dir(folder)
    sp = Tokenizer.from_file(mixtral_tokenizer_path())
    messages = CONVERSATIONS["multi_turn"]
    assert tok.chat_template is None
    assert encode_messages(tok, messages) == encode_messages(sp, messages)
    assert tok.spelled_markers("say [INST]") == ["[INST]"]
