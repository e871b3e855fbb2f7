"""fp8 checkpoints (quant_method compressed-tensors float-quantized, or transformers' fp8) run
as the model of their dequantized weights.

Each fp8 folder here is written the way its writer stores one (``make_fp8_checkpoint``: a tiny
random Mixtral from ``checkpoint_factory`` whose linear weights are quantized to
float8_e4m3fn, with per-tensor, per-channel or per-block scales beside them and a config.json
``quantization_config`` as llm-compressor, transformers or AutoFP8 write it), independently of
``offload_rt.quant``. Its reference is the same model with each quantized weight replaced by
``weight.float() * scale`` (a float32 folder): run by transformers (the oracle) and by our float
path, it must give our fp8 run's tokens and logits (to 1e-5, float32 compute). transformers
also reads the fp8 folder itself (its ``fp8`` quantizer dequantizes on a CPU).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_factory import (
    TinySpec,
    make_hf_checkpoint,
    read_safetensors,
    reference_greedy,
    reference_logits,
)
from safetensors.torch import save_file

import offload_rt
from offload_rt.engine.offloaded import OffloadedExperts

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SPEC = TinySpec(num_experts=4, top_k=2, num_layers=2, hidden_size=64, intermediate_size=128,
                num_heads=4, num_kv_heads=2, seed=71)
PROMPT_LEN, NEW_TOKENS = 16, 16
FP32_ATOL = 1e-5
EXPERT = "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"


@dataclass(frozen=True)
class Fp8Variant:
    """How a writer stores an fp8 checkpoint: ``method`` (quant_method), ``strategy`` (tensor,
    channel, block), ``block`` [rows, cols], the scales' dtype and tensor name, whether the
    attention projections and the experts are quantized (routers and LM head never are, as in
    practice)."""

    method: str = "compressed-tensors"
    strategy: str = "channel"
    block: tuple[int, int] | None = None
    scale_dtype: torch.dtype = torch.bfloat16
    scale_name: str = "weight_scale"
    attention: bool = True
    experts: bool = True


VARIANTS = {
    "ct-channel": Fp8Variant(),
    "ct-tensor": Fp8Variant(strategy="tensor"),
    "ct-block-partial": Fp8Variant(strategy="block", block=(32, 48), scale_dtype=torch.float32),
    "ct-experts-only": Fp8Variant(attention=False, scale_dtype=torch.float16),
    "ct-trunk-only": Fp8Variant(experts=False),  # float experts, fp8 attention
    "hf-block": Fp8Variant(method="fp8", strategy="block", block=(32, 32),
                           scale_dtype=torch.float32, scale_name="weight_scale_inv"),
    "autofp8-tensor": Fp8Variant(method="fp8", strategy="tensor", scale_dtype=torch.float32),
}


def _scale_shape(v: Fp8Variant, rows: int, cols: int) -> tuple[int, ...]:
    if v.strategy == "tensor":
        return () if v.method == "fp8" else (1,)  # AutoFP8 / transformers: a 0-d scalar
    if v.strategy == "channel":
        return rows, 1
    assert v.block is not None
    return math.ceil(rows / v.block[0]), math.ceil(cols / v.block[1])


def expand(scale: torch.Tensor, v: Fp8Variant, rows: int, cols: int) -> torch.Tensor:
    """``scale`` as float32 [rows, cols]: each entry repeated over the weights it scales."""
    s = scale.float()
    if v.strategy == "tensor":
        return s.reshape(1, 1).expand(rows, cols)
    if v.strategy == "channel":
        return s.reshape(rows, 1).expand(rows, cols)
    assert v.block is not None
    return s.repeat_interleave(v.block[0], 0).repeat_interleave(v.block[1], 1)[:rows, :cols]


def _amax(w: torch.Tensor, v: Fp8Variant) -> torch.Tensor:
    """max |w| over the weights of each scale: [1, 1], [N, 1] or the block grid."""
    if v.strategy == "tensor":
        return w.abs().max().reshape(1, 1)
    if v.strategy == "channel":
        return w.abs().amax(dim=1, keepdim=True)
    assert v.block is not None
    (bn, bk), (rows, cols) = v.block, w.shape
    grid = math.ceil(rows / bn), math.ceil(cols / bk)
    padded = torch.zeros(grid[0] * bn, grid[1] * bk)
    padded[:rows, :cols] = w.abs()
    return padded.view(grid[0], bn, grid[1], bk).amax(dim=(1, 3))


def quantize(w: torch.Tensor, v: Fp8Variant) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], scale): absmax / 448 over each scale's weights
    (compressed-tensors' and AutoFP8's symmetric fp8), rounded to the scale dtype first."""
    rows, cols = w.shape
    amax = _amax(w.float(), v).clamp(min=1e-12)
    scale = (amax / FP8_MAX).to(v.scale_dtype).reshape(_scale_shape(v, rows, cols))
    q = (w.float() / expand(scale, v, rows, cols)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale


def _quantized_names(spec: TinySpec, v: Fp8Variant) -> list[str]:
    names = [EXPERT.format(i=i, e=e, w=w) for i in range(spec.num_layers)
             for e in range(spec.num_experts) for w in ("w1", "w2", "w3")] if v.experts else []
    if v.attention:
        names += [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(spec.num_layers)
                  for p in "qkvo"]
    return names


def quantization_config(v: Fp8Variant) -> dict[str, Any]:
    """config.json's quantization_config as each writer saves it."""
    ignore = ["lm_head", "re:.*block_sparse_moe.gate$"] + ([] if v.attention else ["re:.*attn"])
    ignore += [] if v.experts else ["re:.*experts.*"]
    if v.method == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic",
                **({"weight_block_size": list(v.block)} if v.block else {}),
                "modules_to_not_convert": ignore}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": v.strategy,
               "dynamic": False, "group_size": None, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}, "block_structure": list(v.block) if v.block else None}
    activations = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                   "dynamic": True, "group_size": None, "observer": None, "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "ignore": ignore,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": activations,
                                          "output_activations": None}}}


