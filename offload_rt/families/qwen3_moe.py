"""Qwen3-MoE (``model_type: qwen3_moe``, Qwen3-30B-A3B, Qwen3-235B-A22B: 128 experts, top-8).

What it adds to Mixtral: an RMSNorm over each head's query and key (``q_norm``/``k_norm``,
weights [head_dim]) before RoPE, top-k weights renormalized only with ``norm_topk_prob``, and
a ``head_dim`` of its own (128 where hidden / heads is 64). transformers:
``models/qwen3_moe/modeling_qwen3_moe.py`` (``Qwen3MoeAttention``, ``Qwen3MoeTopKRouter``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offload_rt import model_fields as fields
from offload_rt.families.base import (
    HF,
    PROJ_MATRICES,
    Family,
    experts,
    head_dim,
    hf_names,
    refuse_true,
    sparse_every_layer,
)

H, S, R = fields.HONOURED, fields.HARMLESS, fields.REFUSED
FIELDS = {
    **fields.COMMON_HF_FIELDS,
    **dict.fromkeys(("head_dim", "num_experts", "num_local_experts", "moe_intermediate_size",
                     "norm_topk_prob", "use_sliding_window", "sliding_window"), H),
    "intermediate_size": S,
    **dict.fromkeys(("decoder_sparse_step", "mlp_only_layers", "attention_bias"), R),
}


def read(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Qwen3MoeConfig's own fields (``Family.read``). ``use_sliding_window`` true windows every
    layer (transformers' sliding-window mask for all of them, as Mixtral's)."""
    sparse_every_layer(data, path)
    refuse_true(data, "attention_bias", path, "Qwen3-MoE's projections have no biases")
    windowed = fields.flag(data, "use_sliding_window", path) \
        if data.get("use_sliding_window") is not None else False
    return {"intermediate_size": fields.integer(data, "moe_intermediate_size", path),
            "head_dim": head_dim(data, path),
            "num_experts": experts(data, path, ("num_experts", "num_local_experts")),
            "norm_topk_prob": fields.flag(data, "norm_topk_prob", path, False),
            "qk_norm": "head",
            "sliding_window": fields.sliding_window(data, path, ("sliding_window",))
            if windowed else None}


QWEN3_MOE = Family(
    model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", fields=FIELDS, read=read,
    names={HF: hf_names("mlp", PROJ_MATRICES)},
    parts="q/k RMSNorm per head; norm_topk_prob; head_dim; use_sliding_window (every layer)")
