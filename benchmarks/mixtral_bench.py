"""Mixtral 8x7B's shape in a fixed RAM budget: decode, first token, memory, disk, and the limit.

    python benchmarks/make_checkpoint.py mixtral-8x7b --out /tmp/bench/mixtral-int4 \\
        --experts int4 --group-size 128                      # 27 GB, ~13 min on 2 cores
    python benchmarks/mixtral_bench.py /tmp/bench/mixtral-int4 \\
        --setting "8GiB=--cpu-memory 8GiB" --setting "auto=" \\
        --prompt-tokens 128 --new-tokens 16 --rounds 3 --out r.json

Each round first measures the disk and one expert's compute (``physical_limit.measure``: a
record read cold by the engine's own reader, one, two and four reads in flight), then runs every
setting once, in a rotated order, each as ``offload-rt bench --repeats 1 --json`` in a fresh
process with the model's files evicted from the page cache (cold). Recorded per run: decode
tokens/s, time to first token, hit rate, loads and bytes from disk per token, the disk's busy
share, peak RSS against the budget plus the process baseline, pages swapped (``/proc/vmstat``)
and the exit status (an OOM kill shows as -9).

The limit of a run (tokens/s): the decode step cannot be shorter than its compute (the seconds
per token the run did not stall on a load: ``unstalled_s_per_token``) nor than its reads (the
records it needed per token, misses plus prefetches that were used, at the disk's rate):
``limit = 1 / max(compute, reads)``. The disk's rate is the better of the round's cold-read
measurement (one, two or four reads in flight) and what the disk delivered while the run kept it
busy (``disk_GBps_while_busy``): this virtual disk's rate drifts by 2x within minutes, and a
measurement taken a minute before a run is not the rate the run met. ``achieved_over_limit`` is
the run against it. Prefetches that were never used are counted as the run's own waste, not as
needed reads, so reading them lowers the achieved share.

    python benchmarks/mixtral_bench.py --recompute r.json   # the limits and table again

``--tree NAME=PATH`` runs setting NAME from another source tree (``PATH`` first on
``PYTHONPATH``, e.g. a ``git worktree`` of a change), so a change is measured against this
checkout with the same limits, interleaved in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from physical_limit import drop_page_cache, measure, model_files


def swapped_pages() -> int:
    """Pages swapped in + out since boot (``/proc/vmstat``); 0 where there is no such file."""
    try:
        lines = Path("/proc/vmstat").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(v) for k, v in (line.split() for line in lines) if k in ("pswpin", "pswpout"))


def parse_setting(text: str) -> tuple[str, list[str]]:
    """``NAME=FLAGS`` (flags of ``offload-rt bench``) -> (name, flags)."""
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--setting {text!r}: expected NAME=FLAGS, e.g. '8GiB=--cpu-memory 8GiB'")
    return name, shlex.split(flags)


def parse_tree(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> (setting name, source tree holding ``offload_rt/``)."""
    name, sep, path = text.partition("=")
    if not sep or not (Path(path) / "offload_rt").is_dir():
        raise SystemExit(f"--tree {text!r}: expected NAME=PATH, PATH a source tree with "
                         "offload_rt/")
    return name, Path(path).resolve()


