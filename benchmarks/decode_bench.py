"""Decode speed of offload_rt against transformers (+ accelerate disk offload) and the hardware.

    python benchmarks/decode_bench.py /tmp/bench/small --prompt-tokens 32 --new-tokens 48 \
        --repeats 3 [--modes ort_resident,ort_25_cold,...] [--out result.json]

Every mode decodes the same seeded prompt (token ids) greedily for the same number of tokens, in
a fresh subprocess (clean RSS, its own page-cache preparation). Modes are interleaved (each
repeat runs every mode, in a rotated order) and before each run the benchmark waits until the
other processes on the machine use little CPU; what they used during the run is recorded.
One JSON document goes to stdout (and ``--out``): per-run records, per-mode median/min/max,
ratios to offload_rt resident, and achieved / physical limit (see ``physical_limit.py``).

Modes (``MODES``): ``ort_*`` run offload_rt with every expert resident, or an expert cache of
50% / 25% of the experts' bytes (``cache_experts`` = 4 / 2 of 8 per layer), experts read past the
page cache (``cold``: files evicted before the run, the engine's ``O_DIRECT`` reads) or through
it (``warm``: files read once before the run, buffered reads). ``hf_resident`` is transformers, every weight in RAM.
``accel_*`` is transformers + accelerate ``device_map`` disk offload at the same budget: the
experts of all but 25% (50%) of the layers live on disk (accelerate's offload folder); ``warm``
keeps the page cache, ``bounded`` evicts the model's and the offload folder's files from it
before every forward (the only way its RAM use is really bounded by the budget).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from physical_limit import drop_page_cache, limit, model_files, warm_page_cache

from offload_rt.engine.step_clock import StepClock

# name -> (engine, fraction of the experts' bytes kept in RAM, page cache: warm|cold|bounded)
MODES = {
    "ort_resident": ("ort", 1.0, "warm"),
    "ort_50_cold": ("ort", 0.5, "cold"), "ort_50_warm": ("ort", 0.5, "warm"),
    "ort_25_cold": ("ort", 0.25, "cold"), "ort_25_warm": ("ort", 0.25, "warm"),
    "hf_resident": ("hf", 1.0, "warm"),
    "accel_25_warm": ("hf", 0.25, "warm"), "accel_25_bounded": ("hf", 0.25, "bounded"),
}
IDLE_CPU_PERCENT = 20.0  # other processes' share of all cores below which a run may start


# --- the parent: idle wait, page cache, subprocesses, summary --------------------------------


def wait_for_idle(threshold: float, max_wait: float) -> dict:
    """Wait until system-wide CPU use (we idle meanwhile) over 1 s is below ``threshold``%."""
    start, samples = time.monotonic(), []
    while True:
        samples.append(psutil.cpu_percent(interval=1.0))
        if samples[-1] < threshold or time.monotonic() - start > max_wait:
            return {"waited_s": round(time.monotonic() - start, 1), "cpu_percent_at_start":
                    samples[-1], "idle": samples[-1] < threshold}


def run_worker(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter; add the CPU other processes used meanwhile."""
    cpu0, self0, t0 = psutil.cpu_times(), resource.getrusage(resource.RUSAGE_SELF), time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    wall = time.time() - t0
    cpu1, self1 = psutil.cpu_times(), resource.getrusage(resource.RUSAGE_SELF)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['mode']} failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    busy = (sum(cpu1) - cpu1.idle - cpu1.iowait) - (sum(cpu0) - cpu0.idle - cpu0.iowait)
    mine = (self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime
            + result["process_cpu_s"])
    result["others_cpu_fraction"] = round(max(0.0, busy - mine) / (wall * psutil.cpu_count()), 3)
    return result


def prepare_page_cache(cache: str, files: list[Path]) -> float:
    if cache == "warm":
        return warm_page_cache(files)
    return drop_page_cache(files)


def _stat(runs: list[dict], key: str) -> dict | None:
    xs = [r[key] for r in runs if r.get(key) is not None]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None


SUMMARY_KEYS = ("decode_tokens_per_s", "tokens_per_s", "time_to_first_token_s",
                "peak_rss_bytes", "bytes_per_token", "disk_read_bytes_per_token", "hit_rate",
                "stall_fraction", "misses_per_token", "loads_per_token", "others_cpu_fraction")


def summarize(runs: dict[str, list[dict]], phys: dict | None) -> dict:
    table = {m: {k: _stat(rs, k) for k in SUMMARY_KEYS if _stat(rs, k)} for m, rs in runs.items()}
    med = {m: t["decode_tokens_per_s"]["median"] for m, t in table.items()}
    out: dict = {"modes": table}
    if "ort_resident" in med:
        out["ratio_to_ort_resident"] = {m: round(v / med["ort_resident"], 3)
                                        for m, v in med.items()}
    pairs = {"ort_resident_vs_hf_resident": ("ort_resident", "hf_resident"),
             "ort_25_cold_vs_accel_25_bounded": ("ort_25_cold", "accel_25_bounded"),
             "ort_25_warm_vs_accel_25_warm": ("ort_25_warm", "accel_25_warm")}
    out["comparisons"] = {k: round(med[a] / med[b], 3) for k, (a, b) in pairs.items()
                          if a in med and b in med}
    if phys is not None and "ort_resident" in med:
        out["limits"] = physical_limits(table, runs, phys, 1.0 / med["ort_resident"])
    return out


