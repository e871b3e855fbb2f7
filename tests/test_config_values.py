"""Every value read from config.json / params.json / the shard index is type- and range-checked
at load, with the file and the field (or index entry) named (break-it findings 2e, 5, 8, 9).

Before: a null or text RoPE base or epsilon was a TypeError/ValueError traceback from
``float(...)``; a 0 or negative one loaded and the first generation stopped with "non-finite
logits ... the weights may be corrupt"; ``"yes"``/``"8"``/``"x"`` were taken for true/8/no
RoPE parameters; ``attention_bias: "false"`` was refused as "attention_bias true"; an EOS id
outside the vocabulary loaded; shard names in the index were paths read from anywhere.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_factory import (
    TinySpec,
    load_reference_model,
    make_hf_checkpoint,
    read_safetensors,
)
from safetensors.torch import save_file

import offload_rt
from offload_rt.checkpoint import Checkpoint
from offload_rt.errors import CheckpointError

IDS = [3, 17, 5, 99, 42, 8, 64, 1]


def raises(*parts: str) -> pytest.RaisesContext[CheckpointError]:
    return pytest.raises(CheckpointError, match=".*".join(re.escape(p) for p in parts))


def edit_json(path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def hf_dir(tiny_hf_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_hf_checkpoint, tmp_path / "hf"))


@pytest.fixture
def mistral_dir(tiny_mistral_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_mistral_checkpoint, tmp_path / "mistral"))


def rope(theta: object) -> Callable[[dict[str, Any]], object]:
    return lambda c: c["rope_parameters"].update(rope_theta=theta)


# --- config.json: every field read, each wrong type or value named --------------------------

CONFIG_JSON = [
    # 2e: null / text / list numbers (were TypeError / ValueError from float())
    (lambda c: c.update(rms_norm_eps=None), ["'rms_norm_eps' must be a number > 0", "None"]),
    (lambda c: c.update(rms_norm_eps=[1]), ["'rms_norm_eps' must be a number > 0", "[1]"]),
    (lambda c: c.update(rms_norm_eps="1e-5"), ["'rms_norm_eps'", "'1e-5'"]),
    (rope(None), ["'rope_parameters.rope_theta' must be a number > 0", "None"]),
    (rope("abc"), ["'rope_parameters.rope_theta'", "'abc'"]),
    (lambda c: (c.pop("rope_parameters"), c.update(rope_theta=None)), ["'rope_theta'", "None"]),
    # 5: values that compute NaN (were blamed on the weights at the first generation)
    (lambda c: c.update(rms_norm_eps=-1), ["'rms_norm_eps' must be a number > 0, got -1",
                                           "RMSNorm"]),
    (lambda c: c.update(rms_norm_eps=0), ["'rms_norm_eps' must be a number > 0, got 0"]),
    (lambda c: c.update(rms_norm_eps=float("nan")), ["'rms_norm_eps'", "nan"]),
    (rope(0), ["'rope_parameters.rope_theta' must be a number > 0, got 0", "RoPE base"]),
    (rope(-1.0), ["'rope_parameters.rope_theta'", "-1.0"]),
    (rope(float("inf")), ["'rope_parameters.rope_theta'", "inf"]),
    # 8: odd values that were accepted, or refused with the wrong reason
    (lambda c: c.update(tie_word_embeddings="yes"), [("'tie_word_embeddings' must be true or "
                                                     "false, got 'yes'")]),
    (lambda c: c.update(tie_word_embeddings=None), ["'tie_word_embeddings'", "None"]),
    (lambda c: c.update(rope_parameters="x"), ["'rope_parameters' must be an object", "'x'"]),
    (lambda c: c.update(rope_scaling=[1]), ["'rope_scaling' must be an object", "[1]"]),
    (lambda c: c.update(head_dim="8"), ["'head_dim' must be a positive integer, got '8'"]),
    (lambda c: c.update(head_dim=8.0), ["'head_dim' must be a positive integer, got 8.0"]),
    (lambda c: c.update(num_key_value_heads="2"), ["'num_key_value_heads'", "'2'"]),
    (lambda c: c.update(max_position_embeddings=256.0), ["'max_position_embeddings'"]),
    (lambda c: c.update(attention_bias="false"), [("'attention_bias' must be true or false, "
                                                  "got 'false'")]),
    (lambda c: c.update(mlp_bias=0), ["'mlp_bias' must be true or false, got 0"]),
    (lambda c: c.update(eos_token_id=128), ["'eos_token_id'", "token id 128", "vocab_size 128",
                                            "never"]),
    (lambda c: c.update(eos_token_id=[2, 999]), ["'eos_token_id'", "token id 999"]),
    (lambda c: c.update(architectures="MixtralForCausalLM"), ["'architectures' must be a list"]),
    (lambda c: c.update(hidden_act=None), ["unsupported hidden_act None"]),
    # break-it: "top_k (9) exceeds num_experts (8)" named neither field of the file
    (lambda c: c.update(num_experts_per_tok=99), ["top_k (99, field 'num_experts_per_tok')",
                                                  "'num_local_experts'"]),
]


@pytest.mark.parametrize(("edit", "words"), CONFIG_JSON)
def test_config_json_values_are_checked_by_name(hf_dir: Path, edit: Callable[..., object],
                                                words: list[str]) -> None:
    edit_json(hf_dir / "config.json", edit)
    with raises(str(hf_dir / "config.json"), *words):
        Checkpoint.open(hf_dir)


@pytest.mark.parametrize(("edit", "words"), [
    (lambda p: p.update(rope_theta=None), ["'rope_theta' must be a number > 0, got None"]),
    (lambda p: p.update(rope_theta="abc"), ["'rope_theta'", "'abc'"]),
    (lambda p: p.update(norm_eps=None), ["'norm_eps' must be a number > 0, got None"]),
    (lambda p: p.update(rope_theta=0), ["'rope_theta' must be a number > 0, got 0", "RoPE"]),
    (lambda p: p.update(rope_theta=-1), ["'rope_theta'", "-1"]),
    (lambda p: p.update(norm_eps=-1e-5), ["'norm_eps'", "-1e-05", "RMSNorm"]),
    (lambda p: p.update(head_dim="8"), ["'head_dim' must be a positive integer, got '8'"]),
    (lambda p: p.update(n_kv_heads=2.0), ["'n_kv_heads'", "2.0"]),
    (lambda p: p["moe"].update(num_experts="4"), [("'moe.num_experts' must be a positive "
                                                  "integer, got '4'")]),
    (lambda p: p.update(moe=[4, 2]), ["'moe' must be an object"]),
    (lambda p: p.update(max_seq_len="256"), ["'max_seq_len'", "'256'"]),
    # was "[] gives layers different windows"
    (lambda p: p.update(sliding_window=[]), [("'sliding_window' must be a positive integer or "
                                             "null, got []")]),
])
def test_params_json_values_are_checked_by_name(mistral_dir: Path, edit: Callable[..., object],
                                                words: list[str]) -> None:
    edit_json(mistral_dir / "params.json", edit)
    with raises(str(mistral_dir / "params.json"), *words):
        Checkpoint.open(mistral_dir)


def test_documented_nulls_still_mean_their_default(hf_dir: Path, mistral_dir: Path) -> None:
    """null head_dim / rope_parameters / rope_scaling / attention_bias / eos_token_id and a
    params.json without max_seq_len load as before (transformers writes such nulls)."""
    edit_json(hf_dir / "config.json", lambda c: c.update(
        head_dim=None, rope_scaling=None, attention_bias=None, rope_parameters=None,
        rope_theta=1e4, eos_token_id=None))
    cfg = Checkpoint.open(hf_dir).config
    assert (cfg.head_dim, cfg.rope_theta, cfg.eos_token_ids) == (8, 1e4, ())
    edit_json(mistral_dir / "params.json", lambda p: p.update(max_seq_len=None, head_dim=None))
    assert Checkpoint.open(mistral_dir).config.max_seq_len == 32768


# --- tie_word_embeddings true with an LM head in the file -----------------------------------

def test_a_tied_config_with_an_lm_head_in_the_file_uses_it_as_transformers_does(
        hf_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """transformers 5 keeps a checkpoint's lm_head.weight when it differs from the embedding
    (its warning: "both are present in the checkpoints with different values, so we will NOT
    tie them"). Before: the tensor was silently ignored and the embedding used."""
    edit_json(hf_dir / "config.json", lambda c: c.update(tie_word_embeddings=True))
    with torch.inference_mode():
        expected = load_reference_model(hf_dir)(torch.tensor([IDS])).logits[0]
    with caplog.at_level(logging.WARNING, logger="offload_rt"):
        rt = offload_rt.load(hf_dir, dtype="float32", offload=False)
    assert "tie_word_embeddings is true" in caplog.text and "'lm_head.weight'" in caplog.text
    assert str(hf_dir / "config.json") in caplog.text
    with torch.inference_mode():
        ours = rt.model(torch.tensor(IDS), 0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    rt.close()


def test_a_tied_config_without_an_lm_head_ties(tmp_path: Path) -> None:
    model_dir = make_hf_checkpoint(tmp_path / "tied", TinySpec(seed=3))
    path = model_dir / "model.safetensors"
    metadata, tensors = read_safetensors(path)
    del tensors["lm_head.weight"]
    save_file(tensors, path, metadata)
    edit_json(model_dir / "config.json", lambda c: c.update(tie_word_embeddings=True))
    with torch.inference_mode():
        expected = load_reference_model(model_dir)(torch.tensor([IDS])).logits[0]
    with offload_rt.load(model_dir, dtype="float32", offload=False) as rt:
        assert rt.config.tie_word_embeddings
        with torch.inference_mode():
            torch.testing.assert_close(rt.model(torch.tensor(IDS), 0), expected, atol=1e-5,
                                       rtol=1e-4)


# --- shard names in model.safetensors.index.json (finding 9) --------------------------------

@pytest.fixture
def sharded_dir(tmp_path: Path) -> Path:
    return make_hf_checkpoint(tmp_path / "sharded", TinySpec(shards=2, seed=5))


def repoint(model_dir: Path, target: str) -> str:
    """Point the index's first entry at ``target``; returns the tensor's name."""
    index = model_dir / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    tensor = min(data["weight_map"])
    data["weight_map"][tensor] = target
    index.write_text(json.dumps(data))
    return tensor


@pytest.mark.parametrize("kind", ["absolute", "parent", "subfolder", "etc"])
def test_shard_names_outside_the_folder_are_refused(sharded_dir: Path, tmp_path: Path,
                                                    kind: str) -> None:
    """Before: /abs/path and ../other were read from there; /etc/passwd had its 'header'
    size reported. Each target here exists (a real shard copied elsewhere, or /etc/passwd)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = min(sharded_dir.glob("model-*.safetensors"))
    shutil.copy(shard, elsewhere / shard.name)
    (sharded_dir / "sub").mkdir()
    shutil.copy(shard, sharded_dir / "sub" / shard.name)
    target = {"absolute": str(elsewhere / shard.name),
              "parent": f"../elsewhere/{shard.name}",
              "subfolder": f"sub/{shard.name}",
              "etc": "/etc/passwd"}[kind]
    tensor = repoint(sharded_dir, target)
    index = sharded_dir / "model.safetensors.index.json"
    with raises(str(index), f"weight_map entry '{tensor}'", repr(target),
                "not a file name in the model folder"):
        Checkpoint.open(sharded_dir)


@pytest.mark.parametrize("value", [None, 3, ["a"], ".", ".."])
def test_shard_names_that_are_not_file_names_are_refused(sharded_dir: Path,
                                                         value: object) -> None:
    """Non-strings used to be AttributeError/TypeError tracebacks or 'missing shard' of the
    folder itself."""
    tensor = repoint(sharded_dir, value)  # type: ignore[arg-type]
    with raises("model.safetensors.index.json", f"weight_map entry '{tensor}'"):
        Checkpoint.open(sharded_dir)


def test_a_weight_map_that_is_not_an_object_is_refused(sharded_dir: Path) -> None:
    index = sharded_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}))
    with raises(str(index), "'weight_map' must be an object"):
        Checkpoint.open(sharded_dir)
