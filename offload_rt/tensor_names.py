"""Canonical tensor names, their shapes, and their spelling in each family's files.

Canonical names are the runtime's own (``embed``, ``layers.3.wq``, ``layers.3.q_norm``...);
each family (``offload_rt.families``) maps them to file names per layout (``TensorNames``).
Experts are addressed separately (``expert_name``) because the engine reads them one at a time.
Which optional trunk parts a model has follows from its config (``trunk_shapes``).
"""

from __future__ import annotations

from collections.abc import Collection

from offload_rt import families
from offload_rt.config import ModelConfig
from offload_rt.families.base import EXPERT_MATRICES, HF, MISTRAL, TensorNames

__all__ = ["EXPERT_MATRICES", "HF", "IGNORED_SUFFIXES", "MISTRAL", "expert_name", "expert_shapes",
           "file_name", "int8_trunk_shapes", "names_of", "record_name", "trunk_numel",
           "trunk_shapes"]

# Buffers some exporters add that carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
INT8_TRUNK_PARTS = ("wq", "wk", "wv", "wo")  # layer parts an int8 trunk quantizes (+ lm_head)


def _layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical part -> shape of one layer's resident tensors: attention, norms, router and
    the optional parts the config names (q/k/v biases, q/k norms, a shared expert)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "attn_norm": (h,), "wq": (q, h), "wk": (kv, h), "wv": (kv, h), "wo": (h, q),
        "ffn_norm": (h,), "router": (cfg.num_experts, h)}
    if cfg.qkv_bias:
        shapes.update(bq=(q,), bk=(kv,), bv=(kv,))
    if cfg.qk_norm == "head":
        shapes.update(q_norm=(d,), k_norm=(d,))
    elif cfg.qk_norm == "projection":
        shapes.update(q_norm=(q,), k_norm=(kv,))
    if cfg.shared_expert_size:
        s = cfg.shared_expert_size
        shapes.update(shared_w1=(s, h), shared_w3=(s, h), shared_w2=(h, s), shared_gate=(1, h))
    return shapes


def trunk_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> expected shape of every resident (non-expert) tensor; a shared
    expert is resident, so it is here."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (cfg.vocab_size, h), "norm": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, h)
    per_layer = _layer_shapes(cfg)
    for i in range(cfg.num_layers):
        for part, shape in per_layer.items():
            shapes[f"layers.{i}.{part}"] = shape
    return shapes


def int8_trunk_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Canonical name -> [out, in] of the trunk matrices an int8 trunk (``trunk="int8"``,
    ``model.int8_linear``) holds as int8 with one scale per output channel: every layer's
    attention projections wq, wk, wv, wo (their biases stay float) and the LM head, unless it
    is tied to the embedding (``tie_word_embeddings``: one float tensor, as token lookups need
    its rows). Embeddings, norms, routers and a shared expert stay float."""
    return {name: (shape[0], shape[1]) for name, shape in trunk_shapes(cfg).items()
            if name == "lm_head" or name.rsplit(".", 1)[-1] in INT8_TRUNK_PARTS}


def trunk_numel(cfg: ModelConfig, leave_out: Collection[str] = ()) -> int:
    """Elements of the resident trunk (``trunk_shapes``) but the tensors named in
    ``leave_out`` (e.g. ``int8_trunk_shapes``' when they are int8), for budgets."""
    total = 0
    for name, shape in trunk_shapes(cfg).items():
        if name in leave_out:
            continue
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total


def expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Matrix name -> shape within one expert."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    return {"w1": (f, h), "w3": (f, h), "w2": (h, f)}


def names_of(layout: str, family: str = "mixtral") -> TensorNames:
    """``family``'s tensor names in ``layout`` (HF or MISTRAL); KeyError for a layout the
    family has no files in."""
    return families.get(family).names[layout]


def file_name(layout: str, canonical: str, family: str = "mixtral") -> str:
    """The name a canonical trunk tensor has in ``family``'s files of ``layout``."""
    return names_of(layout, family).file_name(canonical)


def expert_name(layout: str, layer: int, expert: int, matrix: str,
                family: str = "mixtral") -> str:
    """The file name of matrix ``w1|w2|w3`` of one expert in ``layout``."""
    return names_of(layout, family).expert_name(layer, expert, matrix)


def record_name(layer: int, expert: int, family: str = "mixtral") -> str:
    """The file name of one expert's record in a quantized (HF layout) folder."""
    return names_of(HF, family).record_name(layer, expert)
