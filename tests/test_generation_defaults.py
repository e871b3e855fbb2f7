"""generation_config.json: the model's stop ids and defaults are honoured, the rest refused.

Every id of an ``eos_token_id`` list stops (config.json's too, when generation_config.json does
not set them); ``do_sample``/``temperature``/``top_k``/``top_p``, ``max_new_tokens`` /
``max_length`` and ``stop_strings`` become the defaults of a request that leaves them out
(API: None; CLI: an absent flag; ``chat`` keeps 0.7 / 0.9 / 200 for a model that sets none);
fields that change tokens and that we do not implement are refused by name.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from offload_rt.cli import build_parser, main
from offload_rt.cli_options import sampling_kwargs
from offload_rt.errors import CheckpointError, ContextLengthError, OptionError

PROMPT = [1, 17, 5, 99, 42, 8, 64, 23]
N = 12


def write_generation_config(model_dir: Path, fields: dict[str, Any] | None) -> Path:
    """Replace generation_config.json (None: remove it)."""
    path = model_dir / "generation_config.json"
    path.unlink(missing_ok=True)
    if fields is not None:
        path.write_text(json.dumps(fields))
    return path


@pytest.fixture
def model_dir(tiny_hf_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_hf_checkpoint, tmp_path / "m"))


@pytest.fixture(scope="module")
def greedy(tiny_hf_checkpoint: Path) -> list[int]:
    with offload_rt.load(tiny_hf_checkpoint) as rt:
        return rt.generate(PROMPT, max_new_tokens=N, ignore_eos=True, temperature=0).token_ids


def first_new(tokens: list[int]) -> int:
    """Index of the first token (after two) that did not occur before it."""
    return next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])


# --- stop ids -----------------------------------------------------------------------------------

@pytest.mark.parametrize("file", ["generation_config.json", "config.json"])
def test_every_eos_id_of_a_list_stops(model_dir: Path, greedy: list[int], file: str) -> None:
    """Was: only the list's first id stopped, and generation_config.json was not read."""
    i = first_new(greedy)
    unused = next(t for t in range(3, 128) if t not in greedy)
    if file == "config.json":
        write_generation_config(model_dir, None)
    path = model_dir / file
    data = json.loads(path.read_text())
    data["eos_token_id"] = [unused, greedy[i]]
    path.write_text(json.dumps(data))
    with offload_rt.load(model_dir) as rt:
        out = rt.generate(PROMPT, max_new_tokens=N)
    assert (out.token_ids, out.finish_reason) == (greedy[:i], "eos")


# --- sampling and length defaults ---------------------------------------------------------------

def test_sampling_defaults_come_from_the_model(model_dir: Path, greedy: list[int]) -> None:
    write_generation_config(model_dir, {"do_sample": True, "temperature": 0.8, "top_p": 0.9})
    with offload_rt.load(model_dir) as rt:
        assert rt.generation_defaults.sampling(None, None, None) == (0.8, 50, 0.9)  # top_k: HF's
        by_default = rt.generate(PROMPT, max_new_tokens=N, seed=3, ignore_eos=True).token_ids
        spelled = rt.generate(PROMPT, max_new_tokens=N, seed=3, ignore_eos=True,
                              temperature=0.8, top_k=50, top_p=0.9).token_ids
        forced_greedy = rt.generate(PROMPT, max_new_tokens=N, ignore_eos=True, temperature=0)
    assert by_default == spelled != greedy
    assert forced_greedy.token_ids == greedy  # the caller's value wins


def test_length_defaults_come_from_the_model(model_dir: Path) -> None:
    write_generation_config(model_dir, {"max_new_tokens": 5})
    with offload_rt.load(model_dir) as rt:
        assert len(rt.generate(PROMPT, ignore_eos=True).token_ids) == 5
        assert len(rt.generate(PROMPT, ignore_eos=True, max_new_tokens=3).token_ids) == 3
    write_generation_config(model_dir, {"max_length": len(PROMPT) + 4})  # prompt + new, as HF
    with offload_rt.load(model_dir) as rt:
        assert len(rt.generate(PROMPT, ignore_eos=True).token_ids) == 4
        with pytest.raises(ContextLengthError, match=r"generation_config\.json: max_length 12"):
            rt.generate(PROMPT * 2, ignore_eos=True)


# --- refused fields -----------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("repetition_penalty", 1.3), ("no_repeat_ngram_size", 3), ("min_new_tokens", 4),
    ("min_length", 20), ("num_beams", 4), ("suppress_tokens", [5]), ("bad_words_ids", [[5]]),
    ("guidance_scale", 2.0), ("forced_eos_token_id", 2),
])
def test_fields_we_do_not_implement_are_refused_at_load(model_dir: Path, field: str,
                                                        value: object) -> None:
    path = write_generation_config(model_dir, {"eos_token_id": 2, field: value})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: {field} "):
        offload_rt.load(model_dir)


