"""Every bad model folder is refused up front with a CheckpointError naming what is wrong.

One test per case: the exception type and that the message names the offending file, tensor or
field. Also: bad options, a too-long request, no unpickling anywhere, and expert reads that touch
only that expert's bytes.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from checkpoint_factory import (
    HF_INDEX,
    TinySpec,
    corrupt_header,
    drop_tensor,
    make_hf_checkpoint,
    read_safetensors,
    remove_shard,
    reshape_tensor,
    truncate_file,
)
from safetensors.torch import load_file, save_file

import offload_rt
from offload_rt.checkpoint import Checkpoint
from offload_rt.errors import CheckpointError, ContextLengthError, OptionError

SHARD_2 = "model-00002-of-00003.safetensors"


def raises(*parts: str) -> pytest.RaisesContext[CheckpointError]:
    """pytest.raises(CheckpointError) whose message contains every part, in this order."""
    return pytest.raises(CheckpointError, match=".*".join(re.escape(p) for p in parts))


def copy_of(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default spec in three shards plus model.safetensors.index.json. Copy before corrupting."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("sharded"), TinySpec(shards=3))


@pytest.fixture
def hf_dir(tiny_hf_checkpoint: Path, tmp_path: Path) -> Path:
    return copy_of(tiny_hf_checkpoint, tmp_path)


@pytest.fixture
def sharded_dir(sharded_checkpoint: Path, tmp_path: Path) -> Path:
    return copy_of(sharded_checkpoint, tmp_path)


@pytest.fixture
def mistral_dir(tiny_mistral_checkpoint: Path, tmp_path: Path) -> Path:
    return copy_of(tiny_mistral_checkpoint, tmp_path)


def edit_json(path: Path, edit: object) -> None:
    data = json.loads(path.read_text())
    edit(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))


def replace_tensor(model_dir: Path, file: str, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` under ``name`` in ``file`` (added when absent)."""
    metadata, tensors = read_safetensors(model_dir / file)
    tensors[name] = tensor
    save_file(tensors, model_dir / file, metadata)


def test_the_unbroken_copies_open(hf_dir: Path, sharded_dir: Path, mistral_dir: Path) -> None:
    """The cases below break one thing each; the copies themselves are fine."""
    for model_dir in (hf_dir, sharded_dir, mistral_dir):
        assert Checkpoint.open(model_dir).config.hidden_size == 32


# --- the folder ----------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with raises(str(missing), "does not exist"):
        offload_rt.load(missing)


def test_path_is_a_file(hf_dir: Path) -> None:
    with raises(str(hf_dir / "config.json"), "not a folder"):
        Checkpoint.open(hf_dir / "config.json")


