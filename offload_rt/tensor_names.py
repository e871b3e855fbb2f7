"""Canonical tensor names and their spelling in each supported checkpoint layout.

Canonical names are the runtime's own; each layout maps them to file names. Experts are
addressed separately (``expert_name``) because the engine reads them one at a time.
"""

from __future__ import annotations

from offload_rt.config import ModelConfig

HF, MISTRAL = "hf", "mistral"
EXPERT_MATRICES = ("w1", "w3", "w2")  # packing order in an expert buffer: gate, up, down

_GLOBAL = {
    HF: {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
         "lm_head": "lm_head.weight"},
    MISTRAL: {"embed": "tok_embeddings.weight", "norm": "norm.weight", "lm_head": "output.weight"},
}
_LAYER = {
    HF: {"attn_norm": "model.layers.{i}.input_layernorm.weight",
         "wq": "model.layers.{i}.self_attn.q_proj.weight",
         "wk": "model.layers.{i}.self_attn.k_proj.weight",
         "wv": "model.layers.{i}.self_attn.v_proj.weight",
         "wo": "model.layers.{i}.self_attn.o_proj.weight",
         "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
         "router": "model.layers.{i}.block_sparse_moe.gate.weight"},
    MISTRAL: {"attn_norm": "layers.{i}.attention_norm.weight",
              "wq": "layers.{i}.attention.wq.weight",
              "wk": "layers.{i}.attention.wk.weight",
              "wv": "layers.{i}.attention.wv.weight",
              "wo": "layers.{i}.attention.wo.weight",
              "ffn_norm": "layers.{i}.ffn_norm.weight",
              "router": "layers.{i}.feed_forward.gate.weight"},
}
_EXPERT = {
    HF: "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight",
    MISTRAL: "layers.{i}.feed_forward.experts.{e}.{w}.weight",
}
# A quantized folder (docs/quantized_format.md, HF layout only) stores each expert as one
# uint8 record instead of its three matrices.
_RECORD = "model.layers.{i}.block_sparse_moe.experts.{e}.record"
# Buffers some exporters add that carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def trunk_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> expected shape of every resident (non-expert) tensor."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed": (cfg.vocab_size, h), "norm": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, h)
    per_layer = {"attn_norm": (h,), "wq": (q, h), "wk": (kv, h), "wv": (kv, h), "wo": (h, q),
                 "ffn_norm": (h,), "router": (cfg.num_experts, h)}
    for i in range(cfg.num_layers):
        for part, shape in per_layer.items():
            shapes[f"layers.{i}.{part}"] = shape
    return shapes


def expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Matrix name -> shape within one expert."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    return {"w1": (f, h), "w3": (f, h), "w2": (h, f)}


def file_name(layout: str, canonical: str) -> str:
    """The name a canonical trunk tensor has in ``layout``'s files."""
    if canonical.startswith("layers."):
        _, index, part = canonical.split(".", 2)
        return _LAYER[layout][part].format(i=index)
    return _GLOBAL[layout][canonical]


def expert_name(layout: str, layer: int, expert: int, matrix: str) -> str:
    """The file name of matrix ``w1|w2|w3`` of one expert in ``layout``."""
    return _EXPERT[layout].format(i=layer, e=expert, w=matrix)


def record_name(layer: int, expert: int) -> str:
    """The file name of one expert's record in a quantized (HF layout) folder."""
    return _RECORD.format(i=layer, e=expert)
