"""OLMoE (``model_type: olmoe``, OLMoE-1B-7B: 64 experts, top-8).

What it adds to Mixtral: an RMSNorm over the whole query and key projections (weights
[heads * head_dim] and [kv_heads * head_dim], before the heads are split), then optionally
q, k and v clamped to [-clip_qkv, clip_qkv]; the top-k weights are not renormalized unless
``norm_topk_prob``. transformers: ``models/olmoe/modeling_olmoe.py`` (``OlmoeAttention``,
``OlmoeTopKRouter``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offload_rt import model_fields as fields
from offload_rt.errors import CheckpointError
from offload_rt.families.base import (
    HF,
    PROJ_MATRICES,
    Family,
    experts,
    head_dim,
    hf_names,
    refuse_true,
)

H, R = fields.HONOURED, fields.REFUSED
FIELDS = {
    **fields.COMMON_HF_FIELDS,
    **dict.fromkeys(("intermediate_size", "num_experts", "num_local_experts", "norm_topk_prob",
                     "clip_qkv"), H),
    **dict.fromkeys(("head_dim", "attention_bias"), R),
}


def _head_dim(data: dict[str, Any], path: Path) -> int:
    """OLMoE's q_norm spans hidden_size: heads * head_dim must equal it (transformers fails
    on a model where it does not)."""
    hd, hidden = head_dim(data, path), fields.integer(data, "hidden_size", path)
    heads = fields.integer(data, "num_attention_heads", path)
    if hd * heads != hidden:
        raise CheckpointError(f"{path}: field 'head_dim' {hd} x num_attention_heads {heads} "
                              f"is not hidden_size {hidden}; OLMoE's q/k norms span "
                              "hidden_size, so head_dim must be hidden_size / heads")
    return hd


def _clip(data: dict[str, Any], path: Path) -> float | None:
    if data.get("clip_qkv") is None:
        return None
    return fields.positive_number(data, "clip_qkv", path, 0.0,
                                  why=" (q, k and v are clamped to [-clip_qkv, clip_qkv])")


def read(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """OlmoeConfig's own fields (``Family.read``)."""
    refuse_true(data, "attention_bias", path, "OLMoE's projections have no biases")
    return {"intermediate_size": fields.integer(data, "intermediate_size", path),
            "head_dim": _head_dim(data, path),
            "num_experts": experts(data, path, ("num_experts", "num_local_experts")),
            "norm_topk_prob": fields.flag(data, "norm_topk_prob", path, False),
            "qk_norm": "projection", "clip_qkv": _clip(data, path)}


OLMOE = Family(
    model_type="olmoe", architecture="OlmoeForCausalLM", fields=FIELDS, read=read,
    names={HF: hf_names("mlp", PROJ_MATRICES)},
    parts="q/k RMSNorm over the whole projection; clip_qkv; no top-k renormalization",
    rms_norm_eps=1e-5, eos_token_ids=(50279,))