def physical_limits(table: dict, runs: dict[str, list[dict]], phys: dict, t_res: float) -> dict:
    """achieved / limit for each offloaded offload_rt mode (medians of this run's figures)."""
    out = {"t_res_s": round(t_res, 6), "read_cold_s": phys["read_cold_s"]["median"],
           "read_cold_effective_s": phys["read_cold_effective_s"],
           "read_warm_s": phys["read_warm_s"]["median"],
           "compute_s": phys["compute_s"]["median"]}
    for mode, rs in runs.items():
        engine, fraction, cache = MODES[mode]
        if engine != "ort" or fraction >= 1.0:
            continue
        per_run = [_run_limit(r, t_res, phys, cache) for r in rs]
        loads = statistics.median(r["required_loads_per_token"] for r in rs)
        overlap = statistics.median(r["prefetch_overlap"] for r in rs)
        t_read = statistics.median(p["read_s"] for p in per_run)
        lim = limit(t_res, t_read, loads, overlap)  # from the medians, for the table
        achieved = table[mode]["decode_tokens_per_s"]["median"]
        in_run = [r["disk_busy_s_per_load"] for r in rs if r.get("disk_busy_s_per_load")]
        lim.update(read_s=round(t_read, 6),
                   read_in_run_s=round(statistics.median(in_run), 6) if in_run else None,
                   required_loads_per_token=loads, prefetch_overlap=overlap,
                   achieved_tokens_per_s=achieved,
                   # each run against the disk rate of its own time; the median of those
                   achieved_over_limit=round(statistics.median(
                       p["achieved_over_limit"] for p in per_run), 3),
                   achieved_over_limit_runs=[p["achieved_over_limit"] for p in per_run],
                   achieved_over_measured_overlap=round(statistics.median(
                       p["achieved_over_measured_overlap"] for p in per_run), 3))
        out[mode] = lim
    return out


def _run_limit(run: dict, t_res: float, phys: dict, cache: str) -> dict:
    """One run's limit: its own loads and overlap, and for cold reads the faster of the
    start-of-benchmark disk figure and the rate the disk delivered during this run (the
    virtual disk's rate drifts with other tenants)."""
    t_read = phys["read_cold_effective_s"] if cache == "cold" else phys["read_warm_s"]["median"]
    if cache == "cold" and run.get("disk_busy_s_per_load"):
        t_read = min(t_read, run["disk_busy_s_per_load"])
    lim = limit(t_res, t_read, run["required_loads_per_token"], run["prefetch_overlap"])
    got = run["decode_tokens_per_s"]
    return {"read_s": t_read,
            "achieved_over_limit": round(got / lim["limit_tokens_per_s"], 3),
            "achieved_over_measured_overlap": round(
                got / lim["measured_overlap_tokens_per_s"], 3)}


def run_all(args: argparse.Namespace) -> dict:
    import torch

    model_dir = args.model_dir.resolve()
    cfg = json.loads((model_dir / "config.json").read_text())
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, cfg["vocab_size"], (args.prompt_tokens,), generator=gen).tolist()
    files, modes = model_files(model_dir), args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; known: {sorted(MODES)}")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    phys = None
    with tempfile.TemporaryDirectory(prefix="decode_bench_") as scratch:
        if not args.no_limit:
            idle = wait_for_idle(args.idle_threshold, args.idle_max_wait)
            phys = run_worker({"mode": "limit", "model_dir": str(model_dir),
                               "samples": args.limit_samples})
            phys["idle"] = idle
        for r in range(args.repeats):
            order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate: no fixed first
            for mode in order:
                prep = prepare_page_cache(MODES[mode][2], files)
                idle = wait_for_idle(args.idle_threshold, args.idle_max_wait)
                spec = {"mode": mode, "model_dir": str(model_dir), "prompt": prompt,
                        "new_tokens": args.new_tokens, "repeat": r,
                        "offload_folder": str(Path(scratch) / f"offload_{mode}_{r}")}
                res = run_worker(spec)
                res.update(idle=idle, page_cache_prep_s=round(prep, 3), repeat=r)
                runs[mode].append(res)
                print(f"[{r}] {mode}: {res['decode_tokens_per_s']:.2f} tok/s decode, "
                      f"others' CPU {res['others_cpu_fraction']:.0%}", file=sys.stderr)
    ref = runs.get("ort_resident", [{}])[0].get("token_ids")
    for rs in runs.values():
        for res in rs:
            res["same_tokens_as_ort_resident"] = None if ref is None else _agree(res, ref)
    return {"benchmark": "decode", "model_dir": str(model_dir), "config": _shapes(cfg),
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "idle_threshold_percent": args.idle_threshold,
            "machine": {"cpus": psutil.cpu_count(), "ram_bytes": psutil.virtual_memory().total},
            "physical": phys, "summary": summarize(runs, phys), "runs": runs}


