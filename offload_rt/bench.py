"""``offload-rt bench``: how fast this machine decodes a model with these options, and why.

Runs greedy generations of a seeded random prompt (token ids, so a model folder without a
tokenizer works too) on one loaded runtime and reports medians over the repeats: decode
tokens/s, time to first token, and over the decode steps (one token each; prefill excluded)
the hit rate, expert loads and bytes per token, and how busy each link was while the steps
ran. The links are timed by the engine itself (``EngineStats.disk_busy_s``: seconds with
at least one disk read in flight; ``h2d_busy_s`` likewise for host -> device copies), so no
extra memory is needed to measure the disk. A link busy nearly all the time is the bottleneck;
``link_limit_tokens_per_s`` is what the busiest link allows at the rate it delivered here.

It also reports the process's peak resident memory next to its baseline (Python and torch
before the model is loaded) and the budget, so what the budget covers can be read off.

The first repeat starts with an empty expert cache, later ones with what the previous one left
(as in a chat): compare medians, and use ``--repeats`` >= 3. For comparisons against other
libraries and the hardware see ``benchmarks/`` in the source tree.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from offload_rt.engine.offloaded import OffloadedExperts
from offload_rt.engine.step_clock import StepClock
from offload_rt.errors import OptionError
from offload_rt.process_memory import peak_rss_bytes
from offload_rt.runtime import Runtime

Report = Callable[[int, dict[str, Any]], None]
BUSY_BOUND = 0.7  # a link busy this share of the decode time or more is called the bottleneck


def check_settings(prompt_tokens: int, new_tokens: int, repeats: int) -> None:
    """``OptionError`` unless a bench can measure something (a decode step needs 2 tokens)."""
    if prompt_tokens < 1 or new_tokens < 2 or repeats < 1:
        raise OptionError("bench needs --prompt-tokens >= 1, --new-tokens >= 2 and "
                          "--repeats >= 1")


def bench_prompt(vocab_size: int, tokens: int, seed: int) -> list[int]:
    """``tokens`` seeded ids, avoiding the first few (BOS/EOS/UNK in Mixtral vocabularies)."""
    gen = torch.Generator().manual_seed(seed)
    low = min(3, vocab_size - 1)
    return torch.randint(low, vocab_size, (tokens,), generator=gen).tolist()


ENGINE_FIGURES = ("hit_rate", "loads_per_token", "host_computed_per_token",
                  "prefetch_useful_per_token",
                  "prefetch_wasted_per_token", "bytes_per_token", "disk_bytes_per_token",
                  "stall_fraction", "disk_busy_fraction", "h2d_busy_fraction",
                  "disk_GBps_while_busy", "h2d_GBps_while_busy", "unstalled_s_per_token",
                  "link_limit_tokens_per_s")


def _engine_figures(d: dict[str, float]) -> dict[str, float | None]:
    """The expert engine over ``d``, the decode steps' summed counters (``StepClock``)."""
    n, t = d["steps"], d["t"]
    needed = d["hits"] + d["misses"]
    busiest = max(d["disk_busy_s"], d["h2d_busy_s"])

    def fraction(key: str) -> float:  # a busy interval may have begun between two steps
        return min(1.0, d[key] / t) if t else 0.0

    def rate(nbytes: str, busy: str) -> float | None:
        return d[nbytes] / d[busy] / 1e9 if d[busy] else None

    return {
        "hit_rate": d["hits"] / needed if needed else None,
        # experts moved into the device tier; a miss the CPU computed (hybrid) moved none
        "loads_per_token": (d["misses"] - d["host_computed"] + d["prefetch_issued"]) / n,
        "host_computed_per_token": d["host_computed"] / n,
        # prefetched experts a layer then used / that left the cache unused (read for nothing)
        "prefetch_useful_per_token": d["prefetch_useful"] / n,
        "prefetch_wasted_per_token": d["prefetch_wasted"] / n,
        "bytes_per_token": (d["bytes_from_disk"] + d["bytes_host_to_device"]) / n,
        "disk_bytes_per_token": d["bytes_from_disk"] / n,
        "stall_fraction": fraction("stall_s"),
        "disk_busy_fraction": fraction("disk_busy_s"),
        "h2d_busy_fraction": fraction("h2d_busy_s"),
        "disk_GBps_while_busy": rate("bytes_from_disk", "disk_busy_s"),
        "h2d_GBps_while_busy": rate("bytes_host_to_device", "h2d_busy_s"),
        # seconds per token not spent waiting for a load: compute (what no link can shorten)
        "unstalled_s_per_token": max(0.0, t - d["stall_s"]) / n,
        # decode tokens/s if the busiest link were busy all the time at the rate it ran at
        "link_limit_tokens_per_s": n / busiest if busiest else None,
    }


