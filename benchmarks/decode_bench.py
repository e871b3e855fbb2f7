"""Decode speed of offload_rt against transformers (+ accelerate disk offload) and the hardware.

    python benchmarks/decode_bench.py /tmp/bench/small --prompt-tokens 32 --new-tokens 48 \
        --repeats 3 [--modes ort_resident,ort_25_cold,...] [--out result.json]
    python benchmarks/decode_bench.py /tmp/bench/small --modes formats \
        --int8-dir /tmp/bench/small-int8 --int4-dir /tmp/bench/small-int4   # expert formats
        [--threads 1]   # torch threads of every run (a machine shared with other jobs)

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
Quantized experts (``bench_formats.py``): ``ort_int8_*`` / ``ort_int4_*`` run folders written by
``offload-rt quantize``, ``ort_int8load_*`` / ``ort_int4load_*`` the float folder quantized as
it is read; ``--modes formats`` runs bf16 / int8 / int4 x resident / 50% / 25% cold and both
formats quantized at load at 25% cold, each held against its own format's limit.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_formats
from decode_tables import markdown_table
from decode_workers import run_offload_rt, run_transformers
from physical_limit import drop_page_cache, limit, model_files, warm_page_cache

# name -> (engine, fraction of the experts' bytes kept in RAM, page cache: warm|cold|bounded)
MODES = {
    "ort_resident": ("ort", 1.0, "warm"),
    "ort_50_cold": ("ort", 0.5, "cold"), "ort_50_warm": ("ort", 0.5, "warm"),
    "ort_25_cold": ("ort", 0.25, "cold"), "ort_25_warm": ("ort", 0.25, "warm"),
    "hf_resident": ("hf", 1.0, "warm"),
    "accel_25_warm": ("hf", 0.25, "warm"), "accel_25_bounded": ("hf", 0.25, "bounded"),
}
IDLE_CPU_PERCENT = 20.0  # other processes' share of all cores below which a run may start
MODE_SETS = {"formats": bench_formats.FORMAT_SET}


def mode_info(mode: str) -> tuple[str, float, str, str]:
    """(engine, fraction of the experts cached, page cache, expert format) of a mode."""
    if mode in MODES:
        engine, fraction, cache = MODES[mode]
        return engine, fraction, cache, "bf16"
    parsed = bench_formats.parse(mode)
    if parsed is None:
        raise SystemExit(f"unknown mode {mode!r}; known: {sorted(MODES)}, the ort_<format>_"
                         f"<setting> modes of bench_formats.py, or {sorted(MODE_SETS)}")
    return ("ort", parsed[1], parsed[2], parsed[0])


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
    for mode in med:  # each quantized mode against bf16 at the same setting
        parsed = bench_formats.parse(mode)
        if parsed and parsed[0] != "bf16":
            setting = mode.split("_", 2)[2]
            pairs[f"{parsed[0]}_{setting}_vs_bf16"] = (mode, f"ort_{setting}")
            if parsed[0].endswith("dot"):  # the int8-dot kernels against torch's, same records
                base = parsed[0].removesuffix("dot")
                pairs[f"{parsed[0]}_{setting}_vs_{base}"] = (mode, f"ort_{base}_{setting}")
    out["comparisons"] = {k: round(med[a] / med[b], 3) for k, (a, b) in pairs.items()
                          if a in med and b in med}
    if phys is not None:
        out["limits"] = physical_limits(table, runs, phys, med)
    return out


def physical_limits(table: dict, runs: dict[str, list[dict]], phys: dict,
                    med: dict[str, float]) -> dict:
    """achieved / limit for each offloaded offload_rt mode whose format's resident mode ran
    (its step time is the compute the limit needs), from this run's figures."""
    bf16 = phys["formats"].get("bf16", {})
    out: dict = {k: (bf16.get(k) or {}).get("median") for k in ("read_cold_s", "read_warm_s",
                                                                 "compute_s")}
    out["read_cold_effective_s"] = bf16.get("read_cold_effective_s")
    for mode, rs in runs.items():
        engine, fraction, cache, fmt = mode_info(mode)
        resident = bench_formats.resident_of(fmt)
        if engine != "ort" or fraction >= 1.0 or resident not in med:
            continue
        t_res = 1.0 / med[resident]
        per_run = [_run_limit(r, t_res, phys, cache, fmt) for r in rs]
        loads = statistics.median(r["required_loads_per_token"] for r in rs)
        overlap = statistics.median(r["prefetch_overlap"] for r in rs)
        t_read = statistics.median(p["read_s"] for p in per_run)
        t_cpu = bench_formats.read_and_cpu_s(fmt, phys, None, cache)[1]
        lim = limit(t_res, t_read, loads, overlap, t_cpu)  # from the medians, for the table
        achieved = table[mode]["decode_tokens_per_s"]["median"]
        in_run = [r["disk_busy_s_per_load"] for r in rs if r.get("disk_busy_s_per_load")]
        lim.update(format=fmt, t_res_s=round(t_res, 6), read_s=round(t_read, 6),
                   cpu_per_load_s=t_cpu,
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


def _run_limit(run: dict, t_res: float, phys: dict, cache: str, fmt: str) -> dict:
    """One run's limit: its own loads and overlap, and for cold reads the faster of the
    start-of-benchmark disk figure and the rate the disk delivered during this run (the
    virtual disk's rate drifts with other tenants; ``bench_formats.read_and_cpu_s``)."""
    t_read, t_cpu = bench_formats.read_and_cpu_s(fmt, phys, run, cache)
    lim = limit(t_res, t_read, run["required_loads_per_token"], run["prefetch_overlap"], t_cpu)
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
    modes = MODE_SETS.get(args.modes, args.modes.split(","))
    infos = {m: mode_info(m) for m in modes}
    sources = {f: bench_formats.source(f, args) for f in {i[3] for i in infos.values()}}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    phys = None
    with tempfile.TemporaryDirectory(prefix="decode_bench_") as scratch:
        if not args.no_limit:
            phys = measure_limits(args, infos, sources)
        for r in range(args.repeats):
            order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate: no fixed first
            for mode in order:
                folder, options = sources[infos[mode][3]]
                prep = prepare_page_cache(infos[mode][2], model_files(folder))
                idle = wait_for_idle(args.idle_threshold, args.idle_max_wait)
                spec = {"mode": mode, "model_dir": str(folder), "load_options": options,
                        "prompt": prompt, "new_tokens": args.new_tokens, "repeat": r,
                        "offload_folder": str(Path(scratch) / f"offload_{mode}_{r}"),
                        "threads": args.threads}
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
            "threads": args.threads,
            "machine": {"cpus": psutil.cpu_count(), "ram_bytes": psutil.virtual_memory().total},
            "physical": phys, "summary": summarize(runs, phys), "runs": runs}


