"""``offload-rt quantize --trunk int8``: a folder whose attention projections and LM head are
stored as int8 + one scale per output channel, exactly as ``--trunk int8`` makes them at load.

The folder runs as the float folder with ``--trunk int8`` (and the same expert format) at load,
logits bit for bit, resident and offloaded; its config.json records the trunk; its tensors are
plain safetensors; it runs as int8 only (``--trunk float`` refused), with errors naming a
missing or corrupt scale tensor.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_factory import (
    TinySpec,
    drop_tensor,
    find_tensor_file,
    make_hf_checkpoint,
    make_mistral_checkpoint,
    read_safetensors,
)
from safetensors import safe_open
from safetensors.torch import save_file
from test_engine_exactness import run_sequence

import offload_rt
from offload_rt.cli import main
from offload_rt.errors import CheckpointError, OptionError
from offload_rt.model import build
from offload_rt.model.int8_linear import Int8Linear, quantize_rows
from offload_rt.quant.quantize import QuantizeSettings, quantize

SPEC = TinySpec(num_experts=4, top_k=2, num_layers=2, hidden_size=64, intermediate_size=128,
                num_heads=4, num_kv_heads=2, vocab_size=256, seed=41)
PROMPT_LEN = 30  # the prefill dequantizes (>= 24 rows), decode steps take the int8 kernel
FEED = [5, 9, 3, 7, 11]
EXPERTS = {"int8": {"experts": "int8"}, "int4": {"experts": "int4", "group_size": 32}}
WQ = "model.layers.0.self_attn.q_proj.weight"
WQ_SCALE = "model.layers.0.self_attn.q_proj.weight_scale"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("float"), SPEC)


@pytest.fixture(scope="module")
def folders(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """expert format -> the folder quantize writes with --trunk int8."""
    root = tmp_path_factory.mktemp("int8trunk")
    return {name: _quantize(source, root / name, trunk="int8", **options)
            for name, options in EXPERTS.items()}


def _quantize(source: Path, out: Path, **settings: Any) -> Path:
    quantize(source, out, QuantizeSettings(**settings))
    return out


def _prompt() -> list[int]:
    return torch.randint(0, SPEC.vocab_size, (PROMPT_LEN,),
                         generator=torch.Generator().manual_seed(SPEC.seed)).tolist()


def _logits(model_dir: Path, **options: Any) -> list[torch.Tensor]:
    with offload_rt.load(model_dir, max_seq_len=64, **options) as rt:
        assert isinstance(rt.model.layers[1].attn.wo, Int8Linear)
        assert isinstance(rt.model.lm_head, Int8Linear)
        assert rt.offloaded == ("cache_experts" in options)
        return run_sequence(rt, _prompt(), FEED)


@pytest.mark.parametrize("experts", list(EXPERTS))
@pytest.mark.parametrize("offloaded", [False, True], ids=["resident", "offloaded"])
def test_folder_gives_the_logits_of_int8_trunk_at_load(source: Path, folders: dict[str, Path],
                                                       experts: str, offloaded: bool) -> None:
    """The folder (its own experts and trunk) against the float folder with the same expert
    format and --trunk int8 quantized at load (bfloat16 compute: the scale dtype): the same
    bits, resident and offloaded."""
    cache = {"cache_experts": SPEC.top_k, "prefetch": 1} if offloaded else {"offload": False}
    want = _logits(source, trunk="int8", dtype="bfloat16", **EXPERTS[experts], **cache)
    got = _logits(folders[experts], dtype="bfloat16", **cache)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"call {i}: max |diff| {(g - w).abs().max().item():.3g}"


def test_float32_run_of_the_folder_offloads_exactly(folders: dict[str, Path]) -> None:
    """float32 compute keeps the folder's bfloat16 scales (as --trunk int8 at load does)."""
    resident = _logits(folders["int8"], dtype="float32", offload=False)
    offloaded = _logits(folders["int8"], dtype="float32", cache_experts=SPEC.top_k)
    assert all(torch.equal(x, y) for x, y in zip(resident, offloaded, strict=True))