def test_neutral_values_load(model_dir: Path, greedy: list[int]) -> None:
    write_generation_config(model_dir, {"repetition_penalty": 1.0, "num_beams": 1,
                                        "min_length": 0, "bad_words_ids": None,
                                        "renormalize_logits": True, "max_time": 30})
    with offload_rt.load(model_dir) as rt:
        assert rt.generate(PROMPT, max_new_tokens=N, ignore_eos=True).token_ids == greedy


def test_sampling_only_fields_are_refused_when_sampling(model_dir: Path,
                                                        greedy: list[int]) -> None:
    path = write_generation_config(model_dir, {"min_p": 0.05})
    with offload_rt.load(model_dir) as rt:
        assert rt.generate(PROMPT, max_new_tokens=N, ignore_eos=True).token_ids == greedy
        with pytest.raises(OptionError, match=rf"{re.escape(str(path))}: min_p 0.05"):
            rt.generate(PROMPT, temperature=0.7)


@pytest.mark.parametrize(("text", "words"), [
    ("{'do_sample': true}", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"temperature": "hot"}', "field 'temperature'"),
    ('{"top_p": 0}', "field 'top_p'"),
    ('{"do_sample": "yes"}', "field 'do_sample'"),
    ('{"eos_token_id": "</s>"}', "field 'eos_token_id'"),
    ('{"max_new_tokens": 0}', "field 'max_new_tokens'"),
    ('{"stop_strings": [""]}', "field 'stop_strings'"),
    # replaces config.json's stop ids: an id the model cannot produce never stops (was silent)
    ('{"eos_token_id": 9999}', "field 'eos_token_id' names token id 9999, outside the vocab"),
    ('{"eos_token_id": [1, 2, 9999]}', "names token id 9999"),
])
def test_a_malformed_file_is_named(model_dir: Path, text: str, words: str) -> None:
    path = model_dir / "generation_config.json"
    path.write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + re.escape(words)):
        offload_rt.load(model_dir)


# --- stop strings (need a tokenizer) ------------------------------------------------------------

@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(vocab_size=32000, tokenizer=True, hidden_size=16, intermediate_size=16,
                    num_heads=2, num_kv_heads=1)
    return make_hf_checkpoint(tmp_path_factory.mktemp("text_model"), spec)


def test_stop_strings_are_the_default_stop(text_model: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(text_model, tmp_path / "m"))
    with offload_rt.load(model_dir) as rt:
        full = rt.generate("Once upon a time", max_new_tokens=16, ignore_eos=True).text
    stop = full.strip()[4:7]
    write_generation_config(model_dir, {"stop_strings": [stop]})
    with offload_rt.load(model_dir) as rt:
        out = rt.generate("Once upon a time", max_new_tokens=16, ignore_eos=True)
        unstopped = rt.generate("Once upon a time", max_new_tokens=16, ignore_eos=True, stop=[])
    assert (out.text, out.finish_reason) == (full[:full.index(stop)], "stop")
    assert unstopped.text == full


# --- the command line ---------------------------------------------------------------------------

def parsed(*argv: str) -> dict[str, Any]:
    return sampling_kwargs(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize(("fields", "chat"), [
    (None, {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 200}),
    ({"do_sample": True, "temperature": 0.3, "max_new_tokens": 50},
     {"temperature": 0.3, "top_p": 1.0, "max_new_tokens": 50}),
    ({"do_sample": False}, {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 200}),
])
def test_flag_defaults(model_dir: Path, fields: dict[str, Any] | None,
                       chat: dict[str, Any]) -> None:
    """generate: an absent flag is None (the runtime applies the model's default); chat: its
    own 0.7 / 0.9 / 200 unless the model's file sets them; a given flag always wins."""
    write_generation_config(model_dir, fields)
    gen = parsed("generate", str(model_dir), "--prompt", "x")
    assert all(gen[k] is None for k in ("temperature", "top_k", "top_p", "max_new_tokens",
                                        "stop"))
    got = parsed("chat", str(model_dir))
    assert {k: got[k] for k in chat} == chat and got["top_k"] is None
    assert parsed("chat", str(model_dir), "--temperature", "0.5")["temperature"] == 0.5


def test_cli_generate_samples_as_the_model_says(model_dir: Path, greedy: list[int],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    write_generation_config(model_dir, {"do_sample": True, "temperature": 0.8})
    ids = ",".join(map(str, PROMPT))
    assert main(["generate", str(model_dir), "--prompt-ids", ids, "--max-new-tokens", str(N),
                 "--seed", "3", "--ignore-eos", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)["token_ids"]
    with offload_rt.load(model_dir) as rt:
        api = rt.generate(PROMPT, max_new_tokens=N, seed=3, ignore_eos=True).token_ids
    assert cli == api != greedy
