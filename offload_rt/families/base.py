"""What a model family is: its config.json mapping, its tensor names, its router and block parts.

A family is one module of this package holding one ``Family``, registered by config.json's
``model_type`` (``families/__init__.py``). The runtime never asks which family it runs: the
family's ``read`` turns config.json into ``ModelConfig`` values, among them the *parts* its
blocks have (``norm_topk_prob``, ``qkv_bias``, ``qk_norm``, ``clip_qkv``,
``shared_expert_size``), and the model (``offload_rt/model/``) builds whatever parts the
config names; ``names`` says what each canonical tensor is called in the family's files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offload_rt import model_fields as fields
from offload_rt.errors import CheckpointError

HF, MISTRAL = "hf", "mistral"  # the two folder layouts (config.json / params.json)
EXPERT_MATRICES = ("w1", "w3", "w2")  # packing order in an expert buffer: gate, up, down

# Canonical trunk parts of one layer (``layers.{i}.<part>``) and the parameter each is in
# ``model.transformer.Block``; a family's config decides which of the optional ones exist
# (``tensor_names.trunk_shapes``).
LAYER_PARTS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "router",  # every family
               "bq", "bk", "bv",  # qkv_bias
               "q_norm", "k_norm",  # qk_norm
               "shared_w1", "shared_w3", "shared_w2", "shared_gate")  # shared_expert_size


@dataclass(frozen=True)
class TensorNames:
    """The file names of one family's tensors in one layout.

    ``trunk``: canonical name -> file name; a layer part's name has ``{i}`` for the layer.
    ``expert``: one expert matrix's name with ``{i}`` (layer), ``{e}`` (expert), ``{w}`` (the
    family's name for w1/w3/w2, from ``matrices``). ``record``: one expert's record in a
    quantized folder (docs/quantized_format.md), or None where the layout has none.
    """

    trunk: Mapping[str, str]
    expert: str
    matrices: Mapping[str, str] = field(
        default_factory=lambda: {w: w for w in EXPERT_MATRICES})
    record: str | None = None

    def file_name(self, canonical: str) -> str:
        """``layers.3.wq`` -> ``model.layers.3.self_attn.q_proj.weight`` (KeyError: a part
        this layout has no name for)."""
        if canonical.startswith("layers."):
            _, index, part = canonical.split(".", 2)
            return self.trunk[part].format(i=index)
        return self.trunk[canonical]

    def expert_name(self, layer: int, expert: int, matrix: str) -> str:
        """The file name of matrix ``w1|w3|w2`` of one expert."""
        return self.expert.format(i=layer, e=expert, w=self.matrices[matrix])

    def record_name(self, layer: int, expert: int) -> str:
        if self.record is None:
            raise KeyError("this layout has no expert records")
        return self.record.format(i=layer, e=expert)


def hf_names(moe: str, matrices: Mapping[str, str] | None = None) -> TensorNames:
    """The Hugging Face names every family here shares (Llama-style attention and norms), with
    the MoE block under ``model.layers.{i}.<moe>`` (``block_sparse_moe`` for Mixtral, ``mlp``
    for the others): its ``gate`` (router), ``experts.{e}.<matrix>``, ``shared_expert`` and
    ``shared_expert_gate``."""
    layer, attn = "model.layers.{i}.", "model.layers.{i}.self_attn."
    block = f"{layer}{moe}."
    trunk = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
             "lm_head": "lm_head.weight",
             "attn_norm": layer + "input_layernorm.weight",
             **{f"w{p}": f"{attn}{p}_proj.weight" for p in "qkvo"},
             **{f"b{p}": f"{attn}{p}_proj.bias" for p in "qkv"},
             "q_norm": attn + "q_norm.weight", "k_norm": attn + "k_norm.weight",
             "ffn_norm": layer + "post_attention_layernorm.weight",
             "router": block + "gate.weight",
             "shared_w1": block + "shared_expert.gate_proj.weight",
             "shared_w3": block + "shared_expert.up_proj.weight",
             "shared_w2": block + "shared_expert.down_proj.weight",
             "shared_gate": block + "shared_expert_gate.weight"}
    return TensorNames(trunk, block + "experts.{e}.{w}.weight",
                       matrices or {w: w for w in EXPERT_MATRICES},
                       block + "experts.{e}.record")


# The expert matrices as Qwen and OLMoE name them (SwiGLU: down(silu(gate x) * up x)).
PROJ_MATRICES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

Reader = Callable[[dict[str, Any], Path], dict[str, Any]]


@dataclass(frozen=True)
class Family:
    """One model family. ``read(data, path)`` gives the family's own ``ModelConfig`` values
    (expert counts and sizes, head_dim, the block parts, the router rule, the window) from
    config.json's ``data``, refusing by name what it does not implement; the fields every
    family shares (hidden size, heads, vocabulary, RoPE, context, EOS, dtype) are read by
    ``config.config_from_hf`` with this family's defaults.

    ``fields``: config.json field -> ``model_fields.HONOURED``/``HARMLESS``/``REFUSED``, the
    family's full table (docs/model_fields.md); ``names``: layout -> ``TensorNames``;
    ``architecture``: its class name in config.json's ``architectures``; ``parts``: one line
    saying what its blocks have beyond Mixtral's (README, messages)."""

    model_type: str
    architecture: str
    fields: Mapping[str, str]
    read: Reader
    names: Mapping[str, TensorNames]
    parts: str
    rms_norm_eps: float = 1e-6  # the config class's defaults, for fields a file leaves out
    rope_theta: float = 1e4
    eos_token_ids: tuple[int, ...] = ()


