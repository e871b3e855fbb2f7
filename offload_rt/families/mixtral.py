"""Mixtral (``model_type: mixtral``): the seed family, in both folder layouts.

Softmax over the experts, top-k, the k weights renormalized to sum to 1; attention without
biases or q/k norms; every layer an MoE layer; an optional sliding window for every layer.
transformers: ``models/mixtral/modeling_mixtral.py``; mistral-inference for ``params.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offload_rt import model_fields as fields
from offload_rt.families.base import (
    HF,
    MISTRAL,
    Family,
    TensorNames,
    head_dim,
    hf_names,
    refuse_true,
)

_MISTRAL_NAMES = TensorNames(
    {"embed": "tok_embeddings.weight", "norm": "norm.weight", "lm_head": "output.weight",
     "attn_norm": "layers.{i}.attention_norm.weight",
     **{f"w{p}": f"layers.{{i}}.attention.w{p}.weight" for p in "qkvo"},
     "ffn_norm": "layers.{i}.ffn_norm.weight", "router": "layers.{i}.feed_forward.gate.weight"},
    "layers.{i}.feed_forward.experts.{e}.{w}.weight")


def read(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """MixtralConfig's own fields (``Family.read``)."""
    for name in ("attention_bias", "mlp_bias"):
        refuse_true(data, name, path, "Mixtral's projections have no biases")
    return {"intermediate_size": fields.integer(data, "intermediate_size", path),
            "head_dim": head_dim(data, path),
            "num_experts": fields.integer(data, "num_local_experts", path),
            "sliding_window": fields.sliding_window(data, path, ("sliding_window",))}


MIXTRAL = Family(
    model_type="mixtral", architecture="MixtralForCausalLM", fields=fields.HF_FIELDS, read=read,
    names={HF: hf_names("block_sparse_moe"), MISTRAL: _MISTRAL_NAMES},
    parts="softmax, top-k, renormalized; no biases, no q/k norm; optional sliding window",
    rms_norm_eps=1e-5, rope_theta=1e6, eos_token_ids=(2,))
