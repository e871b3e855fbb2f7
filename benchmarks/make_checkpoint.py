"""Seeded random-weight MoE checkpoints in the Hugging Face layout, at named sizes.

    python benchmarks/make_checkpoint.py small --out /tmp/bench/small [--seed 0] [--check]
    python benchmarks/make_checkpoint.py qwen3moe-small --out /tmp/bench/qwen3moe-small --check

Presets are Mixtral-shaped unless they name another family (``qwen3moe-small``: Qwen3-MoE's
128 experts top-8, q/k norms per head, head_dim twice hidden / heads); tensor names and
config.json are the family's (``offload_rt.families``, transformers' config class).

Tensors are drawn layer by layer from a ``torch.Generator`` seeded with (seed, layer), written
as bfloat16 safetensors (sharded, with ``model.safetensors.index.json``, when a preset is larger
than one shard), so no fp32 copy of the whole model ever exists. ``config.json`` is written by
transformers' ``MixtralConfig``, so both offload_rt and transformers read the folder.

Why not transformers' init: std-0.02 weights route almost every token to the same one or two
experts, which would make every expert cache look perfect. Here the embeddings are unit-scale,
every matrix is scaled by 1/sqrt(fan_in) (so each branch keeps unit scale), the residual
branches' output projections (o_proj, w2) by 1/sqrt(2 * layers) (so the residual stream stays
dominated by the token, not by what all layers add) and the router by ``ROUTER_GAIN``: routing
then varies from token to token. ``check_routing`` proves it (``--check``): every expert of
every layer is picked during a 64-token greedy decode.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

ROUTER_GAIN = 2.0  # router logits ~ N(0, 2^2): top-2 is decided per token, not by a bias
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    intermediate: int
    vocab: int
    max_positions: int = 4096
    shard_bytes: int = 2 * 2**30  # largest shard; a bigger model is split with an index
    family: str = "mixtral"  # config.json's model_type (offload_rt.families)
    head_dim: int | None = None  # None: hidden / heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def expert_bytes(self) -> int:
        return 2 * 3 * self.hidden * self.intermediate

    @property
    def total_bytes(self) -> int:
        h, d = self.hidden, self.head_size
        attn = 2 * h * self.heads * d + 2 * h * self.kv_heads * d
        per_layer = attn + 2 * h + self.experts * h + self.experts * self.expert_bytes // 2
        return 2 * (self.layers * per_layer + h + 2 * self.vocab * h)


PRESETS = {
    "tiny": Preset(hidden=64, layers=2, heads=4, kv_heads=2, experts=8, top_k=2,
                   intermediate=128, vocab=512),
    "small": Preset(hidden=1024, layers=8, heads=16, kv_heads=4, experts=8, top_k=2,
                    intermediate=3584, vocab=32000),  # ~1.6 GB
    "medium": Preset(hidden=2048, layers=10, heads=16, kv_heads=4, experts=8, top_k=2,
                     intermediate=5632, vocab=32000),  # ~6 GB
    "mixtral-8x7b": Preset(hidden=4096, layers=32, heads=32, kv_heads=8, experts=8, top_k=2,
                           intermediate=14336, vocab=32000, max_positions=32768,
                           shard_bytes=5 * 2**30),  # ~93 GB, for GPU machines
    # Qwen3-30B-A3B's routing (128 experts top-8, head_dim 128) at a width this machine runs
    "qwen3moe-small": Preset(hidden=512, layers=8, heads=8, kv_heads=2, experts=128, top_k=8,
                             intermediate=384, vocab=32000, family="qwen3_moe",
                             head_dim=128),  # ~1.3 GB, one expert 1.1 MiB
}


def _qwen3_moe_config(p: Preset) -> dict:
    """config.json of a Qwen3-MoE preset, as transformers' Qwen3MoeConfig writes it (Qwen3's
    files name the experts ``num_experts``, as here)."""
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=p.vocab, hidden_size=p.hidden,
                         intermediate_size=3 * p.intermediate, moe_intermediate_size=p.intermediate,
                         num_hidden_layers=p.layers, num_attention_heads=p.heads,
                         num_key_value_heads=p.kv_heads, head_dim=p.head_size,
                         num_experts=p.experts, num_experts_per_tok=p.top_k, norm_topk_prob=True,
                         max_position_embeddings=p.max_positions, rms_norm_eps=1e-6,
                         tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    data = cfg.to_dict()
    data["num_experts"] = data.pop("num_local_experts", p.experts)
    data["dtype"] = data["torch_dtype"] = "bfloat16"
    return data


def hf_config(p: Preset) -> dict:
    """config.json as transformers writes it for these shapes."""
    if p.family == "qwen3_moe":
        return _qwen3_moe_config(p)
    from transformers import MixtralConfig  # lazy: only needed to write the folder

    cfg = MixtralConfig(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate,
                        num_hidden_layers=p.layers, num_attention_heads=p.heads,
                        num_key_value_heads=p.kv_heads, num_local_experts=p.experts,
                        num_experts_per_tok=p.top_k, max_position_embeddings=p.max_positions,
                        rms_norm_eps=1e-5, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    cfg.architectures = ["MixtralForCausalLM"]
    data = cfg.to_dict()
    data["dtype"] = data["torch_dtype"] = "bfloat16"
    return data


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """N(0, std^2) drawn in float32 (reproducible across machines), stored as bfloat16."""
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def _gain(gen: torch.Generator, dim: int) -> torch.Tensor:
    return (1.0 + 0.05 * torch.randn(dim, generator=gen)).to(torch.bfloat16)


def layer_tensors(p: Preset, layer: int, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """One decoder layer's tensors under the family's HF names, from its own generator (a
    family's extra parts are drawn last, so a Mixtral preset's draws never change)."""
    from offload_rt.tensor_names import HF, names_of

    names = names_of(HF, p.family)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer + 1)
    h, d = p.hidden, p.head_size
    branch = 1.0 / math.sqrt(2 * p.layers)

    def name(part: str) -> str:
        return names.file_name(f"layers.{layer}.{part}")

    yield name("attn_norm"), _gain(gen, h)
    yield name("ffn_norm"), _gain(gen, h)
    yield name("wq"), _normal(gen, (p.heads * d, h), h ** -0.5)
    yield name("wk"), _normal(gen, (p.kv_heads * d, h), h ** -0.5)
    yield name("wv"), _normal(gen, (p.kv_heads * d, h), h ** -0.5)
    yield name("wo"), _normal(gen, (h, p.heads * d), branch * (p.heads * d) ** -0.5)
    yield name("router"), _normal(gen, (p.experts, h), ROUTER_GAIN * h ** -0.5)
    for e in range(p.experts):
        yield names.expert_name(layer, e, "w1"), _normal(gen, (p.intermediate, h), h ** -0.5)
        yield names.expert_name(layer, e, "w3"), _normal(gen, (p.intermediate, h), h ** -0.5)
        yield names.expert_name(layer, e, "w2"), _normal(gen, (h, p.intermediate),
                                                        branch * p.intermediate ** -0.5)
    if p.family == "qwen3_moe":  # q/k RMSNorm per head
        yield name("q_norm"), _gain(gen, d)
        yield name("k_norm"), _gain(gen, d)


def outer_tensors(p: Preset, seed: int) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and LM head."""
    gen = torch.Generator().manual_seed(seed * 1_000_003)
    return {"model.embed_tokens.weight": _normal(gen, (p.vocab, p.hidden), 1.0),
            "model.norm.weight": _gain(gen, p.hidden),
            "lm_head.weight": _normal(gen, (p.vocab, p.hidden), p.hidden ** -0.5)}