def test_mistral_source_gives_the_load_time_bytes(tmp_path: Path) -> None:
    """Mistral-native wq/wk are permuted into HF order before quantizing, as at load."""
    spec = TinySpec(num_layers=1, hidden_size=64, intermediate_size=128, seed=43,
                    dtype=torch.bfloat16)
    src = make_mistral_checkpoint(tmp_path / "mistral", spec)
    out = _quantize(src, tmp_path / "q", experts="int8", trunk="int8")
    with offload_rt.load(src, trunk="int8", experts="int8", offload=False) as rt:
        want = (rt.model.layers[0].attn.wq.weight.clone(), rt.model.layers[0].attn.wq.scale.clone())
    with safe_open(str(find_tensor_file(out, WQ)), "pt") as f:
        assert torch.equal(f.get_tensor(WQ), want[0])
        assert torch.equal(f.get_tensor(WQ_SCALE), want[1])


def test_config_and_tensors_are_plain_safetensors(source: Path, folders: dict[str, Path]
                                                  ) -> None:
    config = json.loads((folders["int8"] / "config.json").read_text())
    assert config["quantization_config"]["trunk"] == {"format": "int8",
                                                      "scale_dtype": "bfloat16"}
    assert config["quantization_config"]["experts"]["format"] == "int8"
    _, tensors = read_safetensors(source / "model.safetensors")
    for name in (WQ, "model.layers.1.self_attn.o_proj.weight", "lm_head.weight"):
        with safe_open(str(find_tensor_file(folders["int8"], name)), "pt") as f:
            q, scale = f.get_tensor(name), f.get_tensor(name.removesuffix("weight") +
                                                          "weight_scale")
        want_q, want_scale = quantize_rows(tensors[name].to(torch.bfloat16), torch.bfloat16)
        assert q.dtype == torch.int8 and torch.equal(q, want_q)
        assert scale.dtype == torch.bfloat16 and torch.equal(scale, want_scale)
    with safe_open(str(find_tensor_file(folders["int8"], "model.embed_tokens.weight")),
                   "pt") as f:  # the rest as stored
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"),
                           tensors["model.embed_tokens.weight"])


