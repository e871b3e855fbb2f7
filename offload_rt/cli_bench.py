"""``offload-rt bench``: decode speed of a model with the given options, and what limits it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Any

from offload_rt.cli_options import (
    add_model_argument,
    add_runtime_arguments,
    int_at_least,
    model_dir,
    progress_bar,
    runtime_options,
)
from offload_rt.engine.sizes import format_size
from offload_rt.errors import OptionError
from offload_rt.request_checks import check_seed


def add_bench_parser(subparsers: Any,
                     parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register ``bench`` on the top-level parser's subparsers."""
    parser = subparsers.add_parser(
        "bench", parents=parents, help="measure decode speed and what limits it",
        description="Generate greedily from a seeded random prompt a few times with these "
                    "options and report medians: tokens/s, time to first token, hit rate, "
                    "expert loads per token, and how busy the disk and host->device links "
                    "were. Progress goes to stderr; the summary (or --json) to stdout.")
    add_model_argument(parser)
    group = parser.add_argument_group("benchmark")
    group.add_argument("--prompt-tokens", metavar="N", type=int_at_least(1), default=32,
                       help="prompt length in tokens (default 32)")
    group.add_argument("--new-tokens", metavar="N", type=int_at_least(2), default=32,
                       help="tokens generated per run (default 32, at least 2: the first is "
                            "the prefill's, the rest are timed decode steps)")
    group.add_argument("--repeats", metavar="N", type=int_at_least(1), default=3,
                       help="runs; medians are reported (default 3)")
    group.add_argument("--seed", metavar="S", type=int, default=0,
                       help="prompt seed, 0..2**64 - 1 (default 0)")
    group.add_argument("--json", action="store_true", help="print one JSON object")
    add_runtime_arguments(parser)
    parser.set_defaults(run=run_bench_command)
    return parser


def run_bench_command(args: argparse.Namespace) -> int:
    import offload_rt
    from offload_rt.bench import check_settings, run_bench
    from offload_rt.process_memory import process_baseline_rss

    check_settings(args.prompt_tokens, args.new_tokens, args.repeats)  # before loading
    check_seed(args.seed, "--seed")
    baseline = process_baseline_rss()
    with offload_rt.load(model_dir(args), progress=progress_bar(not args.json),
                         **runtime_options(args)) as rt:
        check_fits(args.prompt_tokens, args.new_tokens, rt.max_seq_len, rt.max_seq_len_source)
        def report(i: int, run: dict[str, Any]) -> None:
            print(f"[{i + 1}/{args.repeats}] {run_line(run)}", file=sys.stderr, flush=True)

        result = run_bench(rt, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                           repeats=args.repeats, seed=args.seed, report=report,
                           baseline_rss=baseline)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print_summary(result, sys.stdout)
    return 0


def check_fits(prompt_tokens: int, new_tokens: int, max_seq_len: int, source: str) -> None:
    """OptionError naming bench's flags when a run would not fit the context (the runtime's
    own message speaks of max_new_tokens, which bench does not take)."""
    needed = prompt_tokens + new_tokens
    if needed > max_seq_len:
        raise OptionError(f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} = "
                          f"{needed} exceeds the context length (max_seq_len) of {max_seq_len} "
                          f"({source}); lower --prompt-tokens or --new-tokens so that they "
                          f"add up to at most {max_seq_len}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def run_line(run: dict[str, Any]) -> str:
    parts = [f"{run['decode_tokens_per_s']:.2f} tok/s decode",
             f"first token {run['time_to_first_token_s']:.2f} s"]
    if run["loads_per_token"] is not None:
        parts += [f"hit rate {run['hit_rate']:.2f}",
                  f"{run['loads_per_token']:.1f} loads/token",
                  f"disk busy {_pct(run['disk_busy_fraction'])}"]
    return ", ".join(parts)


def memory_line(r: dict[str, Any]) -> str:
    """'peak RSS 265.2 MiB: process baseline 228.4 MiB (...) + 36.7 MiB (planned 13.1 MiB of
    a 17.8 GiB --cpu-memory budget)': on a GPU run the budget is the GPU's, RSS the host's."""
    peak, base = r["peak_rss_bytes"], r["process_baseline_rss_bytes"]
    line = f"peak RSS {format_size(peak)}"
    if base is not None:
        line += (f": process baseline {format_size(base)} (Python + torch, before loading) "
                 f"+ {format_size(peak - base)}")
    budget = r["memory_budget_bytes"]
    flag = "--gpu-memory" if r["options"]["device"].startswith("cuda") else "--cpu-memory"
    return line + (f" (planned {format_size(r['memory_planned_bytes'])} of a "
                   f"{format_size(budget)} {flag} budget)" if budget is not None else "")


def print_summary(r: dict[str, Any], out: IO[str]) -> None:
    m, o = r["median"], r["options"]
    experts = (f"{o['cache_experts_per_layer']:g} experts per layer cached"
               if r["offloaded"] else "every expert resident")
    kernel = (f", {o['quant_kernel']} kernels" if o.get("quant_kernel") not in (None, "torch")
              else "")
    print(f"offload-rt bench: {r['model_dir']} ({o['device']}, {o['dtype']}, {experts}, "
          f"policy {o['policy']}, prefetch {o['prefetch']}, page cache {o['page_cache']}"
          f"{kernel})", file=out)
    print(f"median of {r['repeats']} runs ({r['prompt_tokens']}-token prompt, "
          f"{r['new_tokens']} new tokens; engine figures over the decode steps):", file=out)
    rows = [("decode", f"{m['decode_tokens_per_s']:.2f} tok/s"),
            ("first token", f"{m['time_to_first_token_s']:.2f} s")]
    if m["loads_per_token"] is not None:
        rows += [("hit rate", f"{m['hit_rate']:.3f}"),
                 ("expert loads", (f"{m['loads_per_token']:.1f} per token "
                                   f"({format_size(int(m['bytes_per_token']))} moved)")),
                 ("stall", f"{_pct(m['stall_fraction'])} of the time waiting for experts")]
        for name, key, rate in (("disk busy", "disk_busy_fraction", "disk_GBps_while_busy"),
                                ("host->device busy", "h2d_busy_fraction",
                                 "h2d_GBps_while_busy")):
            if m[rate] is not None:
                rows.append((name, f"{_pct(m[key])} of the time, {m[rate]:.2f} GB/s while busy"))
        limit = m["link_limit_tokens_per_s"]
        bound = r["bound_by"]
        verdict = f"{bound}" + (f" (at most {limit:.2f} tok/s at the rate it ran at)"
                                if bound != "compute" and limit else "")
        rows.append(("bound by", verdict))
    rows.append(("memory", memory_line(r)))
    if not r["same_tokens_every_run"]:
        rows.append(("warning", "the runs generated different tokens"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=out)