def write_checkpoint(p: Preset, out: Path, seed: int = 0) -> Path:
    """Write config.json and the weights; one shard per group of layers up to shard_bytes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(p), indent=2))
    shards: list[dict[str, torch.Tensor]] = [outer_tensors(p, seed)]
    size = sum(t.numel() * 2 for t in shards[0].values())
    for layer in range(p.layers):
        tensors = dict(layer_tensors(p, layer, seed))
        nbytes = sum(t.numel() * 2 for t in tensors.values())
        if size + nbytes > p.shard_bytes and shards[-1]:
            _flush(shards, out)
            shards.append({})
            size = 0
        shards[-1].update(tensors)
        size += nbytes
    _flush(shards, out, last=True)
    return out


def _flush(shards: list[dict[str, torch.Tensor]], out: Path, last: bool = False) -> None:
    """Write the newest shard to a temporary name; at the end rename all and write the index."""
    n = len(shards)
    save_file(shards[-1], str(out / f"shard-{n:05d}.tmp"), metadata={"format": "pt"})
    shards[-1] = {name: torch.empty(0) for name in shards[-1]}  # keep names, free the bytes
    if not last:
        return
    for old in out.glob("model*.safetensors"):
        old.unlink()
    (out / INDEX).unlink(missing_ok=True)
    if n == 1:
        (out / "shard-00001.tmp").rename(out / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, names in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        (out / f"shard-{i:05d}.tmp").rename(out / name)
        weight_map.update({t: name for t in names})
        total += (out / name).stat().st_size
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": weight_map}, indent=2))


# --- the routing check ------------------------------------------------------------------------


class _RouteRecorder:
    """An ExpertProvider wrapper that records which experts each decode step picks."""

    def __init__(self, inner: object, layers: int, experts: int) -> None:
        self.inner = inner
        self.picks = torch.zeros(layers, experts, dtype=torch.int64)  # decode steps only
        self.steps = 0

    def max_group(self, layer: int) -> int:
        return self.inner.max_group(layer)

    def acquire(self, layer: int, experts: list[int]):
        return self.inner.acquire(layer, experts)

    def observe(self, layer: int, hidden: torch.Tensor) -> None:
        self.inner.observe(layer, hidden)

    def on_route(self, layer: int, probs: torch.Tensor, ids: torch.Tensor) -> None:
        if ids.shape[0] == 1:  # a decode step
            self.picks[layer].index_add_(0, ids[0], torch.ones_like(ids[0]))
            self.steps += layer == 0
        self.inner.on_route(layer, probs, ids)


def check_routing(model_dir: Path, tokens: int = 64, seed: int = 0) -> dict:
    """Greedy-decode ``tokens`` tokens (resident offload_rt) and count each expert's picks.

    ``ok`` is true when every expert of every layer was picked at least once; ``top_share`` is
    the largest fraction of one layer's picks that went to a single expert (1/E * top_k is
    uniform; near 1 means degenerate routing). ``distinct_tokens`` guards against a decode
    stuck in a short loop (which would make caching look better than it is).
    """
    import offload_rt  # lazy: writing a checkpoint does not need the runtime

    rt = offload_rt.load(model_dir, offload=False, max_seq_len=tokens + 16)
    cfg = rt.config
    recorder = _RouteRecorder(rt.experts, cfg.num_layers, cfg.num_experts)
    rt.model.attach(recorder, rt.max_seq_len)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, cfg.vocab_size, (8,), generator=gen).tolist()
    out = rt.generate(prompt, max_new_tokens=tokens, ignore_eos=True, temperature=0.0)
    rt.close()
    picks = recorder.picks
    share = (picks.max(dim=1).values / picks.sum(dim=1).clamp(min=1)).max().item()
    return {"ok": bool((picks > 0).all()), "decode_steps": recorder.steps,
            "picks_per_layer": picks.tolist(), "min_picks": int(picks.min()),
            "top_share": round(share, 3), "distinct_tokens": len(set(out.token_ids))}


def write_quantized_checkpoint(p: Preset, out: Path, seed: int, experts: str,
                               group_size: int | None) -> dict:
    """``p``'s seeded model with ``experts``-format experts written straight to ``out`` (no
    float copy), with a progress bar; what ``offload-rt quantize`` reports."""
    from synthetic_source import SyntheticSource
    from tqdm import tqdm

    from offload_rt.quant.quantize import QuantizeSettings, write_quantized

    settings = QuantizeSettings(experts, group_size, force=True)
    with tqdm(total=p.layers * p.experts, unit="expert", desc="experts") as bar:
        summary = write_quantized(SyntheticSource(p, seed), out, settings,
                                  lambda done, total: bar.update(done - bar.n))
    return {"format": summary.format, "bytes_out": summary.bytes_out,
            "bytes_in": summary.bytes_in, "seconds": round(summary.seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true",
                        help="after writing (or with --no-write), check routing is not degenerate")
    parser.add_argument("--no-write", action="store_true", help="only run --check on --out")
    parser.add_argument("--layers", type=int, help="override the preset's layer count (e.g. a "
                                                   "few Mixtral 8x7B layers on a small disk)")
    parser.add_argument("--experts", choices=("int8", "int4"),
                        help="write the experts quantized directly (synthetic_source.py): no "
                             "float copy on disk; as make_checkpoint + offload-rt quantize")
    parser.add_argument("--group-size", type=int, help="with --experts int4 (default 64)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.layers:
        preset = replace(preset, layers=args.layers)
    report: dict = {"preset": args.preset, "out": str(args.out), "seed": args.seed,
                    "shapes": asdict(preset), "expert_bytes": preset.expert_bytes,
                    "approx_total_bytes": preset.total_bytes}
    if not args.no_write and args.experts:
        report["quantize"] = write_quantized_checkpoint(preset, args.out, args.seed,
                                                        args.experts, args.group_size)
    elif not args.no_write:
        write_checkpoint(preset, args.out, args.seed)
        report["written_bytes"] = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    if args.check or args.no_write:
        # ~16 picks per expert and layer: 64 decode steps for 8 experts top-2, 256 for 128 top-8
        report["routing"] = check_routing(args.out, max(64, 16 * preset.experts // preset.top_k))
    print(json.dumps(report))
    return 0 if report.get("routing", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
