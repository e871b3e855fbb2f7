"""Every field of a model's own config files: honoured, harmless, or refused by name.

Field lists: transformers' ``MixtralConfig`` and the ``PreTrainedConfig`` fields it inherits
(config.json, plus the names transformers 4.x wrote); mistral-inference's ``TransformerArgs``
and ``MoeArgs`` (params.json). Where each honoured field is used and why each harmless one
cannot change a token: docs/model_fields.md (tests/test_model_fields.py keeps the two in step).
Refused means: a value other than the inert one is a ``CheckpointError`` naming file and field.
Fields in neither list are ignored, as transformers' ``MixtralForCausalLM`` ignores them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offload_rt.errors import CheckpointError

HONOURED, HARMLESS, REFUSED = "honoured", "harmless", "refused"
FORMATS = ("float32/bfloat16/float16 safetensors, or folders quantized by offload-rt quantize "
           "(quant_method offload_rt)")
OWN_QUANT_METHOD = "offload_rt"  # docs/quantized_format.md; read by quant/folder.py

HF_FIELDS: dict[str, str] = {
    **dict.fromkeys((
        "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "num_local_experts", "num_experts_per_tok", "rms_norm_eps", "tie_word_embeddings",
        "max_position_embeddings", "sliding_window", "rope_parameters", "rope_theta",
        "rope_scaling", "hidden_act", "eos_token_id", "dtype", "torch_dtype",
        "quantization_config"), HONOURED),
    **dict.fromkeys((
        "bos_token_id", "pad_token_id", "attention_dropout", "router_jitter_noise",
        "router_aux_loss_coef", "output_router_logits", "initializer_range", "use_cache",
        "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
        "is_encoder_decoder", "id2label", "label2id", "problem_type", "transformers_version",
        "_name_or_path"), HARMLESS),
    **dict.fromkeys(("attention_bias", "mlp_bias"), REFUSED),
}

MISTRAL_FIELDS: dict[str, str] = {
    **dict.fromkeys((
        "dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps",
        "vocab_size", "rope_theta", "moe", "sliding_window", "_sliding_window", "max_seq_len",
        "model_type"), HONOURED),
    "max_batch_size": HARMLESS,
    **dict.fromkeys(("lora", "vision_encoder", "quantization", "quantization_config"), REFUSED),
}

# Tensor name endings of quantized formats (GPTQ/AWQ: qweight, qzeros, scales, g_idx;
# bitsandbytes: SCB, absmax, quant_map, quant_state; fp8 / compressed-tensors: weight_scale,
# weight_scale_inv, input_scale, weight_packed, weight_zero_point, weight_shape).
QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".SCB", ".absmax",
                      ".quant_map", ".weight_format", ".weight_scale", ".weight_scale_inv",
                      ".input_scale", ".weight_packed", ".weight_zero_point", ".weight_shape")
_QUANT_STATE = ".quant_state."  # bitsandbytes 4-bit: weight.quant_state.bitsandbytes__nf4


def quantized_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: quantized checkpoint ({what}) is not supported; offload_rt "
                           f"reads {FORMATS}")


def check_hf_fields(data: dict[str, Any], path: Path) -> None:
    """Refuse the config.json fields whose values we do not implement (a quantization_config
    other than offload_rt's own, read by ``quant.folder``)."""
    quant = data.get("quantization_config")
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
    if quant is not None and method != OWN_QUANT_METHOD:
        raise quantized_error(path, f"quantization_config with quant_method {method}")
    for name in ("attention_bias", "mlp_bias"):
        if data.get(name):
            raise CheckpointError(f"{path}: {name} true is not supported: Mixtral's "
                                  "projections have no biases")
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{path}: unsupported hidden_act '{act}' (only 'silu')")


def check_mistral_fields(data: dict[str, Any], path: Path) -> None:
    """Refuse the params.json fields whose values we do not implement."""
    for name in ("quantization", "quantization_config"):
        if data.get(name) is not None:
            raise quantized_error(path, f"field '{name}'")
    model_type = data.get("model_type", "transformer")
    if model_type != "transformer":
        raise CheckpointError(f"{path}: model_type '{model_type}' is not supported (only "
                              "'transformer': offload_rt runs Mixtral-family MoE models)")
    if data.get("lora") is not None:
        raise CheckpointError(f"{path}: field 'lora' (LoRA layers) is not supported; merge "
                              "the adapter into the weights first")
    if data.get("vision_encoder") is not None:
        raise CheckpointError(f"{path}: field 'vision_encoder' (a vision-language model) is "
                              "not supported; offload_rt runs text-only Mixtral-family models")


def check_tensor_names(names: list[str], source: Path) -> None:
    """Refuse weight files that hold a quantized format's tensors, naming one of them."""
    for name in sorted(names):
        if name.endswith(QUANTIZED_SUFFIXES) or _QUANT_STATE in name:
            raise quantized_error(source, f"tensor '{name}'")


def sliding_window(data: dict[str, Any], path: Path, keys: tuple[str, ...]) -> int | None:
    """The attention window from the first of ``keys`` that is set: None (full attention) or
    a positive int. A per-layer list is accepted when every layer has the same window."""
    given = [k for k in keys if data.get(k) is not None]
    if len(given) > 1:
        raise CheckpointError(f"{path}: both {given[0]} and {given[1]} are set; give one")
    if not given:
        return None
    key, value = given[0], data[given[0]]
    if isinstance(value, list) and value and len(set(map(repr, value))) == 1:
        value = value[0]
    elif isinstance(value, list):
        raise CheckpointError(f"{path}: field '{key}' {value} gives layers different windows; "
                              "offload_rt supports one window for every layer")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{path}: field '{key}' must be a positive integer or null, "
                              f"got {value!r}")
    return value


def token_ids(data: dict[str, Any], key: str, path: Path, default: tuple[int, ...]
              ) -> tuple[int, ...]:
    """An int-or-list token id field (``eos_token_id``) as a tuple; null gives ()."""
    if key not in data:
        return default
    value = data[key]
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(f"{path}: field '{key}' must be a token id or a list of them, "
                              f"got {value!r}")
    return tuple(values)


def declared_dtype(data: dict[str, Any], path: Path) -> str | None:
    """config.json's ``dtype`` (transformers 5) or ``torch_dtype`` (4.x): the dtype
    transformers' default ``dtype="auto"`` computes in."""
    key = "dtype" if data.get("dtype") is not None else "torch_dtype"
    value = data.get(key)
    if value is None:
        return None
    if value not in ("float32", "bfloat16", "float16"):
        raise CheckpointError(f"{path}: field '{key}' is {value!r}; offload_rt computes in "
                              "float32, bfloat16 or float16")
    return str(value)
