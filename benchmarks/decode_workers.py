"""The workers of ``decode_bench.py``: one generation per fresh process, offload_rt (with the
engine's decode-step figures) or transformers (+ accelerate disk offload)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
from physical_limit import drop_page_cache, model_files

from offload_rt.engine.step_clock import StepClock


def _read_bytes() -> dict[str, float]:
    """Bytes this process really read from the device (/proc/self/io)."""
    return {"read_bytes": float(psutil.Process().io_counters().read_bytes)}


def step_clock(stats: object) -> StepClock:
    return StepClock(stats, extra=_read_bytes)  # type: ignore[arg-type]


def decode_figures(clock: StepClock, expert_bytes: int) -> dict:
    """Decode-step figures; ``expert_bytes``: one expert's bytes in its file (a record, or the
    float matrices quantized at load), what ``bytes_from_disk`` counts per load."""
    total = clock.decode_totals()
    if not total:
        return {}
    n = int(total["steps"])
    needed = total["hits"] + total["misses"]
    required = total["misses"] + total["prefetch_useful"]
    disk_loads = total["bytes_from_disk"] / expert_bytes
    return {# seconds the disk was busy per expert it delivered (overlapping reads counted once)
            "disk_busy_s_per_load": (round(total["disk_busy_s"] / disk_loads, 6)
                                     if disk_loads and total["disk_busy_s"] else None),
            "decode_steps_measured": n, "decode_forward_s": round(total["t"], 6),
            "hit_rate": round(total["hits"] / needed, 4) if needed else None,
            "misses_per_token": total["misses"] / n,
            "loads_per_token": total["bytes_from_disk"] / expert_bytes / n,
            "required_loads_per_token": required / n,
            "prefetch_overlap": round(total["prefetch_useful"] / required, 4) if required else 0.0,
            "bytes_per_token": total["bytes_from_disk"] / n,
            "disk_read_bytes_per_token": total["read_bytes"] / n,
            "stall_fraction": round(total["stall_s"] / total["t"], 4) if total["t"] else 0.0,
            "prefetch_wasted_per_token": total["prefetch_wasted"] / n}


def run_offload_rt(spec: dict, fraction: float, cache: str) -> dict:
    import torch

    import offload_rt

    start = time.perf_counter()
    opts: dict = {"max_seq_len": len(spec["prompt"]) + spec["new_tokens"] + 8,
                  **spec.get("load_options", {})}
    if fraction >= 1.0:
        opts["offload"] = False
    else:
        with open(Path(spec["model_dir"]) / "config.json") as f:
            experts = json.load(f)["num_local_experts"]
        opts.update(offload=True, cache_experts=max(1, round(fraction * experts)),
                    drop_page_cache=cache == "cold")
    rt = offload_rt.load(spec["model_dir"], **opts)
    load_s = time.perf_counter() - start
    if cache == "cold":  # loading the trunk read ahead into expert bytes: start truly cold
        drop_page_cache(model_files(Path(spec["model_dir"])))
    clock = step_clock(rt.stats)
    with clock.attached(rt.model):
        out = rt.generate(spec["prompt"], max_new_tokens=spec["new_tokens"], ignore_eos=True,
                          temperature=0.0)
    s = out.stats
    res = {"engine": "offload_rt", "options": opts, "load_s": round(load_s, 3),
           "token_ids": out.token_ids, "decode_tokens_per_s": s["decode_tokens_per_s"],
           "tokens_per_s": s["tokens_per_s"], "time_to_first_token_s": s["time_to_first_token_s"],
           "engine_stats": {k: v for k, v in s.items() if k != "per_layer"},
           "expert_format": rt.expert_format.spec(), "record_bytes": rt.expert_format.nbytes,
           "quant_kernel": rt.options.quant_kernel or "torch",
           "torch_threads": torch.get_num_threads(),
           "rss_after_bytes": psutil.Process().memory_info().rss}
    if fraction < 1.0:
        res.update(decode_figures(clock, rt.checkpoint.expert(0, 0).nbytes))
    rt.close()
    return res


def accelerate_device_map(cfg: dict, fraction: float) -> dict[str, str]:
    """Trunk in RAM; the experts of the first ``fraction`` of the layers in RAM, the rest on
    disk: the same expert bytes in RAM as offload_rt's cache at ``fraction``."""
    layers = cfg["num_hidden_layers"]
    keep = round(fraction * layers)
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
          "lm_head": "cpu"}
    for i in range(layers):
        p = f"model.layers.{i}."
        dm.update({p + m: "cpu" for m in ("self_attn", "input_layernorm",
                                          "post_attention_layernorm", "mlp.gate")})
        dm[p + "mlp.experts"] = "cpu" if i < keep else "disk"
    return dm


def run_transformers(spec: dict, fraction: float, cache: str) -> dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList, MixtralForCausalLM

    model_dir, folder = Path(spec["model_dir"]), Path(spec["offload_folder"])
    cfg = json.loads((model_dir / "config.json").read_text())
    start = time.perf_counter()
    kwargs: dict = {"dtype": torch.bfloat16}
    if fraction < 1.0:
        kwargs.update(device_map=accelerate_device_map(cfg, fraction), offload_folder=folder)
    model = MixtralForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    load_s = time.perf_counter() - start
    files = model_files(model_dir) + ([folder] if fraction < 1.0 else [])
    os.sync()  # the offload folder was just written: dirty pages cannot be evicted
    if cache == "bounded":
        drop_page_cache(files)
    io, evict_s, stamps = psutil.Process(), [], []

    class Clock(LogitsProcessor):
        """Called once per generated token, after its forward: time it, evict for the next."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            stamps.append((time.perf_counter(), io.io_counters().read_bytes))
            evict_s.append(drop_page_cache(files) if cache == "bounded" else 0.0)
            return scores

    model.generation_config.eos_token_id = None
    ids = torch.tensor([spec["prompt"]])
    begin = time.perf_counter()
    with torch.inference_mode():
        gen = model.generate(ids, max_new_tokens=spec["new_tokens"], do_sample=False,
                             pad_token_id=0, logits_processor=LogitsProcessorList([Clock()]))
    total = time.perf_counter() - begin
    n = len(stamps)
    decode_s = stamps[-1][0] - stamps[0][0] - sum(evict_s[:-1])
    return {"engine": "transformers" if fraction >= 1.0 else "transformers+accelerate",
            "device_map_disk_layers": sum(v == "disk" for v in kwargs.get("device_map", {})
                                          .values()),
            "load_s": round(load_s, 3), "token_ids": gen[0, ids.shape[1]:].tolist(),
            "decode_tokens_per_s": round((n - 1) / decode_s, 3) if n > 1 else None,
            "tokens_per_s": round(n / (total - sum(evict_s)), 3),
            "time_to_first_token_s": round(stamps[0][0] - begin, 6),
            "evict_s_per_token": round(sum(evict_s) / n, 6),
            "disk_read_bytes_per_token": (stamps[-1][1] - stamps[0][1]) / max(1, n - 1),
            "rss_after_bytes": io.memory_info().rss}
