"""The small files of a quantized folder: its config.json, and what is copied from the source.

config.json is the source's (a Mistral-native source gets the Hugging Face equivalent of its
params.json) plus ``quantization_config`` (docs/quantized_format.md). The tensors are always
written in the HF layout (trunk tensors read by canonical name come out in HF rotary order), so
the folder is an HF folder whatever the source's layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offload_rt import tensor_names as names
from offload_rt.checkpoint import Checkpoint
from offload_rt.config import ModelConfig, read_json
from offload_rt.errors import CheckpointError
from offload_rt.quant.folder import FORMAT_VERSION, QUANT_METHOD
from offload_rt.quant.formats import ExpertFormat

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "chat_template.json", "generation_config.json",
                "README.md")
COPIED_PATTERNS = ("tokenizer.model*", "LICENSE*")  # tokenizer.model.v1 ...; licence terms


def refuse_quantized_source(model_dir: Path) -> None:
    """``CheckpointError`` naming the file when the source's config says it is quantized
    (ours or another method's): quantize reads float32/bfloat16/float16 weights."""
    for file, keys in (("config.json", ("quantization_config",)),
                       ("params.json", ("quantization", "quantization_config"))):
        path = model_dir / file
        if not path.is_file():
            continue
        data = read_json(path)
        for key in keys:
            quant = data.get(key)
            if quant is not None:
                method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
                raise CheckpointError(f"{path}: already quantized ({key} with quant_method "
                                      f"{method}); offload-rt quantize reads a float32/bfloat16/"
                                      "float16 checkpoint")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers ``MixtralConfig`` config.json that ``config_from_hf`` reads back as
    ``cfg`` (the HF equivalent of a params.json; field names as in ``config.py``)."""
    eos = list(cfg.eos_token_ids)
    data: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,  # top level: read by transformers 4.x and 5.x
        "max_position_embeddings": cfg.max_seq_len, "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        # (): stop at the tokenizer's EOS only, as params.json means; null says that
        "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else eos,
    }
    if cfg.dtype is not None:
        data["dtype"] = cfg.dtype
    return data


def quantization_config(fmt: ExpertFormat) -> dict[str, Any]:
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
            "experts": fmt.spec(), "record_bytes": fmt.nbytes}


def output_config(ckpt: Checkpoint, fmt: ExpertFormat) -> dict[str, Any]:
    """config.json of the quantized folder."""
    if ckpt.layout == names.HF:
        data = read_json(ckpt.model_dir / "config.json")
    else:
        data = hf_config(ckpt.config)
    return {**data, "quantization_config": quantization_config(fmt)}


def files_to_copy(model_dir: Path) -> list[Path]:
    """The source's tokenizer, generation config, model card and licence files."""
    found = {model_dir / name for name in COPIED_FILES}
    for pattern in COPIED_PATTERNS:
        found.update(model_dir.glob(pattern))
    return sorted(p for p in found if p.is_file())
