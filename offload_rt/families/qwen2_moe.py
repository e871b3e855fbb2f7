"""Qwen2-MoE (``model_type: qwen2_moe``, Qwen1.5-MoE, Qwen2-57B-A14B).

What it adds to Mixtral: biases on q/k/v (``qkv_bias``), top-k weights renormalized only with
``norm_topk_prob``, and a shared expert beside the routed ones, always active and scaled by a
sigmoid gate: ``moe(x) + sigmoid(shared_expert_gate x) * shared_expert(x)``; the shared expert
is resident (trunk). transformers: ``models/qwen2_moe/modeling_qwen2_moe.py``
(``Qwen2MoeSparseMoeBlock``, ``Qwen2MoeTopKRouter``).
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
    sparse_every_layer,
)

H, S, R = fields.HONOURED, fields.HARMLESS, fields.REFUSED
FIELDS = {
    **fields.COMMON_HF_FIELDS,
    **dict.fromkeys(("head_dim", "num_experts", "moe_intermediate_size",
                     "shared_expert_intermediate_size", "norm_topk_prob", "qkv_bias"), H),
    **dict.fromkeys(("intermediate_size", "sliding_window", "max_window_layers"), S),
    **dict.fromkeys(("decoder_sparse_step", "mlp_only_layers", "use_sliding_window",
                     "layer_types"), R),
}


def full_attention(data: dict[str, Any], path: Path) -> None:
    """Qwen2-MoE's sliding window covers some layers only (``layer_types``: odd layers below
    ``max_window_layers``): not implemented, so ``use_sliding_window`` true and any layer type
    but ``full_attention`` are refused."""
    if data.get("use_sliding_window") is not None and fields.flag(data, "use_sliding_window",
                                                                  path):
        raise CheckpointError(f"{path}: use_sliding_window true is not supported for "
                              "qwen2_moe: its window covers only some layers "
                              "(max_window_layers, layer_types)")
    types = data.get("layer_types") or []
    other = sorted({t for t in types if t != "full_attention"}, key=str) \
        if isinstance(types, list) else [types]
    if other:
        raise CheckpointError(f"{path}: field 'layer_types' has {other[0]!r}; offload_rt "
                              "implements 'full_attention' layers only for qwen2_moe")


def read(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Qwen2MoeConfig's own fields (``Family.read``)."""
    sparse_every_layer(data, path)
    full_attention(data, path)
    return {"intermediate_size": fields.integer(data, "moe_intermediate_size", path),
            "head_dim": head_dim(data, path),
            "num_experts": experts(data, path, ("num_experts",)),
            "norm_topk_prob": fields.flag(data, "norm_topk_prob", path, False),
            "qkv_bias": fields.flag(data, "qkv_bias", path, True),
            "shared_expert_size": fields.integer(data, "shared_expert_intermediate_size", path)}


QWEN2_MOE = Family(
    model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", fields=FIELDS, read=read,
    names={HF: hf_names("mlp", PROJ_MATRICES)},
    parts="q/k/v biases; norm_topk_prob; a shared expert (resident) with a sigmoid gate")