def _agree(res: dict, ref: list[int]) -> float:
    """Fraction of the generated tokens equal to offload_rt resident's, up to the first
    difference (bf16 kernels differ between libraries, so a late divergence is expected)."""
    n = 0
    for a, b in zip(res["token_ids"], ref):
        if a != b:
            break
        n += 1
    return round(n / max(1, len(ref)), 3)


def _shapes(cfg: dict) -> dict:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "num_local_experts", "num_experts_per_tok", "intermediate_size", "vocab_size")
    return {k: cfg.get(k) for k in keys}


# --- the workers: one measurement each, in a fresh process ----------------------------------


def _read_bytes() -> dict[str, float]:
    """Bytes this process really read from the device (/proc/self/io)."""
    return {"read_bytes": float(psutil.Process().io_counters().read_bytes)}


def step_clock(stats: object) -> StepClock:
    return StepClock(stats, extra=_read_bytes)  # type: ignore[arg-type]


def decode_figures(clock: StepClock, expert_bytes: int) -> dict:
    total = clock.decode_totals()
    if not total:
        return {}
    n = int(total["steps"])
    needed = total["hits"] + total["misses"]
    required = total["misses"] + total["prefetch_useful"]
    disk_loads = total["bytes_from_disk"] / expert_bytes
    return {
            # seconds the disk was busy per expert it delivered (overlapping reads counted once)
            "disk_busy_s_per_load": (round(total["disk_busy_s"] / disk_loads, 6)
                                     if disk_loads and total["disk_busy_s"] else None),"decode_steps_measured": n, "decode_forward_s": round(total["t"], 6),
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
    import offload_rt

    start = time.perf_counter()
    opts: dict = {"max_seq_len": len(spec["prompt"]) + spec["new_tokens"] + 8}
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
           "rss_after_bytes": psutil.Process().memory_info().rss}
    if fraction < 1.0:
        res.update(decode_figures(clock, rt.plan.footprint.expert))
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


def worker(spec: dict) -> dict:
    if spec["mode"] == "limit":
        from physical_limit import measure

        out = measure(Path(spec["model_dir"]), spec["samples"])
    elif MODES[spec["mode"]][0] == "ort":
        out = run_offload_rt(spec, *MODES[spec["mode"]][1:])
    else:
        out = run_transformers(spec, *MODES[spec["mode"]][1:])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.update(mode=spec["mode"], peak_rss_bytes=usage.ru_maxrss * 1024,
               process_cpu_s=usage.ru_utime + usage.ru_stime)
    return out


def markdown_table(doc: dict) -> str:
    """The README's performance table from a result document (medians; min-max in brackets)."""
    s, lim = doc["summary"], doc["summary"].get("limits", {})
    rows = [("| mode | decode tok/s (min-max) | x ort resident | first token s | peak RSS GiB | "
             "MB from disk / token | hit rate | stall | achieved / limit | others' CPU |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, t in s["modes"].items():
        d, gib = t["decode_tokens_per_s"], t["peak_rss_bytes"]["median"] / 2**30
        disk = t.get("disk_read_bytes_per_token", {}).get("median")
        hit, stall = t.get("hit_rate", {}).get("median"), t.get("stall_fraction", {}).get("median")
        ratio = lim.get(mode, {}).get("achieved_over_limit")
        rows.append(f"| {mode} | {d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f}) | "
                    f"{s.get('ratio_to_ort_resident', {}).get(mode, float('nan')):.2f} | "
                    f"{t['time_to_first_token_s']['median']:.2f} | {gib:.2f} | "
                    f"{'-' if disk is None else f'{disk / 1e6:.0f}'} | "
                    f"{'-' if hit is None else f'{hit:.2f}'} | "
                    f"{'-' if stall is None else f'{stall:.2f}'} | "
                    f"{'-' if ratio is None else f'{ratio:.2f}'} | "
                    f"{t['others_cpu_fraction']['median']:.0%} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, nargs="?")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated; default all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt token ids")
    parser.add_argument("--idle-threshold", type=float, default=IDLE_CPU_PERCENT,
                        help="start a run when system CPU use is below this %% (default 20)")
    parser.add_argument("--idle-max-wait", type=float, default=60.0,
                        help="seconds to wait for idle CPU before running anyway (default 60)")
    parser.add_argument("--limit-samples", type=int, default=12,
                        help="experts read to time one cold/warm read (default 12)")
    parser.add_argument("--no-limit", action="store_true", help="skip the physical limit")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--table", type=Path, metavar="RESULT_JSON",
                        help="print the markdown performance table of a saved result and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.model_dir is None:
        parser.error("MODEL_DIR is required")
    doc = json.dumps(run_all(args))
    if args.out:
        args.out.write_text(doc)
    print(doc, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