def test_folder_without_config_or_params(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with raises(str(tmp_path), "config.json", "params.json"):
        Checkpoint.open(tmp_path)


def test_config_without_safetensors(hf_dir: Path) -> None:
    (hf_dir / "model.safetensors").unlink()
    with raises(str(hf_dir), "no safetensors weight files"):
        Checkpoint.open(hf_dir)


def test_only_pickled_hf_weights_are_refused(hf_dir: Path) -> None:
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with raises(str(hf_dir), "pytorch_model.bin", "pickled weights are never loaded"):
        Checkpoint.open(hf_dir)


def test_only_pickled_mistral_weights_are_refused(mistral_dir: Path) -> None:
    """Mixtral's first release shipped consolidated.00.pth."""
    (mistral_dir / "consolidated.safetensors").rename(mistral_dir / "consolidated.00.pth")
    with raises(str(mistral_dir), "consolidated.00.pth", "pickled weights are never loaded"):
        Checkpoint.open(mistral_dir)


# --- shards and index ----------------------------------------------------------------------------


def test_shard_listed_in_index_is_absent(sharded_dir: Path) -> None:
    remove_shard(sharded_dir, SHARD_2)
    with raises(str(sharded_dir / SHARD_2), HF_INDEX, "missing"):
        Checkpoint.open(sharded_dir)


def test_index_json_corrupted(sharded_dir: Path) -> None:
    index = sharded_dir / HF_INDEX
    index.write_text(index.read_text()[:40])
    with raises(str(index), "unreadable shard index"):
        Checkpoint.open(sharded_dir)


def test_index_without_weight_map(sharded_dir: Path) -> None:
    edit_json(sharded_dir / HF_INDEX, lambda d: d.pop("weight_map"))
    with raises(str(sharded_dir / HF_INDEX), "weight_map"):
        Checkpoint.open(sharded_dir)


def test_index_promises_a_tensor_its_shard_lacks(sharded_dir: Path) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"
    drop_tensor(sharded_dir, name, keep_index_entry=True)
    with raises(name, "missing"):
        Checkpoint.open(sharded_dir)


# --- safetensors files ---------------------------------------------------------------------------


def header_length(path: Path) -> int:
    with path.open("rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def test_truncated_in_the_data_section(hf_dir: Path) -> None:
    path = hf_dir / "model.safetensors"
    truncate_file(path, path.stat().st_size - 100)
    with raises(str(path), "truncated file", "tensor '"):
        Checkpoint.open(hf_dir)


def test_truncated_inside_the_header(hf_dir: Path) -> None:
    path = hf_dir / "model.safetensors"
    truncate_file(path, 8 + header_length(path) // 2)
    with raises(str(path), "truncated header"):
        Checkpoint.open(hf_dir)


def test_file_of_three_bytes(sharded_dir: Path) -> None:
    path = sharded_dir / SHARD_2
    truncate_file(path, 3)
    with raises(str(path), "truncated file: 3 bytes"):
        Checkpoint.open(sharded_dir)


def test_corrupted_header_json(hf_dir: Path) -> None:
    path = hf_dir / "model.safetensors"
    corrupt_header(path)
    with raises(str(path), "corrupted header", "not valid JSON"):
        Checkpoint.open(hf_dir)


# --- tensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.layers.1.self_attn.k_proj.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.block_sparse_moe.gate.weight",
    "model.layers.1.block_sparse_moe.experts.3.w2.weight",
])
def test_tensor_missing(hf_dir: Path, name: str) -> None:
    drop_tensor(hf_dir, name)
    with raises(str(hf_dir), f"'{name}'", "missing"):
        Checkpoint.open(hf_dir)


def test_tensor_missing_in_the_mistral_layout(mistral_dir: Path) -> None:
    name = "layers.0.feed_forward.experts.1.w3.weight"
    drop_tensor(mistral_dir, name)
    with raises(str(mistral_dir), f"'{name}'", "missing"):
        Checkpoint.open(mistral_dir)


def test_tensor_with_a_wrong_shape(hf_dir: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    reshape_tensor(hf_dir, name, (16, 32))
    with raises(str(hf_dir / "model.safetensors"), f"'{name}'", "[16, 32]", "[32, 32]"):
        Checkpoint.open(hf_dir)


def test_int_dtype_tensor(hf_dir: Path) -> None:
    name = "model.norm.weight"
    replace_tensor(hf_dir, "model.safetensors", name, torch.ones(32, dtype=torch.int32))
    with raises(str(hf_dir / "model.safetensors"), f"'{name}'", "torch.int32"):
        Checkpoint.open(hf_dir)


def test_unexpected_extra_tensor(sharded_dir: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.bias"
    replace_tensor(sharded_dir, SHARD_2, name, torch.zeros(32))
    with raises(str(sharded_dir), "unexpected tensors", name):
        Checkpoint.open(sharded_dir)


def test_config_shape_disagrees_with_the_files(hf_dir: Path) -> None:
    edit_json(hf_dir / "config.json", lambda c: c.update(intermediate_size=64))
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    with raises(str(hf_dir / "model.safetensors"), f"'{name}'", "[48, 32]", "[64, 32]"):
        Checkpoint.open(hf_dir)


# --- config.json and params.json -----------------------------------------------------------------


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_local_experts",
                                   "num_experts_per_tok", "vocab_size"])
def test_config_field_missing(hf_dir: Path, field: str) -> None:
    edit_json(hf_dir / "config.json", lambda c: c.pop(field))
    with raises(str(hf_dir / "config.json"), f"'{field}'"):
        Checkpoint.open(hf_dir)


def test_config_field_of_the_wrong_type(hf_dir: Path) -> None:
    edit_json(hf_dir / "config.json", lambda c: c.update(hidden_size="32"))
    with raises(str(hf_dir / "config.json"), "'hidden_size' must be a positive integer"):
        Checkpoint.open(hf_dir)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("num_key_value_heads", 3, "num_kv_heads"),
    ("num_experts_per_tok", 5, "top_k"),
    ("head_dim", 7, "head_dim"),
    ("num_hidden_layers", 0, "'num_hidden_layers' must be a positive integer"),
    ("num_attention_heads", 0, "'num_attention_heads' must be a positive integer"),  # was a
    # ZeroDivisionError deriving head_dim
])
def test_inconsistent_config_values_name_the_file(hf_dir: Path, field: str, value: int,
                                                  words: str) -> None:
    edit_json(hf_dir / "config.json", lambda c: c.update({field: value}))
    with raises(str(hf_dir / "config.json"), words):
        Checkpoint.open(hf_dir)


def test_config_json_not_json(hf_dir: Path) -> None:
    (hf_dir / "config.json").write_text("{'model_type': 'mixtral'}")
    with raises(str(hf_dir / "config.json"), "not valid JSON"):
        Checkpoint.open(hf_dir)


