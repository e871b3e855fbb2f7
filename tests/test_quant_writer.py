"""The files ``offload-rt quantize`` writes (docs/quantized_format.md), checked against
independent readers: the plain ``safetensors`` library for every tensor, ``fmt.encode`` of the
source's matrices for every record, the HF-layout twin of a Mistral-native source for the
trunk's rotary order; and the writer's memory bound, measured in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checkpoint_factory import (
    TinySpec,
    make_hf_checkpoint,
    make_mistral_checkpoint,
    mixtral_tokenizer_path,
)
from safetensors import safe_open

from offload_rt.checkpoint import Checkpoint
from offload_rt.config import config_from_hf, config_from_mistral
from offload_rt.direct_io import ALIGN
from offload_rt.quant.formats import Int4Format, Int8Format
from offload_rt.quant.quantize import QuantizeSettings, quantize
from offload_rt.quant.shards import INDEX_FILE
from offload_rt.quant.writer import ShardFile, TensorEntry
from offload_rt.safetensors_file import read_header, read_tensor
from offload_rt.weight_file import WeightFile

MiB = 2**20
SPEC = TinySpec(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                num_layers=3, num_experts=4, shards=2)
SHARD_SIZE = 100_000  # a few layers per file at these shapes: several shards
EXTRA_FILES = {"tokenizer_config.json": '{"add_bos_token": true}\n', "README.md": "# card\n",
               "special_tokens_map.json": "{}\n"}
FORMATS = {"int8": lambda: Int8Format(64, 128, torch.bfloat16),
           "int4": lambda: Int4Format(64, 128, 32, torch.bfloat16)}
SETTINGS = {"int8": QuantizeSettings("int8", shard_size=SHARD_SIZE),
            "int4": QuantizeSettings("int4", group_size=32, shard_size=SHARD_SIZE)}


def add_tokenizer_files(model_dir: Path) -> Path:
    """The tokenizer and model card files a downloaded model folder has."""
    shutil.copyfile(mixtral_tokenizer_path(), model_dir / "tokenizer.model")
    for name, text in EXTRA_FILES.items():
        (model_dir / name).write_text(text)
    return model_dir


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same weights in both layouts (the HF one sharded, with a generation config)."""
    root = tmp_path_factory.mktemp("quant_src")
    return {"hf": add_tokenizer_files(make_hf_checkpoint(root / "hf", SPEC)),
            "mistral": add_tokenizer_files(make_mistral_checkpoint(root / "mistral", SPEC))}