def measure_limits(args: argparse.Namespace, infos: dict[str, tuple],
                   sources: dict[str, tuple[Path, dict]]) -> dict:
    """``physical_limit.measure`` in a fresh process per expert format the modes run (bf16
    always: the float reads of quantizing at load are its reads)."""
    out: dict = {"formats": {}}
    for fmt in ["bf16"] + sorted({i[3] for i in infos.values()} - {"bf16"}):
        folder, options = sources.get(fmt) or bench_formats.source(fmt, args)
        idle = wait_for_idle(args.idle_threshold, args.idle_max_wait)
        got = run_worker({"mode": "limit", "model_dir": str(folder), "threads": args.threads,
                          "samples": args.limit_samples, "load_options": options})
        got["idle"] = idle
        out["formats"][fmt] = got
    out.update(out["formats"]["bf16"])  # the float figures at the top level, as before
    return out


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


# --- the workers: one measurement each, in a fresh process (decode_workers.py) ---------------


def worker(spec: dict) -> dict:
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    if spec["mode"] == "limit":
        from physical_limit import measure

        out = measure(Path(spec["model_dir"]), spec["samples"],
                      options=spec.get("load_options"))
    elif mode_info(spec["mode"])[0] == "ort":
        out = run_offload_rt(spec, *mode_info(spec["mode"])[1:3])
    else:
        out = run_transformers(spec, *mode_info(spec["mode"])[1:3])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.update(mode=spec["mode"], peak_rss_bytes=usage.ru_maxrss * 1024,
               process_cpu_s=usage.ru_utime + usage.ru_stime)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, nargs="?")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated, or 'formats' (bench_formats.FORMAT_SET); "
                             "default: every mode of MODES")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt token ids")
    parser.add_argument("--idle-threshold", type=float, default=IDLE_CPU_PERCENT,
                        help="start a run when system CPU use is below this %% (default 20)")
    parser.add_argument("--idle-max-wait", type=float, default=60.0,
                        help="seconds to wait for idle CPU before running anyway (default 60)")
    parser.add_argument("--limit-samples", type=int, default=12,
                        help="experts read to time one cold/warm read (default 12)")
    parser.add_argument("--no-limit", action="store_true", help="skip the physical limit")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every run (default: torch's, one per core)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--table", type=Path, metavar="RESULT_JSON",
                        help="print the markdown performance table of a saved result and exit")
    bench_formats.add_arguments(parser)
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
