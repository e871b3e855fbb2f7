"""Model configuration, read from the model folder's own files (HF config.json or params.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offload_rt import families
from offload_rt import model_fields as fields
from offload_rt.errors import CheckpointError

# Mixtral checkpoints in the Mistral-native layout carry no context length; this is Mixtral's.
MISTRAL_DEFAULT_CONTEXT = 32768


QK_NORMS = ("head", "projection")  # ModelConfig.qk_norm: over each head, or the whole projection


@dataclass(frozen=True)
class ModelConfig:
    """Shapes, constants and block parts of an MoE model of a supported family
    (``offload_rt.families``). Field names follow HF's MixtralConfig; ``intermediate_size``
    is the routed experts' (Qwen's ``moe_intermediate_size``). The parts after
    ``max_seq_len_source`` default to Mixtral's blocks."""

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
    family: str = "mixtral"  # config.json's model_type: whose tensor names (offload_rt.families)
    norm_topk_prob: bool = True  # top-k weights renormalized to sum to 1; False: softmax's own
    qkv_bias: bool = False  # q/k/v projections have biases [Hq*D], [Hkv*D], [Hkv*D]
    qk_norm: str | None = None  # RMSNorm of q and k: per "head" (weight [D]) or the whole
    #                             "projection" (weights [Hq*D], [Hkv*D]), before RoPE
    clip_qkv: float | None = None  # q, k, v clamped to [-clip_qkv, clip_qkv] after the norms
    shared_expert_size: int = 0  # intermediate size of an always-active shared expert scaled
    #                              by sigmoid(gate x), resident in the trunk; 0: none

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
            raise CheckpointError(f"top_k ({self.top_k}, field 'num_experts_per_tok') exceeds "
                                  f"the number of experts ({self.num_experts}, field "
                                  "'num_local_experts' or 'num_experts')")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.qk_norm not in (None, *QK_NORMS):
            raise CheckpointError(f"qk_norm must be one of {QK_NORMS} or None, got {self.qk_norm!r}")
        if self.shared_expert_size < 0:
            raise CheckpointError(f"shared_expert_size must be >= 0, got {self.shared_expert_size}")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise CheckpointError(f"clip_qkv must be > 0 or None, got {self.clip_qkv}")

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


# What a value <= 0 would compute, for the refusals of the two float fields.
_EPS_WHY = (" (RMSNorm divides by sqrt(mean square + eps): 0 gives NaN on an all-zero row, "
            "a negative eps NaN wherever the mean square is below it)")
_THETA_WHY = " (the RoPE base: 0 or a negative base gives NaN or infinite rotation angles)"


def _hf_rope_theta(data: dict[str, Any], path: Path, default: float) -> float:
    """transformers < 5 writes top-level rope_theta (scaling in rope_scaling); 5.x nests both in
    rope_parameters. Only the default (unscaled) RoPE is implemented. ``default``: the
    family's, for a file that gives none."""
    for key in ("rope_parameters", "rope_scaling"):
        params = fields.section(data, key, path)
        if params is not None:
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type != "default":
                raise CheckpointError(f"{path}: unsupported rope_type {rope_type!r} in {key} "
                                      "(only 'default')")
    params = fields.section(data, "rope_parameters", path)
    if params is not None and "rope_theta" in params:
        return fields.positive_number(params, "rope_theta", path, default,
                                      section="rope_parameters", why=_THETA_WHY)
    return fields.positive_number(data, "rope_theta", path, default, why=_THETA_WHY)


def _checked(path: Path, **values: Any) -> ModelConfig:
    """ModelConfig's own consistency checks, with the file the values came from named."""
    try:
        return ModelConfig(**values)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def config_from_hf(path: Path) -> ModelConfig:
    """Read an HF ``config.json`` of a supported family (``offload_rt.families``, by its
    ``model_type``). Every field read is type-checked (``CheckpointError`` naming the file and
    field); the family reads its own fields and refuses what it does not implement."""
    data = read_json(path)
    family = families.family_of(data, path)
    fields.check_hf_fields(data, path)
    heads = fields.integer(data, "num_attention_heads", path)
    vocab = fields.integer(data, "vocab_size", path)
    eps = fields.positive_number(data, "rms_norm_eps", path, family.rms_norm_eps, why=_EPS_WHY)
    return _checked(
        path,
        hidden_size=fields.integer(data, "hidden_size", path),
        num_layers=fields.integer(data, "num_hidden_layers", path),
        num_heads=heads,
        num_kv_heads=fields.integer(data, "num_key_value_heads", path, heads),
        top_k=fields.integer(data, "num_experts_per_tok", path),
        vocab_size=vocab,
        rms_norm_eps=eps,
        rope_theta=_hf_rope_theta(data, path, family.rope_theta),
        max_seq_len=fields.integer(data, "max_position_embeddings", path),
        tie_word_embeddings=fields.flag(data, "tie_word_embeddings", path),
        eos_token_ids=fields.token_ids(data, "eos_token_id", path, family.eos_token_ids, vocab),
        dtype=fields.declared_dtype(data, path),
        max_seq_len_source=f"max_position_embeddings in {path}",
        family=family.model_type,
        **family.read(data, path),
    )


def config_from_mistral(path: Path) -> ModelConfig:
    """Read a Mistral-native ``params.json`` (mistral-inference field names), every field
    type-checked as ``config_from_hf``'s."""
    data = read_json(path)
    moe = fields.section(data, "moe", path)
    if moe is None:
        raise CheckpointError(f"{path}: no 'moe' section: not a Mixture-of-Experts model "
                              "(offload_rt runs Mixtral-family MoE models)")
    fields.check_mistral_fields(data, path)
    dim = fields.integer(data, "dim", path)
    heads = fields.integer(data, "n_heads", path)
    context = fields.integer(data, "max_seq_len", path, None)
    return _checked(
        path,
        hidden_size=dim,
        intermediate_size=fields.integer(data, "hidden_dim", path),
        num_layers=fields.integer(data, "n_layers", path),
        num_heads=heads,
        num_kv_heads=fields.integer(data, "n_kv_heads", path, heads),
        head_dim=fields.integer(data, "head_dim", path, dim // heads),
        num_experts=fields.integer(moe, "num_experts", path, section="moe"),
        top_k=fields.integer(moe, "num_experts_per_tok", path, section="moe"),
        vocab_size=fields.integer(data, "vocab_size", path),
        rms_norm_eps=fields.positive_number(data, "norm_eps", path, 1e-5, why=_EPS_WHY),
        rope_theta=fields.positive_number(data, "rope_theta", path, 1e6, why=_THETA_WHY),
        max_seq_len=context or MISTRAL_DEFAULT_CONTEXT,
        sliding_window=fields.sliding_window(data, path, ("sliding_window", "_sliding_window")),
        eos_token_ids=(),  # mistral-inference stops at the tokenizer's EOS
        max_seq_len_source=f"max_seq_len in {path}" if context else
        f"{path} gives no max_seq_len: Mixtral's {MISTRAL_DEFAULT_CONTEXT}",
    )