@pytest.fixture(scope="module")
def written(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[tuple[str, str], Path]:
    """Quantized folders: (layout, format) -> OUT_DIR."""
    root = tmp_path_factory.mktemp("quant_out")
    out = {}
    for layout, src in sources.items():
        for name, settings in SETTINGS.items():
            out[layout, name] = root / f"{layout}-{name}"
            quantize(src, out[layout, name], settings)
    return out


CASES = [("hf", "int8"), ("hf", "int4"), ("mistral", "int8"), ("mistral", "int4")]


def all_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file, read by the safetensors library."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                assert name not in tensors
                tensors[name] = f.get_tensor(name)
    return tensors


# ---- the streaming writer -----------------------------------------------------------------------


def test_shard_file_is_read_by_both_parsers_with_the_data_section_aligned(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
               "b": torch.randint(0, 255, (ALIGN * 2,), dtype=torch.uint8, generator=gen),
               "c": torch.randn(7, generator=gen), "d": torch.randn(2, 2).to(torch.float16),
               "e": torch.randint(-128, 127, (4, 4), dtype=torch.int8, generator=gen)}
    entries = [TensorEntry(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    path = tmp_path / "x.safetensors"
    shard = ShardFile(path, entries, {"format": "pt"})
    for name in reversed(tensors):  # any order: each tensor goes to its offset
        shard.write(name, tensors[name])
    shard.close()
    assert path.stat().st_size == shard.nbytes
    header = read_header(WeightFile(path))
    assert min(info.offset for info in header.values()) % ALIGN == 0  # data section aligned
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
            assert torch.equal(read_tensor(header[name]), t)


def test_shard_file_refuses_a_wrong_tensor_and_a_missing_one(tmp_path: Path) -> None:
    shard = ShardFile(tmp_path / "x.safetensors", [TensorEntry("a", torch.float32, (2,)),
                                                   TensorEntry("b", torch.float32, (2,))])
    with pytest.raises(ValueError, match="tensor 'a': expected"):
        shard.write("a", torch.zeros(3))
    shard.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match=r"never written: \['b'\]"):
        shard.close()


# ---- the written folder -------------------------------------------------------------------------


def source_experts(src: Path, layout: str, layer: int, e: int) -> list[torch.Tensor]:
    """w1, w3, w2 of one expert, read by the safetensors library."""
    name = (f"model.layers.{layer}.block_sparse_moe.experts.{e}.{{}}.weight" if layout == "hf"
            else f"layers.{layer}.feed_forward.experts.{e}.{{}}.weight")
    tensors = all_tensors(src)
    return [tensors[name.format(w)] for w in ("w1", "w3", "w2")]


@pytest.mark.parametrize(("layout", "fmt"), CASES)
def test_records_are_the_formats_encoding_of_the_source(
        sources: dict[str, Path], written: dict[tuple[str, str], Path], layout: str,
        fmt: str) -> None:
    out = all_tensors(written[layout, fmt])
    encoder = FORMATS[fmt]()
    records = sorted(n for n in out if n.endswith(".record"))
    assert len(records) == SPEC.num_layers * SPEC.num_experts
    assert not [n for n in out if ".experts." in n and not n.endswith(".record")]
    for layer in range(SPEC.num_layers):
        for e in range(SPEC.num_experts):
            record = out[f"model.layers.{layer}.block_sparse_moe.experts.{e}.record"]
            expected = encoder.encode(*source_experts(sources[layout], layout, layer, e))
            assert record.dtype == torch.uint8 and record.shape == (encoder.nbytes,)
            assert torch.equal(record, expected), (layer, e)


@pytest.mark.parametrize(("layout", "fmt"), CASES)
def test_trunk_tensors_equal_the_hf_source(sources: dict[str, Path],
                                           written: dict[tuple[str, str], Path], layout: str,
                                           fmt: str) -> None:
    """HF names, HF rotary order, the source's dtype and bytes: the Mistral-native source's
    q/k rows come out as its HF twin (written by transformers) has them."""
    out = all_tensors(written[layout, fmt])
    hf = {n: t for n, t in all_tensors(sources["hf"]).items() if ".experts." not in n}
    assert {n for n in out if not n.endswith(".record")} == set(hf)
    for name, t in hf.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name


@pytest.mark.parametrize(("layout", "fmt"), CASES)
def test_config_json_has_the_quantization_config(
        sources: dict[str, Path], written: dict[tuple[str, str], Path], layout: str,
        fmt: str, tmp_path: Path) -> None:
    config = json.loads((written[layout, fmt] / "config.json").read_text())
    quant = config.pop("quantization_config")
    encoder = FORMATS[fmt]()
    assert quant == {"quant_method": "offload_rt", "format_version": 1,
                     "experts": encoder.spec(), "record_bytes": encoder.nbytes}
    assert quant["record_bytes"] % ALIGN == 0
    if layout == "hf":
        assert config == json.loads((sources["hf"] / "config.json").read_text())
    else:  # an HF config.json that reads back as the params.json did
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert config_from_hf(tmp_path / "config.json") == \
            config_from_mistral(sources["mistral"] / "params.json")


@pytest.mark.parametrize(("layout", "fmt"), CASES)
def test_shards_hold_whole_layers_records_first_each_4k_aligned(
        written: dict[tuple[str, str], Path], layout: str, fmt: str) -> None:
    folder = written[layout, fmt]
    index = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index.values())) == [f.name for f in files]
    for path in files:
        header = read_header(WeightFile(path))
        assert {n for n, f in index.items() if f == path.name} == set(header)
        by_offset = sorted(header.values(), key=lambda info: info.offset)
        kinds = [info.name.endswith(".record") for info in by_offset]
        assert kinds == sorted(kinds, reverse=True)  # records, then trunk tensors
        for info in by_offset:
            if info.name.endswith(".record"):
                assert info.offset % ALIGN == 0, info.name
        layers = {n.split(".")[2] for n in header if n.startswith("model.layers.")}
        for layer in layers:  # a layer's tensors all live in this file
            assert all(f == path.name for n, f in index.items()
                       if n.startswith(f"model.layers.{layer}."))


