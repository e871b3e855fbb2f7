"""The GPU variant: offload_rt on CUDA with a consumer-card device budget, against the PCIe limit.

    python benchmarks/make_checkpoint.py mixtral-8x7b --out /data/m8x7b [--layers 8]
    python benchmarks/gpu_bench.py /data/m8x7b --gpu-memory 12GiB --cpu-memory 48GiB \
        --prompt-tokens 32 --new-tokens 32 --experts float,int8 --hybrid off,auto

Without CUDA it prints ``{"skipped": "..."}`` and exits 0. With CUDA it measures, in this run:
the host-to-device bandwidth (one expert-sized copy from pinned memory, CUDA events), the cold
disk read of one expert (``physical_limit.measure``), then decodes greedily with offload_rt
(disk -> pinned host tier -> device slots within ``--gpu-memory``) and reports tokens/s, bytes
per decode token on each link and achieved / limit, where the limit is the time the links need
for the bytes this run actually moved per token, both links working at once:
``max(h2d_bytes / h2d_bandwidth, disk_loads * cold_read, host_computed * cpu_expert_s)`` (the
last: misses the CPU computed with ``--hybrid``, at the start-up measurement's one-token time;
compute on the GPU is far shorter). Each format runs with each ``--hybrid`` mode (default
off, then auto) and ``hybrid_auto_over_off`` gives their decode ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_workers import decode_figures, step_clock
from physical_limit import measure


def h2d_bandwidth(nbytes: int, repeats: int = 10) -> dict:
    """GB/s of a pinned host -> device copy of ``nbytes`` (one expert), timed with events."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for i in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()  # benchmark timing, not the runtime's hot path
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    t = statistics.median(times)
    return {"copy_s": t, "GBps": round(nbytes / t / 1e9, 3)}


def run_one(args: argparse.Namespace, phys: dict, bw: dict, prompt: list[int], *,
            experts: str, hybrid: str) -> dict:
    """One load + greedy generation with ``experts`` (float: the folder's) and ``hybrid``."""
    import offload_rt

    start = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    rt = offload_rt.load(args.model_dir, device="cuda", gpu_memory=args.gpu_memory,
                         cpu_memory=args.cpu_memory, prefetch=args.prefetch, hybrid=hybrid,
                         experts=None if experts == "float" else experts,
                         max_seq_len=args.prompt_tokens + args.new_tokens + 8)
    load_s = time.perf_counter() - start
    rule = getattr(rt.experts, "hybrid", None)
    expert_bytes = rt.plan.footprint.expert
    clock = step_clock(rt.stats)
    with clock.attached(rt.model):
        out = rt.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True,
                          temperature=0.0)
    fig = decode_figures(clock, phys["expert_bytes"])
    decode = [s for s in clock.steps if s["T"] == 1]
    n = max(1, len(decode))
    h2d_per_token = sum(s["bytes_host_to_device"] for s in decode) / n
    host_per_token = sum(s["host_computed"] for s in decode) / n
    # the limit: the busiest of PCIe (at the bandwidth measured in this run, scaled to this
    # format's records), the disk, and the CPU computing the misses it took (hybrid)
    copy_s = expert_bytes / (bw["GBps"] * 1e9)
    host_s = rule.costs.host_s(1) if rule is not None and rule.costs is not None else 0.0
    t_link = max(h2d_per_token / expert_bytes * copy_s,
                 fig.get("loads_per_token", 0.0) * phys["read_cold_s"]["median"],
                 host_per_token * host_s)
    achieved = out.stats["decode_tokens_per_s"]
    result = {"experts": experts, "hybrid": hybrid,
              "hybrid_rule": rule.describe() if rule is not None else "off",
              "plan": {"device_slots": rt.plan.device_slots, "host_slots": rt.plan.host_slots},
              "load_s": round(load_s, 3), "expert_bytes": expert_bytes,
              "decode_tokens_per_s": achieved,
              "time_to_first_token_s": out.stats["time_to_first_token_s"],
              "h2d_bytes_per_token": h2d_per_token, "host_computed_per_token": host_per_token,
              **fig,
              "limit_tokens_per_s": round(1 / t_link, 3) if t_link else None,
              "achieved_over_limit": round(achieved * t_link, 3) if t_link else None,
              "engine_stats": {k: v for k, v in out.stats.items() if k != "per_layer"},
              "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
              "token_ids": out.token_ids}
    rt.close()
    return result


def run(args: argparse.Namespace) -> dict:
    phys = measure(args.model_dir, samples=args.limit_samples, compute_repeats=10)
    bw = h2d_bandwidth(phys["expert_bytes"])
    cfg = json.loads((args.model_dir / "config.json").read_text())
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, cfg["vocab_size"], (args.prompt_tokens,), generator=gen).tolist()
    runs = []
    for experts in args.experts.split(","):
        for hybrid in args.hybrid.split(","):
            try:
                runs.append(run_one(args, phys, bw, prompt, experts=experts, hybrid=hybrid))
            except Exception as exc:  # noqa: BLE001 - reported in the JSON, next setting runs
                runs.append({"experts": experts, "hybrid": hybrid, "error": repr(exc)})
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    ratios = {}
    for experts in args.experts.split(","):
        by = {r["hybrid"]: r for r in runs if r["experts"] == experts and "error" not in r}
        if "off" in by and "auto" in by:
            ratios[experts] = round(by["auto"]["decode_tokens_per_s"]
                                    / by["off"]["decode_tokens_per_s"], 3)
    return {"benchmark": "gpu", "device": torch.cuda.get_device_name(),
            "gpu_memory": args.gpu_memory, "cpu_memory": args.cpu_memory, "h2d": bw,
            "physical": phys, "runs": runs, "hybrid_auto_over_off": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--gpu-memory", default="12GiB")
    parser.add_argument("--cpu-memory", default="48GiB")
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-samples", type=int, default=6)
    parser.add_argument("--experts", default="float",
                        help="comma-separated expert formats to run (float = the folder's; "
                             "int8 quantizes at load; int4 is CPU-only)")
    parser.add_argument("--hybrid", default="off,auto",
                        help="comma-separated --hybrid modes to run for each format")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        doc = {"benchmark": "gpu", "skipped": f"no CUDA device (torch {torch.__version__}); "
                                              "run this on a CUDA machine"}
    else:
        doc = run(args)
    print(json.dumps(doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
