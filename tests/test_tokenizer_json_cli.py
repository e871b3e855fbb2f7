"""`offload-rt generate` / `chat` and the Python API, end to end, on a tiny random checkpoint
whose folder has tokenizer.json + tokenizer_config.json (Qwen-style: byte-level BPE, ChatML
template, no BOS) and no tokenizer.model; transformers is the oracle for prompt ids, decoded
text and greedy tokens."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from chat_template_samples import MIXTRAL_V0, QWEN3
from checkpoint_factory import (
    FamilySpec,
    TinySpec,
    make_family_checkpoint,
    make_hf_checkpoint,
    reference_greedy,
)
from tokenizer_json_factory import QWEN_SPECIAL, byte_level_bpe, write_tokenizer_folder
from transformers import PreTrainedTokenizerFast

import offload_rt
from offload_rt.cli import main
from offload_rt.errors import OptionError

VOCAB_ROWS = 416  # 402 tokens in the file: 14 padding ids, as Qwen pads its embedding
IM_END, ENDOFTEXT = 2, 0
QUESTION = "Hi! 東京はどこ? 😀"


def qwen_style_folder(root: Path, template: str = QWEN3) -> Path:
    """A tiny model with Qwen's tokenizer files and EOS settings (config.json: <|endoftext|>;
    generation_config.json: <|im_end|> and <|endoftext|>)."""
    folder = make_hf_checkpoint(root, TinySpec(vocab_size=VOCAB_ROWS, num_experts=8, seed=3))
    write_tokenizer_folder(folder, byte_level_bpe(), special=QWEN_SPECIAL, chat_template=template)
    config = json.loads((folder / "config.json").read_text())
    config.update(bos_token_id=None, eos_token_id=ENDOFTEXT)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": None, "eos_token_id": [IM_END, ENDOFTEXT]}))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qwen_style_folder(tmp_path_factory.mktemp("qwen_style"))


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(model_dir)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> dict[str, Any]:
    code = main(["generate", *map(str, argv), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_generate_chat_prompt_and_text(capsys: pytest.CaptureFixture[str], model_dir: Path,
                                       ref: PreTrainedTokenizerFast) -> None:
    assert not (model_dir / "tokenizer.model").exists()
    res = run_json(capsys, model_dir, "--chat", "--prompt", QUESTION, "--max-new-tokens", "12",
                   "--ignore-eos", "--cache-experts", "4")
    messages = [{"role": "user", "content": QUESTION}]
    prompt = ref.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert res["prompt_token_ids"] == prompt
    assert res["token_ids"] == reference_greedy(model_dir, prompt, 12)
    shown = [i for i in res["token_ids"] if i < len(ref)]  # padding ids: no text
    assert res["text"] == ref.decode(shown, skip_special_tokens=True)


def test_generate_raw_prompt_has_no_bos(capsys: pytest.CaptureFixture[str], model_dir: Path,
                                        ref: PreTrainedTokenizerFast) -> None:
    res = run_json(capsys, model_dir, "--prompt", QUESTION, "--max-new-tokens", "1")
    assert res["prompt_token_ids"] == ref(QUESTION)["input_ids"]
    assert res["prompt_token_ids"][0] != IM_END


def test_stop_ids_and_special_tokens_come_from_the_folder(model_dir: Path) -> None:
    with offload_rt.load(model_dir) as rt:
        assert rt.eos_token_ids == (IM_END, ENDOFTEXT)  # generation_config.json's list
        assert rt.tokenizer is not None and rt.tokenizer.eos_id == IM_END
        assert rt.tokenizer.vocab_size == VOCAB_ROWS
        out = rt.generate(messages=[{"role": "user", "content": "hi"}], max_new_tokens=30)
    assert IM_END not in out.token_ids and ENDOFTEXT not in out.token_ids
    assert out.finish_reason in ("stop", "length")


def test_chat_command_answers_with_the_models_template(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str],
                                                       model_dir: Path,
                                                       ref: PreTrainedTokenizerFast) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\nand then?\n/exit\n"))
    code = main(["chat", str(model_dir), "--temperature", "0", "--max-new-tokens", "6",
                 "--system", "Be brief."])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.count("tokens (") == 2  # one summary line per answer
    assert out.strip()  # the answers


def test_chat_session_prompt_matches_transformers(model_dir: Path,
                                                  ref: PreTrainedTokenizerFast) -> None:
    from offload_rt.chat import ChatSession

    with offload_rt.load(model_dir) as rt:
        session = ChatSession(rt, system="Be brief.", max_new_tokens=4, sampling={
            "temperature": 0.0})
        first = "".join(session.reply("hello"))
        "".join(session.reply("more"))
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hello"},
                    {"role": "assistant", "content": first.strip() or " "},
                    {"role": "user", "content": "more"}]
        assert rt.last_prompt_ids == ref.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False)


def test_template_refusal_is_one_error_line(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    """Mixtral's first template refuses a system message: the CLI names the file and says the
    template's message, exit 2, no traceback."""
    folder = qwen_style_folder(tmp_path, template=MIXTRAL_V0.replace(
        "bos_token", "'<|im_start|>'").replace("eos_token", "'<|im_end|>'"))
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code = main(["chat", str(folder), "--system", "Be brief.", "--max-new-tokens", "2"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("offload-rt: error: ") and "Traceback" not in err
    assert f"{folder / 'tokenizer_config.json'} (field 'chat_template')" in err
    assert "the chat template refused these messages: Conversation roles must alternate" in err
    with offload_rt.load(folder) as rt, pytest.raises(OptionError, match="must alternate"):
        rt.generate(messages=[{"role": "user", "content": "a"},
                              {"role": "user", "content": "b"}], max_new_tokens=1)


ONE_TURN = ("{% if messages | length > 1 %}{{ raise_exception('only one turn') }}{% endif %}"
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_refusal_on_a_later_turn_leaves_the_session_running(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    """Break-it: the second question's refusal ended the chat (exit 2, 'third' never read).
    Now that question is not answered, with a note, and /reset makes the next one answerable."""
    folder = qwen_style_folder(tmp_path, template=ONE_TURN)
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n/reset\nthird\n"))
    code = main(["chat", str(folder), "--temperature", "0", "--max-new-tokens", "2"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "(not answered: " in err and "only one turn" in err and "/reset" in err
    assert err.count("tokens (") == 2  # first and third answered


def test_an_empty_prompt_says_where_it_came_from(tmp_path: Path) -> None:
    """Break-it: a template rendering nothing, or "" with a tokenizer that adds no BOS, said
    'prompt_ids is empty' (the API's internal name); the server counted it as a failed
    generation. Now encode refuses it, saying which input was empty."""
    folder = qwen_style_folder(tmp_path, template="{% if false %}x{% endif %}")
    with offload_rt.load(folder) as rt:
        with pytest.raises(OptionError, match="^the chat template rendered these messages as no"):
            rt.generate(messages=[{"role": "user", "content": "hi"}], max_new_tokens=1)
        with pytest.raises(OptionError, match="^the prompt text encodes to no tokens"):
            rt.generate("", max_new_tokens=1)
        with pytest.raises(OptionError, match="^the prompt ids are empty"):
            rt.generate([], max_new_tokens=1)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_each_family_chats_with_its_own_tokenizer_and_template(
        family: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    """An HF folder of each family with tokenizer.json and a ChatML template (no
    tokenizer.model): chat answers two questions; the prompt is transformers' template."""
    folder = make_family_checkpoint(tmp_path, FamilySpec(family, vocab_size=VOCAB_ROWS, seed=5))
    write_tokenizer_folder(folder, byte_level_bpe(), special=QWEN_SPECIAL, chat_template=QWEN3)
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nand again?\n/exit\n"))
    code = main(["chat", str(folder), "--temperature", "0", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("tokens (") == 2
    messages = [{"role": "user", "content": "hello there"}]
    with offload_rt.load(folder) as rt:
        assert rt.encode(messages=messages) == PreTrainedTokenizerFast.from_pretrained(
            folder).apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