@pytest.mark.parametrize(("layout", "fmt"), CASES)
def test_tokenizer_generation_config_and_card_come_along(
        sources: dict[str, Path], written: dict[tuple[str, str], Path], layout: str,
        fmt: str) -> None:
    src, out = sources[layout], written[layout, fmt]
    copied = ["tokenizer.model", *EXTRA_FILES] + (["generation_config.json"] if layout == "hf"
                                                   else [])
    for name in copied:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not (out / "params.json").exists()  # the output is an HF folder


def test_progress_counts_every_expert_and_the_summary_adds_up(
        sources: dict[str, Path], tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    summary = quantize(sources["hf"], tmp_path / "out", SETTINGS["int8"],
                       progress=lambda done, total: calls.append((done, total)))
    n = SPEC.num_layers * SPEC.num_experts
    assert calls == [(k, n) for k in range(1, n + 1)]
    assert summary.experts == n
    shards = (tmp_path / "out").glob("*.safetensors")
    assert summary.bytes_out == sum(p.stat().st_size for p in shards)
    src_bytes = sum(p.stat().st_size for p in sources["hf"].glob("*.safetensors"))
    assert 0.9 * src_bytes < summary.bytes_in <= src_bytes  # tensor bytes, without headers


# ---- bounded memory -----------------------------------------------------------------------------

BIG = TinySpec(num_layers=8, hidden_size=256, intermediate_size=512, num_heads=4,
               num_kv_heads=1, num_experts=8, seed=5)
BOUND = 24 * MiB  # two layers' experts; the checkpoint's experts are four times that
RSS_SCRIPT = '''
import json, sys
import torch
from offload_rt.process_memory import peak_rss_bytes, rss_bytes
from offload_rt.quant.formats import Int8Format
from offload_rt.quant.quantize import QuantizeSettings, quantize

torch.set_num_threads(1)
w = torch.randn(128, 64)
Int8Format(64, 128, torch.bfloat16).encode(w, w, w.T.contiguous())  # kernels warmed up
before = rss_bytes()
quantize(sys.argv[1], sys.argv[2], QuantizeSettings("int8", shard_size=2**40))
print(json.dumps({"before": before, "peak": peak_rss_bytes()}))
'''


def test_peak_memory_grows_by_less_than_a_fraction_of_the_experts(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    src = make_hf_checkpoint(tmp_path_factory.mktemp("big_src"), BIG)
    ckpt = Checkpoint.open(src)
    experts = sum(ckpt.expert(layer, e).nbytes for layer in range(BIG.num_layers)
                  for e in range(BIG.num_experts))
    ckpt.close()
    assert experts >= 4 * BOUND  # holding every expert (or their records) would break it
    out = tmp_path_factory.mktemp("big_out") / "q"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(RSS_SCRIPT), str(src),
                           str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = r["peak"] - r["before"]
    print(f"experts {experts / MiB:.0f} MiB, peak RSS growth {growth / MiB:.1f} MiB")
    assert growth < BOUND, f"peak RSS grew {growth / MiB:.1f} MiB (bound {BOUND / MiB:.0f})"
    assert len(all_tensors(out)) == BIG.num_layers * (BIG.num_experts + 7) + 3