def make_fp8_checkpoint(out_dir: Path, spec: TinySpec, v: Fp8Variant,
                        reference_dir: Path | None = None) -> Path:
    """``spec``'s model (``make_hf_checkpoint``) with its linear weights quantized as ``v``
    says, written with ``safetensors.torch.save_file``. ``reference_dir``: also write the
    dequantized model there (float32 weights ``q.float() * scale``, no quantization_config)."""
    out_dir = make_hf_checkpoint(out_dir, spec)
    path = out_dir / "model.safetensors"
    metadata, tensors = read_safetensors(path)
    dequantized = dict(tensors)
    for name in _quantized_names(spec, v):
        q, scale = quantize(tensors[name], v)
        tensors[name] = q
        tensors[name.removesuffix("weight") + v.scale_name] = scale
        dequantized[name] = q.float() * expand(scale, v, *q.shape)
    save_file(tensors, path, metadata)
    config = json.loads((out_dir / "config.json").read_text())
    if reference_dir is not None:
        reference_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: t.float().contiguous() for k, t in dequantized.items()},
                  reference_dir / "model.safetensors", metadata)
        (reference_dir / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    config["quantization_config"] = quantization_config(v)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """variant -> (fp8 folder, its dequantized float32 reference), built once."""
    made = {}
    for name, v in VARIANTS.items():
        base = tmp_path_factory.mktemp(name)
        made[name] = (make_fp8_checkpoint(base / "fp8", SPEC, v, base / "reference"),
                      base / "reference")
    return made


def _prompt(seed: int = 5) -> list[int]:
    return torch.randint(0, SPEC.vocab_size, (PROMPT_LEN,),
                         generator=torch.Generator().manual_seed(seed)).tolist()


def _ours(model_dir: Path, prompt: list[int], **options: Any) -> tuple[torch.Tensor, list[int]]:
    with offload_rt.load(model_dir, dtype="float32", max_seq_len=64, **options) as rt:
        logits = rt.model(torch.tensor(prompt), 0, last_only=False)
        tokens = rt.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
    return logits, tokens


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp8_checkpoint_runs_as_its_dequantized_model(folders: dict[str, tuple[Path, Path]],
                                                      variant: str) -> None:
    fp8_dir, reference_dir = folders[variant]
    prompt = _prompt()
    logits, tokens = _ours(fp8_dir, prompt, offload=False)
    float_logits, float_tokens = _ours(reference_dir, prompt, offload=False)
    oracle = reference_logits(reference_dir, prompt)
    torch.testing.assert_close(logits, float_logits, rtol=0, atol=FP32_ATOL)
    torch.testing.assert_close(logits, oracle, rtol=0, atol=FP32_ATOL)
    assert tokens == float_tokens == reference_greedy(reference_dir, prompt, NEW_TOKENS)
    assert len(set(tokens)) > 3, f"degenerate model (tokens {tokens}): pick another seed"


def test_transformers_reads_the_fp8_folder_as_we_do(folders: dict[str, tuple[Path, Path]]
                                                    ) -> None:
    """transformers' own fp8 loader (``FineGrainedFP8Config``, dequantized on a CPU) on the
    transformers-style block-scaled folder: the oracle reads the fp8 files, not our reference."""
    fp8_dir, _ = folders["hf-block"]
    prompt = _prompt(6)
    logits, _ = _ours(fp8_dir, prompt, offload=False)
    torch.testing.assert_close(logits, reference_logits(fp8_dir, prompt), rtol=0,
                               atol=FP32_ATOL)


@pytest.mark.parametrize("variant", ["ct-channel", "hf-block"])
def test_experts_stay_fp8_in_the_cache_and_from_disk(folders: dict[str, tuple[Path, Path]],
                                                     variant: str) -> None:
    """Slots hold records of about one byte per weight; a miss reads the six fp8 tensors
    (weights and scales) from disk; the trunk was dequantized into the compute dtype."""
    fp8_dir, reference_dir = folders[variant]
    h, f = SPEC.hidden_size, SPEC.intermediate_size
    with offload_rt.load(fp8_dir, dtype="float32", cache_experts=SPEC.top_k, prefetch=0,
                         max_seq_len=64) as rt:
        fmt, experts = rt.expert_format, rt.experts
        assert isinstance(experts, OffloadedExperts) and fmt.name == "fp8"
        assert experts.device.slots.storage.dtype == torch.uint8
        assert 3 * h * f <= fmt.nbytes <= 3 * h * f + 5 * 4096  # fp8 weights, scales, padding
        rt.generate(_prompt(), max_new_tokens=4, ignore_eos=True)
        misses, from_disk = rt.stats.misses, rt.stats.bytes_from_disk
        file_bytes = rt.checkpoint.expert(0, 0).nbytes
        assert rt.model.layers[0].attn.wq.weight.dtype == torch.float32
        with offload_rt.load(reference_dir, dtype="float32", offload=False) as ref:
            assert torch.equal(rt.model.layers[0].attn.wq.weight, ref.model.layers[0].attn.wq.weight)
    v = VARIANTS[variant]
    scales = sum(math.prod(_scale_shape(v, *shape)) * v.scale_dtype.itemsize
                 for shape in ((f, h), (f, h), (h, f)))
    assert file_bytes == 3 * h * f + scales
    assert misses > 0 and from_disk == misses * file_bytes


def test_budget_counts_records_and_the_scratch(folders: dict[str, tuple[Path, Path]]) -> None:
    """The expert term is the record; the work term holds the dequantized scratch matrix
    (2F x H in the compute dtype) besides what the float experts' work term holds."""
    fp8_dir, reference_dir = folders["ct-channel"]
    h, f = SPEC.hidden_size, SPEC.intermediate_size
    with offload_rt.load(fp8_dir, dtype="float32", cache_experts=SPEC.top_k) as rt:
        plan, nbytes = rt.plan.footprint, rt.expert_format.nbytes
    with offload_rt.load(reference_dir, dtype="float32", cache_experts=SPEC.top_k) as ref:
        float_plan = ref.plan.footprint
    assert plan.expert == nbytes < float_plan.expert
    assert plan.work - float_plan.work >= 2 * f * h * 4


@pytest.mark.parametrize("variant", ["ct-block-partial", "hf-block"])
def test_bfloat16_compute_matches_the_dequantized_model_in_bfloat16(
        folders: dict[str, tuple[Path, Path]], variant: str) -> None:
    """The dequantized weights rounded once to bfloat16: our fp8 run and our float path on
    the float32 reference (rounded to bfloat16 at load) compute the same matrices."""
    fp8_dir, reference_dir = folders[variant]
    prompt = _prompt(7)
    with offload_rt.load(fp8_dir, dtype="bfloat16", offload=False) as rt:
        tokens = rt.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
        w = rt.model.layers[1].attn.wo.weight
    with offload_rt.load(reference_dir, dtype="bfloat16", offload=False) as ref:
        want = ref.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
        assert torch.equal(w, ref.model.layers[1].attn.wo.weight)
    assert tokens == want


def test_spec_names_the_folders_scheme(folders: dict[str, tuple[Path, Path]]) -> None:
    """The experts' format (statistics, traces); an fp8 trunk with float experts runs them as
    float experts."""
    for name, want in (("ct-channel", {"format": "fp8", "strategy": "channel"}),
                       ("hf-block", {"format": "fp8", "strategy": "block", "block": [32, 32]}),
                       ("ct-trunk-only", {"format": "float", "dtype": "float32"})):
        with offload_rt.load(folders[name][0], offload=False) as rt:
            assert rt.expert_format.spec() == want
