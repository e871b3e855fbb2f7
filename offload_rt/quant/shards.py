"""Which tensors go in which file of a quantized folder (docs/quantized_format.md, "Files").

Each shard holds whole layers: the experts of its layers first (records are multiples of 4 KiB,
so all of them start 4 KiB-aligned after the aligned header; an fp8 folder's experts are their
weights and scales), then those layers' trunk tensors (an int8 trunk matrix: weight and scale).
The embedding opens the first shard's trunk part; the final norm and the LM head close the last
shard. Shards are filled greedily up to ``shard_size`` bytes; a layer larger than that gets a
shard of its own. Files are named as ``save_pretrained`` names shards
(``model-00001-of-00003.safetensors``) and listed in ``model.safetensors.index.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from offload_rt.config import ModelConfig
from offload_rt.quant.writer import TensorEntry

INDEX_FILE = "model.safetensors.index.json"
FIRST_GLOBALS, LAST_GLOBALS = ("embed",), ("norm", "lm_head")
Trunk = dict[str, tuple[TensorEntry, ...]]  # canonical name -> the tensors it is stored as
Experts = Callable[[int, int], tuple[TensorEntry, ...]]  # (layer, expert) -> its tensors


@dataclass(frozen=True)
class ShardPlan:
    """One output file: its name, the layers whose experts it holds, and the trunk tensors
    (canonical names, ``tensor_names``) after them; ``entries`` lists all in file order."""

    file: str
    layers: tuple[int, ...]
    trunk: tuple[str, ...]
    entries: tuple[TensorEntry, ...]


def _layer_trunk(trunk: Trunk, layer: int) -> list[str]:
    prefix = f"layers.{layer}."
    return [c for c in trunk if c.startswith(prefix)]


def _nbytes(entries: tuple[TensorEntry, ...]) -> int:
    return sum(e.nbytes for e in entries)


def _group_layers(cfg: ModelConfig, experts: Experts, trunk: Trunk,
                  shard_size: int) -> list[list[int]]:
    """Consecutive layers per shard, greedily up to ``shard_size`` bytes."""
    groups: list[list[int]] = [[]]
    size = sum(_nbytes(trunk[c]) for c in FIRST_GLOBALS if c in trunk)
    for layer in range(cfg.num_layers):
        layer_bytes = sum(_nbytes(experts(layer, e)) for e in range(cfg.num_experts)) + sum(
            _nbytes(trunk[c]) for c in _layer_trunk(trunk, layer))
        if groups[-1] and size + layer_bytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(layer)
        size += layer_bytes
    return groups


def plan_shards(cfg: ModelConfig, experts: Experts, trunk: Trunk,
                shard_size: int) -> list[ShardPlan]:
    """The files of a quantized folder. ``experts``: the entries one expert is written as
    (a record, or fp8 weights and scales); ``trunk``: canonical name -> its output entries
    (HF names), for every trunk tensor the model has."""
    groups = _group_layers(cfg, experts, trunk, shard_size)
    plans = []
    for k, layers in enumerate(groups):
        names: list[str] = [c for c in FIRST_GLOBALS if c in trunk] if k == 0 else []
        for layer in layers:
            names += _layer_trunk(trunk, layer)
        if k == len(groups) - 1:
            names += [c for c in LAST_GLOBALS if c in trunk]
        stored = [entry for layer in layers for e in range(cfg.num_experts)
                  for entry in experts(layer, e)]
        stored += [entry for c in names for entry in trunk[c]]
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        plans.append(ShardPlan(file, tuple(layers), tuple(names), tuple(stored)))
    return plans


def index_json(plans: list[ShardPlan]) -> dict[str, object]:
    """``model.safetensors.index.json``: total data bytes and tensor name -> file."""
    weight_map = {e.name: p.file for p in plans for e in p.entries}
    total = sum(e.nbytes for p in plans for e in p.entries)
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