def test_load_reads_int8_and_says_so(source: Path, folders: dict[str, Path],
                                     caplog: pytest.LogCaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No float copy, no re-quantization (quantize_rows is never called), the budget and the
    start-up line count an int8 trunk, and the options say which trunk ran."""
    calls = []
    monkeypatch.setattr(build, "quantize_rows", lambda *a: calls.append(a))
    with caplog.at_level("INFO", logger="offload_rt"), \
            offload_rt.load(folders["int8"], dtype="bfloat16", offload=False) as rt:
        assert rt.options.trunk == "int8"
        assert rt.plan.footprint.trunk_text.endswith("attention and LM head in int8")
        folder_trunk = rt.plan.footprint.trunk
    monkeypatch.undo()
    assert not calls
    assert "attention and LM head in int8), KV cache" in caplog.text
    with offload_rt.load(source, trunk="int8", dtype="bfloat16", offload=False) as rt:
        assert rt.plan.footprint.trunk == folder_trunk


def test_a_float_trunk_request_is_refused(folders: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(OptionError, match=r"--trunk float: .*config.json holds an int8 trunk"):
        offload_rt.load(folders["int8"], trunk="float")
    with pytest.raises(OptionError, match=r"--device cuda: .*runs on --device cpu only"):
        offload_rt.load(folders["int8"], device="cuda")
    with offload_rt.load(folders["int8"], trunk="int8", offload=False) as rt:  # its own: fine
        assert rt.options.trunk == "int8"
    assert main(["generate", str(folders["int8"]), "--prompt-ids", "1,2", "--trunk",
                 "float"]) == 2
    assert "offload-rt: error: --trunk float: " in capsys.readouterr().err


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _rewrite(folder: Path, name: str, tensor: torch.Tensor) -> None:
    path = find_tensor_file(folder, name)
    metadata, tensors = read_safetensors(path)
    tensors[name] = tensor
    save_file(tensors, path, metadata)


def test_missing_scale_is_named(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(folders["int8"], tmp_path)
    drop_tensor(folder, WQ_SCALE)
    with pytest.raises(CheckpointError, match=f"'{WQ}' is int8 but its scale '{WQ_SCALE}' is "
                                              "missing"):
        offload_rt.load(folder)


@pytest.mark.parametrize(("bad", "expected"), [
    (torch.full((64,), float("nan"), dtype=torch.bfloat16), "holds a scale of nan"),
    (torch.zeros(64, dtype=torch.bfloat16), "holds a scale of 0.0"),
    (torch.ones(32, dtype=torch.bfloat16), r"is torch.bfloat16 \[32\]; the int8 trunk's scale"),
    (torch.ones(64, dtype=torch.float32), r"is torch.float32 \[64\]; the int8 trunk's scale"),
])
def test_corrupt_scale_is_named(folders: dict[str, Path], tmp_path: Path, bad: torch.Tensor,
                                expected: str) -> None:
    folder = _copy(folders["int8"], tmp_path)
    _rewrite(folder, WQ_SCALE, bad)
    with pytest.raises(CheckpointError, match=f"'{WQ_SCALE}' {expected}"):
        offload_rt.load(folder, offload=False)


def test_float_weight_and_bad_config_are_named(folders: dict[str, Path], source: Path,
                                               tmp_path: Path) -> None:
    folder = _copy(folders["int8"], tmp_path)
    _rewrite(folder, WQ, torch.zeros(64, 64))
    with pytest.raises(CheckpointError, match=f"'{WQ}' has dtype torch.float32; .*declares an "
                                              "int8 trunk"):
        offload_rt.load(folder)
    config = json.loads((folder / "config.json").read_text())
    for trunk, field in (({"format": "int4"}, "format 'int4'"),
                         ({"format": "int8", "scale_dtype": "float32"}, "scale_dtype 'float32'")):
        config["quantization_config"]["trunk"] = trunk
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=f"quantization_config.trunk.{field}"):
            offload_rt.load(folder)
    for value in ("int8", []):  # before: "format 'int8' is not supported (only 'int8'...)"
        config["quantization_config"]["trunk"] = value
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=r"quantization_config.trunk must be an "
                                                  rf"object such as .*, got {re.escape(repr(value))}"):
            offload_rt.load(folder)


def test_a_tied_lm_head_stays_float(tmp_path: Path) -> None:
    spec = TinySpec(seed=3, hidden_size=64, intermediate_size=128, vocab_size=256)
    tied = make_hf_checkpoint(tmp_path / "tied", spec)
    drop_tensor(tied, "lm_head.weight")
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    out = _quantize(tied, tmp_path / "q", experts="int8", trunk="int8")
    _, tensors = read_safetensors(find_tensor_file(out, WQ))
    assert "lm_head.weight" not in tensors and tensors[WQ].dtype == torch.int8
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    prompt = [1, 2, 3, 4]
    with offload_rt.load(out, dtype="bfloat16", offload=False) as rt:
        assert not isinstance(rt.model.lm_head, Int8Linear)
        assert rt.plan.footprint.trunk_text.endswith(", attention in int8")
        got = rt.model(torch.tensor(prompt), 0)
    with offload_rt.load(tied, trunk="int8", experts="int8", dtype="bfloat16",
                         offload=False) as rt:
        assert torch.equal(got, rt.model(torch.tensor(prompt), 0))


def test_quantize_settings_and_summary(source: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(OptionError, match="--trunk 'int4': choose one of"):
        quantize(source, tmp_path / "q", QuantizeSettings("int8", trunk="int4"))
    assert main(["quantize", str(source), str(tmp_path / "q"), "--experts", "int8",
                 "--trunk", "int8", "--scale-dtype", "float16"]) == 0
    assert "experts quantized to int8; attention and LM head in int8;" in capsys.readouterr().out
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["trunk"]["scale_dtype"] == "float16"
    with offload_rt.load(tmp_path / "q", dtype="float16", offload=False) as rt:
        assert rt.model.lm_head.scale.dtype == torch.float16
