"""Every field of a model's own config files: honoured, harmless, or refused by name.

Field lists: transformers' ``MixtralConfig`` and the ``PreTrainedConfig`` fields it inherits
(config.json, plus the names transformers 4.x wrote); mistral-inference's ``TransformerArgs``
and ``MoeArgs`` (params.json). Other families' tables are ``COMMON_HF_FIELDS`` plus their own
(``offload_rt.families``). Where each honoured field is used and why each harmless one
cannot change a token: docs/model_fields.md (tests/test_model_fields.py and
tests/test_families_config.py keep the two in step).
Refused means: a value other than the inert one is a ``CheckpointError`` naming file and field.
Fields in no list are ignored, as transformers' model classes ignore them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from offload_rt.errors import CheckpointError

HONOURED, HARMLESS, REFUSED = "honoured", "harmless", "refused"
FORMATS = ("float32/bfloat16/float16 safetensors, fp8 checkpoints (quant_method "
           "compressed-tensors with format float-quantized, or fp8), or folders quantized by "
           "offload-rt quantize (quant_method offload_rt)")
OWN_QUANT_METHOD = "offload_rt"  # docs/quantized_format.md; read by quant/folder.py
FP8_QUANT_METHODS = ("compressed-tensors", "fp8")  # read by quant/fp8_scheme.py

# The config.json fields every family (``offload_rt.families``) reads alike: the
# ``PreTrainedConfig`` ones and the decoder shapes all of them share.
COMMON_HF_FIELDS: dict[str, str] = {
    **dict.fromkeys((
        "model_type", "architectures", "vocab_size", "hidden_size",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "num_experts_per_tok", "rms_norm_eps", "tie_word_embeddings",
        "max_position_embeddings", "rope_parameters", "rope_theta",
        "rope_scaling", "hidden_act", "eos_token_id", "dtype", "torch_dtype",
        "quantization_config"), HONOURED),
    **dict.fromkeys((
        "bos_token_id", "pad_token_id", "attention_dropout",
        "router_aux_loss_coef", "output_router_logits", "initializer_range", "use_cache",
        "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
        "is_encoder_decoder", "id2label", "label2id", "problem_type", "transformers_version",
        "_name_or_path"), HARMLESS),
}
# Mixtral's table (docs/model_fields.md "config.json"): the common fields and MixtralConfig's own.
HF_FIELDS: dict[str, str] = {
    **COMMON_HF_FIELDS,
    **dict.fromkeys(("intermediate_size", "head_dim", "num_local_experts", "sliding_window"),
                    HONOURED),
    "router_jitter_noise": HARMLESS,
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
    """Refuse the config.json fields of every family whose values we do not implement (a
    quantization_config other than offload_rt's own or an fp8 checkpoint's, read by
    ``quant.folder``); each family refuses its own (``offload_rt.families``)."""
    quant = data.get("quantization_config")
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
    if quant is not None and method not in (OWN_QUANT_METHOD, *FP8_QUANT_METHODS):
        raise quantized_error(path, f"quantization_config with quant_method {method}")
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{path}: unsupported hidden_act {act!r} (only 'silu')")
    archs = data.get("architectures")
    if archs is not None and not (isinstance(archs, list)
                                  and all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{path}: field 'architectures' must be a list of class names, "
                              f"got {archs!r}")


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


def check_tensor_names(names: list[str], source: Path, allowed: tuple[str, ...] = ()) -> None:
    """Refuse weight files that hold a quantized format's tensors, naming one of them;
    ``allowed``: name endings the folder's own format reads (an fp8 checkpoint's scales)."""
    for name in sorted(names):
        if name.endswith(allowed):
            continue
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
    if isinstance(value, list) and len(set(map(repr, value))) == 1:
        value = value[0]
    elif isinstance(value, list) and len(value) > 1:
        raise CheckpointError(f"{path}: field '{key}' {value} gives layers different windows; "
                              "offload_rt supports one window for every layer")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{path}: field '{key}' must be a positive integer or null, "
                              f"got {value!r}")
    return value


def token_ids(data: dict[str, Any], key: str, path: Path, default: tuple[int, ...],
              vocab_size: int | None = None) -> tuple[int, ...]:
    """An int-or-list token id field (``eos_token_id``) as a tuple; null gives (). With
    ``vocab_size``, an id the model cannot produce (>= ``vocab_size``) is refused: it would
    never stop a generation."""
    if key not in data:
        return default
    value = data[key]
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(f"{path}: field '{key}' must be a token id or a list of them, "
                              f"got {value!r}")
    outside = [v for v in values if vocab_size is not None and v >= vocab_size]
    if outside:
        raise CheckpointError(f"{path}: field '{key}' names token id {outside[0]}, outside the "
                              f"vocabulary (vocab_size {vocab_size}: ids 0..{vocab_size - 1}); "
                              "the model can never produce it, so it would never stop a "
                              "generation")
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


# --- typed values of single fields (every number and flag the config files give) --------------

REQUIRED = object()  # ``integer``'s default: the field must be given


def _name(key: str, section: str) -> str:
    return f"{section}.{key}" if section else key


def integer(data: dict[str, Any], key: str, path: Path, default: Any = REQUIRED, *,
            section: str = "") -> Any:
    """A positive int field (a size or a count: a 0 would divide by zero); absent or null
    gives ``default`` (``REQUIRED``: refused as missing). ``section`` names the enclosing
    object in messages (``moe.num_experts``)."""
    value = data.get(key)
    if value is None:
        if default is REQUIRED:
            raise CheckpointError(f"{path}: missing required field '{_name(key, section)}'")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{path}: field '{_name(key, section)}' must be a positive "
                              f"integer, got {value!r}")
    return value


def positive_number(data: dict[str, Any], key: str, path: Path, default: float, *,
                    section: str = "", why: str = "") -> float:
    """A finite number > 0 (``rms_norm_eps``, ``rope_theta``); absent gives ``default``.
    Null, text, a bool are refused; so are NaN, infinity, 0 and negative numbers, with ``why``
    (what such a value would compute)."""
    if key not in data:
        return default
    value = data[key]
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{path}: field '{_name(key, section)}' must be a number > 0, "
                              f"got {value!r}{why if number else ''}")
    return float(value)


def flag(data: dict[str, Any], key: str, path: Path, default: bool = False) -> bool:
    """A JSON boolean (``tie_word_embeddings``); absent gives ``default``. Anything else,
    the strings "true"/"false" and null included, is refused (transformers' MixtralConfig
    refuses them too)."""
    if key not in data:
        return default
    value = data[key]
    if not isinstance(value, bool):
        raise CheckpointError(f"{path}: field '{key}' must be true or false, got {value!r}")
    return value


def section(data: dict[str, Any], key: str, path: Path) -> dict[str, Any] | None:
    """A nested object (``rope_parameters``, ``moe``); absent or null gives None."""
    value = data.get(key)
    if value is not None and not isinstance(value, dict):
        raise CheckpointError(f"{path}: field '{key}' must be an object (or null), got "
                              f"{value!r}")
    return value