def test_unsupported_architecture(hf_dir: Path) -> None:
    edit_json(hf_dir / "config.json",
              lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]))
    with raises(str(hf_dir / "config.json"), "unsupported architecture", "llama"):
        Checkpoint.open(hf_dir)


def test_unsupported_rope_type(hf_dir: Path) -> None:
    edit_json(hf_dir / "config.json", lambda c: c.update(
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}))
    with raises(str(hf_dir / "config.json"), "unsupported rope_type 'yarn'"):
        Checkpoint.open(hf_dir)


def test_unsupported_legacy_rope_scaling(hf_dir: Path) -> None:
    """transformers 4.x: top-level rope_theta, scaling in rope_scaling with key 'type'."""
    def legacy(c: dict[str, object]) -> None:
        c.pop("rope_parameters")
        c.update(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})

    edit_json(hf_dir / "config.json", legacy)
    with raises(str(hf_dir / "config.json"), "unsupported rope_type 'linear'"):
        Checkpoint.open(hf_dir)


def test_params_json_without_moe(mistral_dir: Path) -> None:
    edit_json(mistral_dir / "params.json", lambda p: p.pop("moe"))
    with raises(str(mistral_dir / "params.json"), "'moe'"):
        Checkpoint.open(mistral_dir)


def test_params_json_field_missing(mistral_dir: Path) -> None:
    edit_json(mistral_dir / "params.json", lambda p: p.pop("dim"))
    with raises(str(mistral_dir / "params.json"), "'dim'"):
        Checkpoint.open(mistral_dir)


# --- options and requests ------------------------------------------------------------------------


def test_unknown_dtype_option(tiny_hf_checkpoint: Path) -> None:
    with pytest.raises(OptionError, match=re.escape("--dtype float8 (dtype='float8')")):
        offload_rt.load(tiny_hf_checkpoint, dtype="float8")


def test_unknown_option(tiny_hf_checkpoint: Path) -> None:
    with pytest.raises(OptionError, match="bogus"):
        offload_rt.load(tiny_hf_checkpoint, bogus=1)


def test_request_beyond_max_seq_len(tiny_hf_checkpoint: Path) -> None:
    rt = offload_rt.load(tiny_hf_checkpoint, max_seq_len=16)
    with pytest.raises(ContextLengthError, match=r"10 tokens.*max_new_tokens 7.*max_seq_len\) of 16"):
        rt.generate([5] * 10, max_new_tokens=7, ignore_eos=True)
    assert len(rt.generate([5] * 10, max_new_tokens=6, ignore_eos=True).token_ids) == 6


# --- no unpickling; reads by byte range ----------------------------------------------------------


def test_loading_never_unpickles(hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A poisoned pytorch_model.bin beside the safetensors is ignored; torch.load is never used."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model file was unpickled")

    for module, attr in [(torch, "load"), (torch.serialization, "load"),
                         (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(module, attr, refuse)
    (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    out = offload_rt.load(hf_dir).generate([1, 2, 3], max_new_tokens=2, ignore_eos=True)
    assert len(out.token_ids) == 2


def poison_all_but(path: Path, keep: set[str]) -> int:
    """Overwrite the data bytes of every tensor of ``path`` not in ``keep`` with 0xFF (a NaN in
    every float dtype), parsing the header independently of offload_rt. Returns tensors hit."""
    hlen = header_length(path)
    with path.open("r+b") as f:
        f.seek(8)
        header = json.loads(f.read(hlen))
        header.pop("__metadata__", None)
        hit = 0
        for name, entry in header.items():
            if name not in keep:
                begin, end = entry["data_offsets"]
                f.seek(8 + hlen + begin)
                f.write(b"\xff" * (end - begin))
                hit += 1
    return hit


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("drop_page_cache", [False, True])
def test_reading_one_expert_touches_only_its_bytes(
    sharded_dir: Path, out_dtype: torch.dtype, drop_page_cache: bool
) -> None:
    """float32 out: bytes go straight into the buffer; bfloat16: read then converted."""
    layer, expert = 1, 2
    names = [f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
             for w in ("w1", "w3", "w2")]  # the packing order
    original: dict[str, torch.Tensor] = {}
    for path in sorted(sharded_dir.glob("*.safetensors")):
        original.update(load_file(path))
    hit = sum(poison_all_but(p, set(names)) for p in sharded_dir.glob("*.safetensors"))
    assert hit == len(original) - 3

    ckpt = Checkpoint.open(sharded_dir)  # validation reads headers only
    out = torch.empty(ckpt.config.expert_numel, dtype=out_dtype)
    ckpt.read_expert_into(layer, expert, out, drop_page_cache=drop_page_cache)
    expected = torch.cat([original[n].flatten() for n in names]).to(out_dtype)
    assert torch.equal(out, expected)

    ckpt.read_expert_into(layer, expert - 1, out)  # a neighbour's bytes really are poisoned
    assert out.isnan().all()
