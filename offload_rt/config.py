"""Model configuration, read from the model folder's own files (HF config.json or params.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offload_rt import model_fields as fields
from offload_rt.errors import CheckpointError

# Mixtral checkpoints in the Mistral-native layout carry no context length; this is Mixtral's.
MISTRAL_DEFAULT_CONTEXT = 32768


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Mixtral-family model. Field names follow HF's MixtralConfig."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_seq_len: int  # the model's context: positions it takes (RoPE keeps counting past a window)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # a token attends to the latest W positions, its own too
    eos_token_ids: tuple[int, ...] = (2,)  # () = the file names none (the tokenizer's EOS stops)
    dtype: str | None = None  # config.json dtype/torch_dtype: the default compute dtype
    max_seq_len_source: str = field(default="", compare=False)  # "max_position_embeddings in …"

    def __post_init__(self) -> None:
        positive = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "num_experts", "top_k", "vocab_size", "max_seq_len")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise CheckpointError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"num_heads ({self.num_heads}) must be a multiple of "
                                  f"num_kv_heads ({self.num_kv_heads})")
        if self.top_k > self.num_experts:
            raise CheckpointError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    def kv_positions(self, max_seq_len: int) -> int:
        """Positions one layer's KV cache holds for a context of ``max_seq_len``: all of them,
        or with a sliding window only the latest ``sliding_window`` (a rolling buffer)."""
        return min(max_seq_len, self.sliding_window or max_seq_len)

    @property
    def expert_numel(self) -> int:
        """Elements of one expert: w1 and w3 [intermediate, hidden], w2 [hidden, intermediate]."""
        return 3 * self.hidden_size * self.intermediate_size


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ``CheckpointError`` naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at top level")
    return data


def _require(data: dict[str, Any], key: str, path: Path, kind: type = int) -> Any:
    if key not in data or data[key] is None:
        raise CheckpointError(f"{path}: missing required field '{key}'")
    value = data[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        # every required integer is a size or a count (a 0 would divide by zero below)
        raise CheckpointError(f"{path}: field '{key}' must be a positive integer, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise CheckpointError(f"{path}: field '{key}' must be a number, got {value!r}")
    return value


def _hf_rope_theta(data: dict[str, Any], path: Path) -> float:
    """transformers < 5 writes top-level rope_theta (scaling in rope_scaling); 5.x nests both in
    rope_parameters. Only the default (unscaled) RoPE is implemented."""
    for key in ("rope_parameters", "rope_scaling"):
        params = data.get(key)
        if isinstance(params, dict):
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type != "default":
                raise CheckpointError(f"{path}: unsupported rope_type '{rope_type}' in {key} "
                                      "(only 'default')")
    params = data.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(_require(params, "rope_theta", path, float))
    if "rope_theta" in data:
        return float(_require(data, "rope_theta", path, float))
    return 1e6


def _hf_check_architecture(data: dict[str, Any], path: Path) -> None:
    model_type = data.get("model_type")
    archs = data.get("architectures") or []
    if model_type != "mixtral" and "MixtralForCausalLM" not in archs:
        raise CheckpointError(f"{path}: unsupported architecture (model_type={model_type!r}, "
                              f"architectures={archs}); offload_rt runs Mixtral-family MoE models")
    fields.check_hf_fields(data, path)


def _checked(path: Path, **values: Any) -> ModelConfig:
    """ModelConfig's own consistency checks, with the file the values came from named."""
    try:
        return ModelConfig(**values)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def config_from_hf(path: Path) -> ModelConfig:
    """Read an HF ``config.json`` of a Mixtral model."""
    data = read_json(path)
    _hf_check_architecture(data, path)
    hidden = _require(data, "hidden_size", path)
    heads = _require(data, "num_attention_heads", path)
    head_dim = data.get("head_dim") or hidden // heads
    return _checked(
        path,
        hidden_size=hidden,
        intermediate_size=_require(data, "intermediate_size", path),
        num_layers=_require(data, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=data.get("num_key_value_heads") or heads,
        head_dim=int(head_dim),
        num_experts=_require(data, "num_local_experts", path),
        top_k=_require(data, "num_experts_per_tok", path),
        vocab_size=_require(data, "vocab_size", path),
        rms_norm_eps=float(data.get("rms_norm_eps", 1e-5)),
        rope_theta=_hf_rope_theta(data, path),
        max_seq_len=_require(data, "max_position_embeddings", path),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        sliding_window=fields.sliding_window(data, path, ("sliding_window",)),
        eos_token_ids=fields.token_ids(data, "eos_token_id", path, (2,)),  # MixtralConfig's 2
        dtype=fields.declared_dtype(data, path),
        max_seq_len_source=f"max_position_embeddings in {path}",
    )


def config_from_mistral(path: Path) -> ModelConfig:
    """Read a Mistral-native ``params.json`` (mistral-inference field names)."""
    data = read_json(path)
    moe = data.get("moe")
    if not isinstance(moe, dict):
        raise CheckpointError(f"{path}: no 'moe' section: not a Mixture-of-Experts model "
                              "(offload_rt runs Mixtral-family MoE models)")
    fields.check_mistral_fields(data, path)
    dim = _require(data, "dim", path)
    heads = _require(data, "n_heads", path)
    return _checked(
        path,
        hidden_size=dim,
        intermediate_size=_require(data, "hidden_dim", path),
        num_layers=_require(data, "n_layers", path),
        num_heads=heads,
        num_kv_heads=data.get("n_kv_heads") or heads,
        head_dim=int(data.get("head_dim") or dim // heads),
        num_experts=_require(moe, "num_experts", path),
        top_k=_require(moe, "num_experts_per_tok", path),
        vocab_size=_require(data, "vocab_size", path),
        rms_norm_eps=float(data.get("norm_eps", 1e-5)),
        rope_theta=float(data.get("rope_theta", 1e6)),
        max_seq_len=_require(data, "max_seq_len", path) if "max_seq_len" in data
        else MISTRAL_DEFAULT_CONTEXT,
        sliding_window=fields.sliding_window(data, path, ("sliding_window", "_sliding_window")),
        eos_token_ids=(),  # mistral-inference stops at the tokenizer's EOS
        max_seq_len_source=f"max_seq_len in {path}" if "max_seq_len" in data else
        f"{path} gives no max_seq_len: Mixtral's {MISTRAL_DEFAULT_CONTEXT}",
    )