def run_setting(model_dir: Path, flags: list[str], args: argparse.Namespace,
                tree: Path | None = None) -> dict:
    """One cold ``offload-rt bench`` run in a fresh process: its JSON plus swap and status.
    ``tree``: run that source tree's ``offload_rt`` (else the one this Python imports)."""
    drop_page_cache(model_files(model_dir))
    cmd = [sys.executable, "-m", "offload_rt.cli", "bench", str(model_dir.resolve()), "--json",
           "--repeats", "1", "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), *flags]
    # cwd outside the trees: the current folder would shadow PYTHONPATH's offload_rt
    env, cwd = ({**os.environ, "PYTHONPATH": str(tree)}, "/") if tree else (None, None)
    swap0, start = swapped_pages(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=cwd)
    wall = time.perf_counter() - start
    out = {"command": shlex.join(cmd[2:]), "tree": str(tree) if tree else None, "returncode": proc.returncode, "wall_s": round(wall, 1),
           "swapped_pages": swapped_pages() - swap0}
    if proc.returncode != 0:
        return {**out, "stderr": proc.stderr[-2000:]}
    result = json.loads(proc.stdout)
    budget = result["memory_budget_bytes"] + result["process_baseline_rss_bytes"]
    return {**out, **result["runs"][0], "offloaded": result["offloaded"],
            "token_ids": result["token_ids"],
            "peak_rss_bytes": result["peak_rss_bytes"],
            "budget_plus_baseline_bytes": budget,
            "within_budget": result["peak_rss_bytes"] <= budget,
            "cache_experts_per_layer": result["options"]["cache_experts_per_layer"],
            "prefetch_depth_end": result["options"].get("prefetch_depth_end"),
            "memory_budget_bytes": result["memory_budget_bytes"]}


def run_limit(run: dict, disk: dict) -> dict:
    """The run's limit (module docstring) from its own figures and the round's disk rate."""
    if run.get("returncode") != 0 or run.get("loads_per_token") is None:
        return {}  # failed, or every expert fit (resident): no reads to bound it
    rate = max(disk["expert_bytes"] / disk["read_cold_effective_s"],
               (run["disk_GBps_while_busy"] or 0.0) * 1e9)  # bytes/s
    needed = run["loads_per_token"] - run["prefetch_wasted_per_token"]
    reads, compute = needed * disk["expert_bytes"] / rate, run["unstalled_s_per_token"]
    limit = 1.0 / max(reads, compute)
    return {"needed_loads_per_token": round(needed, 2), "disk_GBps": round(rate / 1e9, 3),
            "read_s_per_token": round(reads, 6),
            "compute_s_per_token": round(compute, 6), "bound_by":
            "disk" if reads > compute else "compute", "limit_tokens_per_s": round(limit, 4),
            "achieved_over_limit": round(run["decode_tokens_per_s"] / limit, 3)}


def summarize(runs: dict[str, list[dict]]) -> dict:
    keys = ("decode_tokens_per_s", "time_to_first_token_s", "hit_rate", "loads_per_token",
            "disk_bytes_per_token", "disk_busy_fraction", "peak_rss_bytes",
            "limit_tokens_per_s", "achieved_over_limit")
    table = {}
    for name, rs in runs.items():
        ok = [r for r in rs if r.get("returncode") == 0]
        row = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
               for k in keys if (v := [r[k] for r in ok if r.get(k) is not None])}
        row["runs_ok"], row["runs"] = len(ok), len(rs)
        row["within_budget_every_run"] = all(r["within_budget"] for r in ok)
        row["swapped_pages"] = sum(r["swapped_pages"] for r in rs)
        row["same_tokens_every_run"] = len({tuple(r["token_ids"]) for r in ok}) <= 1
        table[name] = row
    return table


def recompute(path: Path) -> dict:
    """A saved result with its limits and table derived again (no runs)."""
    result = json.loads(path.read_text())
    for runs in result["runs"].values():
        for run in runs:
            run.update(run_limit(run, result["disk"][run["round"]]))
    result["table"] = summarize(result["runs"])
    return result


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--recompute"] and len(argv) == 2:
        print(json.dumps(recompute(Path(argv[1])), indent=1))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--setting", action="append", required=True, metavar="NAME=FLAGS",
                        help="a named set of offload-rt bench flags (repeatable)")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="run setting NAME from another source tree (repeatable)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--disk-samples", type=int, default=6, help="cold reads per round")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    settings = dict(parse_setting(s) for s in args.setting)
    trees = dict(parse_tree(t) for t in args.tree)
    if unknown := sorted(set(trees) - set(settings)):
        raise SystemExit(f"--tree names no --setting: {unknown}")
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    disks = []
    for r in range(args.rounds):
        disk = measure(args.model_dir, args.disk_samples, compute_repeats=10)
        disks.append(disk)
        names = list(settings)
        for name in names[r % len(names):] + names[:r % len(names)]:
            run = run_setting(args.model_dir, settings[name], args, trees.get(name))
            run.update(run_limit(run, disk), round=r)
            runs[name].append(run)
            print(f"round {r} {name}: {run.get('decode_tokens_per_s')} tok/s, first token "
                  f"{run.get('time_to_first_token_s')} s, {run.get('achieved_over_limit')} of "
                  f"limit, rc {run['returncode']}", file=sys.stderr, flush=True)
    result = {"model_dir": str(args.model_dir), "settings": {k: shlex.join(v) for k, v in
                                                             settings.items()},
              "trees": {k: str(v) for k, v in trees.items()},
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "rounds": args.rounds, "table": summarize(runs), "disk": disks, "runs": runs}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))  # one line
    return 0


if __name__ == "__main__":
    sys.exit(main())