def _one_run(rt: Runtime, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """One generation; engine figures over its decode steps (one token each) only."""
    clock = StepClock(rt.stats)
    with clock.attached(rt.model):
        out = rt.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, temperature=0.0)
    d = clock.decode_totals()
    steps = int(d.get("steps", 0))
    engine = (_engine_figures(d) if rt.offloaded and steps
              else dict.fromkeys(ENGINE_FIGURES))
    return {"decode_tokens_per_s": out.stats["decode_tokens_per_s"],
            "time_to_first_token_s": out.stats["time_to_first_token_s"],
            "decode_steps": steps, **engine, "token_ids": out.token_ids}


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return round(statistics.median(values), 4) if values else None


def planned_bytes(rt: Runtime) -> int:
    """Bytes the memory plan allocates within the device budget: trunk, KV cache, work buffers
    and the expert slots (every expert when resident)."""
    fp, cfg = rt.plan.footprint, rt.config
    slots = rt.plan.device_slots if rt.offloaded else cfg.num_layers * cfg.num_experts
    return fp.fixed + slots * fp.slot


def _prefetch_depth(rt: Runtime) -> dict[str, Any]:
    """``prefetch_adaptive`` (the depth adapted up to ``prefetch``) and ``prefetch_depth_end``
    (the depth in use when the last run ended; None without an expert cache)."""
    experts = rt.experts
    now = experts.depth_now if isinstance(experts, OffloadedExperts) else None
    return {"prefetch_adaptive": now is not None and experts.adaptive is not None,
            "prefetch_depth_end": now}


def _cache_sizes(rt: Runtime) -> dict[str, Any]:
    """The device tier's expert slots (None: experts resident): ``cache_experts_per_layer``,
    their average over layers (a float: per-layer pools differ where a budget's spare slots go
    to the first layers, and one global pool's slots are shared), and
    ``cache_experts_by_layer``, each layer's pool in layer order (None for a global pool)."""
    if not rt.offloaded:
        return {"cache_experts_per_layer": None, "cache_experts_by_layer": None}
    per_layer = getattr(rt.experts, "per_layer", True)
    return {"cache_experts_per_layer": rt.plan.device_slots / rt.config.num_layers,
            "cache_experts_by_layer": list(rt.plan.pool_capacities) if per_layer else None}


def run_bench(rt: Runtime, *, prompt_tokens: int = 32, new_tokens: int = 32, repeats: int = 3,
              seed: int = 0, report: Report | None = None,
              baseline_rss: int | None = None) -> dict[str, Any]:
    """Generate ``repeats`` times; per-run figures and their medians (see module docstring).

    Memory: ``peak_rss_bytes`` is the process's peak resident set after the runs;
    ``baseline_rss`` (``process_memory.process_baseline_rss``, measured before the model was
    loaded) is reported as ``process_baseline_rss_bytes``: what the budget does not cover;
    ``memory_planned_bytes`` is what the plan allocates within ``memory_budget_bytes``.
    Cache size: ``options.cache_experts_per_layer`` (an average) and
    ``options.cache_experts_by_layer`` (``_cache_sizes``).
    """
    check_settings(prompt_tokens, new_tokens, repeats)
    prompt = bench_prompt(rt.config.vocab_size, prompt_tokens, seed)
    runs = []
    for i in range(repeats):
        runs.append(_one_run(rt, prompt, new_tokens))
        if report is not None:
            report(i, runs[-1])
    keys = [k for k in runs[0] if k not in ("token_ids", "decode_steps")]
    medians = {k: _median(runs, k) for k in keys}
    bound = None
    if rt.offloaded:
        busy = {"disk": medians["disk_busy_fraction"] or 0.0,
                "host_to_device": medians["h2d_busy_fraction"] or 0.0}
        link, fraction = max(busy.items(), key=lambda kv: kv[1])
        bound = link if fraction >= BUSY_BOUND else "compute"
    o = rt.options
    return {
        "model_dir": str(rt.checkpoint.model_dir), "offloaded": rt.offloaded,
        "options": {"device": o.device, "dtype": str(rt.dtype).removeprefix("torch."),
                    **_cache_sizes(rt),
                    "policy": o.policy, "prefetch": o.prefetch,
                    **_prefetch_depth(rt), "trunk": o.trunk,
                    "quant_kernel": o.quant_kernel or "torch",
                    "hybrid": o.hybrid,
                    "page_cache": "bypassed" if o.drop_page_cache else "used"},
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
        "same_tokens_every_run": all(r["token_ids"] == runs[0]["token_ids"] for r in runs),
        "token_ids": runs[0]["token_ids"],  # the first run's (compare builds or flags)
        "median": medians, "bound_by": bound,
        "process_baseline_rss_bytes": baseline_rss, "peak_rss_bytes": peak_rss_bytes(),
        "memory_budget_bytes": rt.plan.device_budget, "memory_planned_bytes": planned_bytes(rt),
        "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in runs],
    }
