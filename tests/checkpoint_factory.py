"""Tiny Mixtral checkpoints made at test time, in the HF and the Mistral-native on-disk layouts.

Loader and runtime tests need real files (names, shapes, dtypes, shards, configs exactly as the
real checkpoints have them) and an independent oracle; transformers' own MixtralForCausalLM
is that oracle. Both layouts are written from one seeded in-memory model, so a checkpoint and its
Mistral-native twin hold the same weights. The corruption helpers at the end break files in the
specific ways a loader must report clearly.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import mistral_common
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

HF_INDEX = "model.safetensors.index.json"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIXTRAL_VOCAB = 32000


@dataclass(frozen=True)
class TinySpec:
    """Shape, dtype and layout of a tiny Mixtral checkpoint; the defaults build in milliseconds."""

    num_layers: int = 2
    hidden_size: int = 32
    intermediate_size: int = 48
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None = hidden_size // num_heads; Mixtral allows other values
    num_experts: int = 4
    top_k: int = 2
    vocab_size: int = 128
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 256
    sliding_window: int | None = None  # None = full attention (config.json/params.json field)
    dtype: torch.dtype = torch.float32  # the dtype written to disk
    shards: int = 1  # 1 = one file; >1 = that many files plus (HF layout) an index
    seed: int = 0
    tokenizer: bool = False  # copy the real Mixtral tokenizer.model (needs vocab_size == 32000)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.head_dim_resolved % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if self.tokenizer and self.vocab_size != _MIXTRAL_VOCAB:
            raise ValueError(f"tokenizer=True needs vocab_size={_MIXTRAL_VOCAB}")
        if not 1 <= self.top_k <= self.num_experts or self.shards < 1:
            raise ValueError("need 1 <= top_k <= num_experts and shards >= 1")

    @property
    def head_dim_resolved(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


def mixtral_tokenizer_path() -> Path:
    """The Mixtral v1 SentencePiece model shipped inside mistral-common (no download needed)."""
    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


# --- rotary layout: Mistral-native pairs (2i, 2i+1) vs HF halves (i, i + head_dim/2) -----------


def permute_mistral_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder wq/wk rows as HF's convert_mistral_weights_to_hf does, so rotate_half RoPE works."""
    dim1, dim2 = w.shape  # [n_heads * head_dim, in]
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def permute_hf_to_mistral(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_mistral_to_hf: back to interleaved pairs for complex-number RoPE."""
    dim1, dim2 = w.shape  # [n_heads * head_dim, in]
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


# --- the seeded model -----------------------------------------------------------------------------


def hf_config(spec: TinySpec) -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,  # None is written as null: loaders must derive it
        num_local_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        sliding_window=spec.sliding_window,
    )


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight at unit-ish scale.

    transformers' std-0.02 init gives near-uniform routing and near-flat logits, which would let a
    runtime with wrong routing or a wrong RoPE still match the oracle.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:  # RMSNorm gains
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(noise)
            else:  # every matrix here (experts included) is [..., out, in]
                p.copy_(noise / math.sqrt(p.shape[-1]))


def build_model(spec: TinySpec) -> transformers.MixtralForCausalLM:
    """The fp32 model both layouts are written from (before rounding to spec.dtype)."""
    with torch.random.fork_rng(devices=[]):  # default init must not move the caller's RNG
        model = transformers.MixtralForCausalLM(hf_config(spec))
    _randomize(model, spec.seed)
    return model.eval()


def hf_state_dict(model: transformers.MixtralForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under the per-expert names save_pretrained writes (w1/w3 unfused)."""
    out: dict[str, torch.Tensor] = {}
    inter = model.config.intermediate_size
    for name, p in model.state_dict().items():
        if ".mlp.experts." not in name:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = p
            continue
        prefix = name.split(".mlp.")[0] + ".block_sparse_moe.experts"
        for e, w in enumerate(p):
            if name.endswith("gate_up_proj"):  # [2 * inter, hidden] = [w1; w3]
                out[f"{prefix}.{e}.w1.weight"] = w[:inter]
                out[f"{prefix}.{e}.w3.weight"] = w[inter:]
            else:  # down_proj: [hidden, inter]
                out[f"{prefix}.{e}.w2.weight"] = w
    return out


def to_mistral_names(hf: dict[str, torch.Tensor], spec: TinySpec) -> dict[str, torch.Tensor]:
    """Rename HF-layout weights to Mistral-native ones, undoing HF's rotary row permutation."""
    out = {
        "tok_embeddings.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
    }
    for i in range(spec.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        att = src + "self_attn."
        out[dst + "attention.wq.weight"] = permute_hf_to_mistral(
            hf[att + "q_proj.weight"], spec.num_heads
        )
        out[dst + "attention.wk.weight"] = permute_hf_to_mistral(
            hf[att + "k_proj.weight"], spec.num_kv_heads
        )
        out[dst + "attention.wv.weight"] = hf[att + "v_proj.weight"]
        out[dst + "attention.wo.weight"] = hf[att + "o_proj.weight"]
        out[dst + "attention_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
        out[dst + "feed_forward.gate.weight"] = hf[src + "block_sparse_moe.gate.weight"]
        for e in range(spec.num_experts):
            for w in ("w1", "w2", "w3"):
                expert = f"feed_forward.experts.{e}.{w}.weight"
                out[dst + expert] = hf[f"{src}block_sparse_moe.experts.{e}.{w}.weight"]
    return out


def mistral_params(spec: TinySpec) -> dict[str, object]:
    """params.json as Mixtral's original release writes it (plus sliding_window when set)."""
    window = {} if spec.sliding_window is None else {"sliding_window": spec.sliding_window}
    return {
        "dim": spec.hidden_size,
        "n_layers": spec.num_layers,
        "head_dim": spec.head_dim_resolved,
        "hidden_dim": spec.intermediate_size,
        "n_heads": spec.num_heads,
        "n_kv_heads": spec.num_kv_heads,
        "norm_eps": spec.rms_norm_eps,
        "vocab_size": spec.vocab_size,
        "rope_theta": spec.rope_theta,
        "moe": {"num_experts": spec.num_experts, "num_experts_per_tok": spec.top_k},
        **window,
    }


# --- writers -------------------------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict[str, str] | None, dict[str, torch.Tensor]]:
    """A file's header metadata and tensors, so a rewrite can keep the metadata as it was."""
    with safe_open(path, "pt") as f:
        names = f.keys()
        return f.metadata(), {name: f.get_tensor(name) for name in names}


def _split(names: list[str], n: int) -> list[list[str]]:
    """n contiguous, non-empty groups of names (a shard holds whole tensors, as on the Hub)."""
    if n > len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {n} shards")
    bounds = [len(names) * k // n for k in range(n + 1)]
    return [names[a:b] for a, b in itertools.pairwise(bounds)]


def _reshard_hf(model_dir: Path, n: int) -> None:
    """Replace model.safetensors with exactly n shards plus the standard index.

    save_pretrained(max_shard_size=...) packs greedily and cannot promise a file count.
    """
    single = model_dir / "model.safetensors"
    metadata, tensors = read_safetensors(single)
    single.unlink()
    weight_map: dict[str, str] = {}
    for k, group in enumerate(_split(list(tensors), n), start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file({name: tensors[name] for name in group}, model_dir / fname, metadata)
        weight_map.update(dict.fromkeys(group, fname))
    index = {
        "metadata": {
            "total_parameters": sum(t.numel() for t in tensors.values()),
            "total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (model_dir / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _copy_tokenizer(spec: TinySpec, out_dir: Path) -> None:
    if spec.tokenizer:
        shutil.copyfile(mixtral_tokenizer_path(), out_dir / "tokenizer.model")


def make_hf_checkpoint(out_dir: Path, spec: TinySpec) -> Path:
    """Write `spec` with transformers' save_pretrained: config.json, safetensors, maybe an index."""
    out_dir = Path(out_dir)
    build_model(spec).to(spec.dtype).save_pretrained(out_dir)
    if spec.shards > 1:
        _reshard_hf(out_dir, spec.shards)
    _copy_tokenizer(spec, out_dir)
    return out_dir


def make_mistral_checkpoint(out_dir: Path, spec: TinySpec) -> Path:
    """Write the same weights as make_hf_checkpoint in the Mistral-native layout.

    params.json + consolidated.safetensors, or consolidated.00.safetensors, .01, ... when
    spec.shards > 1 (whole tensors per file; Mistral's layout has no index file).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = hf_state_dict(build_model(spec))
    tensors = {k: v.to(spec.dtype).contiguous() for k, v in to_mistral_names(hf, spec).items()}
    (out_dir / "params.json").write_text(json.dumps(mistral_params(spec), indent=2) + "\n")
    if spec.shards == 1:
        save_file(tensors, out_dir / "consolidated.safetensors")
    else:
        for k, group in enumerate(_split(list(tensors), spec.shards)):
            shard = {name: tensors[name] for name in group}
            save_file(shard, out_dir / f"consolidated.{k:02d}.safetensors")
    _copy_tokenizer(spec, out_dir)
    return out_dir


def write_legacy_rope_config(model_dir: Path) -> None:
    """Rewrite config.json as transformers 4.x wrote it, so loaders are tested on both forms.

    4.x: top-level `rope_theta`, `torch_dtype`, no `head_dim` key unless set; 5.x:
    `rope_parameters: {rope_theta, rope_type}`, `dtype`, `head_dim: null`.
    """
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    if cfg.get("head_dim", 0) is None:
        del cfg["head_dim"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --- the oracle ----------------------------------------------------------------------------------


def load_reference_model(model_dir: Path) -> transformers.PreTrainedModel:
    """HF folder -> fp32 eval model; bf16/fp16 weights are upcast, so the math runs in fp32.

    transformers 5.x loads in the checkpoint's dtype unless told otherwise, hence dtype=float32.
    The class is config.json's (``MixtralForCausalLM`` for Mixtral; ``FamilySpec`` folders
    load as their own family's class).
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def reference_logits(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """Logits for every position of one sequence, [T, vocab] float32."""
    model = load_reference_model(model_dir)
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float()


def reference_greedy(model_dir: Path, prompt_ids: list[int], n: int) -> list[int]:
    """Exactly n greedy new token ids; EOS does not stop it, so runtimes compare the full n."""
    model = load_reference_model(model_dir)
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),  # else prompt tokens equal to pad are masked
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


# --- corruption, for tests of the loader's error messages ----------------------------------------


def truncate_file(path: Path, nbytes_kept: int) -> None:
    """Cut a file to its first nbytes_kept bytes, as an interrupted download leaves it."""
    with Path(path).open("r+b") as f:
        f.truncate(nbytes_kept)


def corrupt_header(path: Path) -> None:
    """Overwrite a safetensors JSON header with garbage, keeping its length and the data intact."""
    with Path(path).open("r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))  # header length, little-endian u64
        f.write((b"{not json!" + b"#" * n)[:n])


def find_tensor_file(model_dir: Path, name: str) -> Path:
    """The safetensors file in model_dir that holds `name` (either layout, sharded or not)."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            names = f.keys()  # safe_open supports neither `in` nor iteration
        if name in names:
            return path
    raise KeyError(f"{name} is in no safetensors file of {model_dir}")


def _rewrite_tensor(model_dir: Path, name: str, new: torch.Tensor | None) -> Path:
    """Rewrite the file holding `name` with it replaced by `new` (or dropped when None)."""
    path = find_tensor_file(model_dir, name)
    metadata, tensors = read_safetensors(path)
    old = tensors.pop(name)
    if new is not None:
        tensors[name] = new
    save_file(tensors, path, metadata)
    index_path = Path(model_dir) / HF_INDEX
    if index_path.exists():  # keep the index's total_size truthful
        index = json.loads(index_path.read_text())
        new_bytes = 0 if new is None else new.numel() * new.element_size()
        index["metadata"]["total_size"] += new_bytes - old.numel() * old.element_size()
        index_path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def drop_tensor(model_dir: Path, name: str, keep_index_entry: bool = False) -> Path:
    """Rewrite `name`'s file without it; by default also drop it from the HF index.

    keep_index_entry=True leaves an index that promises a tensor its shard lacks.
    """
    path = _rewrite_tensor(model_dir, name, None)
    index_path = Path(model_dir) / HF_INDEX
    if index_path.exists() and not keep_index_entry:
        index = json.loads(index_path.read_text())
        del index["weight_map"][name]
        index_path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def reshape_tensor(model_dir: Path, name: str, new_shape: tuple[int, ...]) -> Path:
    """Rewrite `name` with a wrong shape (same dtype; values kept when the element count allows)."""
    with safe_open(find_tensor_file(model_dir, name), "pt") as f:
        old = f.get_tensor(name)
    numel = math.prod(new_shape)
    if numel == old.numel():
        new = old.reshape(new_shape).contiguous()
    else:
        new = torch.zeros(new_shape, dtype=old.dtype)
    return _rewrite_tensor(model_dir, name, new)


def remove_shard(model_dir: Path, shard_file: str) -> None:
    """Delete one shard and leave the index (if any) pointing at it."""
    (Path(model_dir) / shard_file).unlink()


# --- quantized folders (docs/quantized_format.md), written independently of offload-rt quantize --


def _record_phase(path: Path, name: str) -> int:
    """File offset of tensor ``name`` modulo 4096."""
    with Path(path).open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return (8 + n + header[name]["data_offsets"][0]) % 4096


def make_quantized_checkpoint(out_dir: Path, spec: TinySpec, experts: str = "int8",
                              group_size: int = 32, scale_dtype: torch.dtype = torch.bfloat16,
                              record_phase: int | None = 0) -> Path:
    """``spec``'s seeded model (as make_hf_checkpoint writes it) with every expert stored as
    one U8 record of ``experts`` format, encoded from its weights in ``spec.dtype``, plus
    config.json's ``quantization_config``; written with ``safetensors.torch.save_file``.

    ``record_phase``: the records' file offset modulo 4096 (all records share it: U8 tensors
    come last in a safetensors file and each is a multiple of 4096 long), reached by padding
    the header's ``__metadata__``; 0 is where offload-rt quantize puts them. None: as
    save_file leaves them.
    """
    from offload_rt.quant.formats import Int4Format, Int8Format  # the formats under test

    if spec.shards != 1:
        raise ValueError("make_quantized_checkpoint writes one file")
    out_dir = make_hf_checkpoint(out_dir, spec)
    h, f = spec.hidden_size, spec.intermediate_size
    fmt = (Int8Format(h, f, scale_dtype) if experts == "int8"
           else Int4Format(h, f, group_size, scale_dtype))
    path = out_dir / "model.safetensors"
    metadata, tensors = read_safetensors(path)
    for i, e in itertools.product(range(spec.num_layers), range(spec.num_experts)):
        prefix = f"model.layers.{i}.block_sparse_moe.experts.{e}"
        w1, w3, w2 = (tensors.pop(f"{prefix}.{w}.weight") for w in ("w1", "w3", "w2"))
        tensors[f"{prefix}.record"] = fmt.encode(w1, w3, w2)
    save_file(tensors, path, metadata)
    if record_phase is not None:
        first = "model.layers.0.block_sparse_moe.experts.0.record"
        pad = (record_phase - _record_phase(path, first)) % 4096
        if pad % 8:
            raise ValueError(f"record phase {record_phase} is not reachable (8-byte steps)")
        if pad:  # '"pad":"' + '",' are 10 JSON bytes besides the x's: rounds to 8 with them
            base = {**(metadata or {}), "pad": ""}
            save_file(tensors, path, base)
            pad = (record_phase - _record_phase(path, first)) % 4096
            save_file(tensors, path, {**base, "pad": "x" * pad})
        assert _record_phase(path, first) == record_phase
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "offload_rt", "format_version": 1,
                                     "experts": fmt.spec(), "record_bytes": fmt.nbytes}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


# --- other families (offload_rt.families), written by transformers' own classes ----------------

FAMILY_CLASSES = {  # model_type -> (config class, model class)
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
}


@dataclass(frozen=True)
class FamilySpec:
    """A tiny checkpoint of a family other than Mixtral. ``intermediate_size`` is the routed
    experts' (Qwen's ``moe_intermediate_size``; Qwen's dense ``intermediate_size`` is set to a
    different, unused width so a loader that reads the wrong field fails on shapes). Fields a
    family does not have are ignored for it: ``shared_expert_size``/``qkv_bias`` (qwen2_moe),
    ``head_dim``/``sliding_window`` (qwen3_moe: ``use_sliding_window`` with that window),
    ``clip_qkv`` (olmoe)."""

    family: str
    num_layers: int = 2
    hidden_size: int = 32
    intermediate_size: int = 24
    shared_expert_size: int = 40
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    num_experts: int = 8
    top_k: int = 2
    norm_topk_prob: bool = False
    qkv_bias: bool = True
    clip_qkv: float | None = None
    sliding_window: int | None = None
    vocab_size: int = 128
    rope_theta: float = 1e4
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 256
    dtype: torch.dtype = torch.float32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILY_CLASSES:
            raise ValueError(f"family must be one of {sorted(FAMILY_CLASSES)}")
        if self.dtype not in _DTYPES or not 1 <= self.top_k <= self.num_experts:
            raise ValueError("bad dtype, or not 1 <= top_k <= num_experts")


def _family_fields(spec: FamilySpec) -> dict[str, object]:
    """The config class's own arguments for ``spec``'s family."""
    if spec.family == "qwen2_moe":
        return {"moe_intermediate_size": spec.intermediate_size,
                "intermediate_size": 2 * spec.intermediate_size + 2,
                "shared_expert_intermediate_size": spec.shared_expert_size,
                "num_experts": spec.num_experts, "qkv_bias": spec.qkv_bias}
    if spec.family == "qwen3_moe":
        window = {"use_sliding_window": spec.sliding_window is not None,
                  "sliding_window": spec.sliding_window}
        head = {} if spec.head_dim is None else {"head_dim": spec.head_dim}
        return {"moe_intermediate_size": spec.intermediate_size,
                "intermediate_size": 2 * spec.intermediate_size + 2,
                "num_experts": spec.num_experts, **window, **head}
    return {"intermediate_size": spec.intermediate_size, "num_experts": spec.num_experts,
            "clip_qkv": spec.clip_qkv}


def family_config(spec: FamilySpec) -> transformers.PreTrainedConfig:
    config_class = getattr(transformers, FAMILY_CLASSES[spec.family][0])
    return config_class(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, num_experts_per_tok=spec.top_k,
        norm_topk_prob=spec.norm_topk_prob, max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps, eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        **_family_fields(spec))


def build_family_model(spec: FamilySpec) -> transformers.PreTrainedModel:
    """The fp32 model, weights re-drawn as ``_randomize`` does; biases ~ N(0, 0.5^2)."""
    with torch.random.fork_rng(devices=[]):
        model = getattr(transformers, FAMILY_CLASSES[spec.family][1])(family_config(spec))
    _randomize(model, spec.seed)
    gen = torch.Generator().manual_seed(spec.seed + 7919)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_family_checkpoint(out_dir: Path, spec: FamilySpec) -> Path:
    """Write ``spec`` with transformers' save_pretrained (per-expert tensor names, as the
    families' released checkpoints have them)."""
    out_dir = Path(out_dir)
    build_family_model(spec).to(spec.dtype).save_pretrained(out_dir)
    return out_dir