# --- helpers the families' readers share --------------------------------------------------------

def experts(data: dict[str, Any], path: Path, names: tuple[str, ...]) -> int:
    """The experts per layer from the first of ``names`` given (transformers maps one to the
    other: ``attribute_map``); two given with different values are refused."""
    given = [n for n in names if data.get(n) is not None]
    values = {n: fields.integer(data, n, path) for n in given}
    if len(set(values.values())) > 1:
        raise CheckpointError(f"{path}: fields {given[0]!r} ({values[given[0]]}) and "
                              f"{given[1]!r} ({values[given[1]]}) both give the experts per "
                              "layer and disagree; give one")
    if not values:
        raise CheckpointError(f"{path}: missing required field {names[0]!r}")
    return values[given[0]]


def refuse_true(data: dict[str, Any], key: str, path: Path, why: str) -> None:
    """A flag we do not implement: true is refused naming it and ``why``; false or null load."""
    if data.get(key) is not None and fields.flag(data, key, path):
        raise CheckpointError(f"{path}: {key} true is not supported: {why}")


def head_dim(data: dict[str, Any], path: Path) -> int:
    """``head_dim``, null or absent: hidden_size / num_attention_heads."""
    return fields.integer(data, "head_dim", path, fields.integer(data, "hidden_size", path)
                          // fields.integer(data, "num_attention_heads", path))


def sparse_every_layer(data: dict[str, Any], path: Path) -> None:
    """Qwen's dense layers (``Qwen2MoeMLP`` in place of the MoE block) are not implemented:
    ``mlp_only_layers`` must be empty and ``decoder_sparse_step`` 1 (layer i is sparse when
    (i + 1) % step == 0), else the layers they make dense are named."""
    layers = fields.integer(data, "num_hidden_layers", path)
    step = fields.integer(data, "decoder_sparse_step", path, 1)
    dense = data.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
        raise CheckpointError(f"{path}: field 'mlp_only_layers' must be a list of layer "
                              f"indices, got {dense!r}")
    dense_by_step = [i for i in range(layers) if (i + 1) % step]
    for key, which in (("mlp_only_layers", dense), ("decoder_sparse_step", dense_by_step)):
        if which:
            raise CheckpointError(
                f"{path}: field {key!r} makes layers {sorted(which)[:8]} dense MLP layers "
                "(no experts); offload_rt implements models whose every layer is an MoE "
                "layer (mlp_only_layers [] and decoder_sparse_step 1)")
