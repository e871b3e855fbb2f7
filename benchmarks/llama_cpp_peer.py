"""llama.cpp beside offload_rt: decode and prompt speed and peak RSS, interleaved, same settings.

    python benchmarks/llama_cpp_peer.py --llama-bin /path/to/llama.cpp/build/bin --threads 1 \
        --llama q4_k_m=/tmp/peer/small-q4_k_m.gguf --llama q4_1=/tmp/peer/small-q4_1.gguf \
        --ort int4=/tmp/bench/small-int4,--no-offload --ort bf16=/tmp/bench/small,--no-offload \
        --rounds 3 --prompt-tokens 32 --new-tokens 32 --out result.json

llama.cpp is a peer to measure against, never a dependency: nothing here is imported by the
runtime. A mode is NAME=PATH[,FLAG,...]: ``--llama`` runs ``llama-bench -m GGUF -p P -n N -t T
-r R -o json -lm LOAD_MODE FLAG...`` (prompt tok/s = its ``pp`` test, decode tok/s = its ``tg``
test, each the median of its R samples; ``tg`` decodes from an empty context, ours after the
prompt); ``--ort`` runs ``offload-rt bench MODEL_DIR --json --repeats R --prompt-tokens P
--new-tokens N FLAG...`` (e.g. ``--no-offload``, ``--cpu-memory=4GiB``; none: the auto budget)
with ``torch.set_num_threads(T)``; its prompt tok/s is P / time to first token. Every mode runs
once per round in a fresh process, in an order rotated each round, after the machine is idle
(``decode_bench.wait_for_idle``) and its files are read into the page cache (``--page-cache
warm``) or evicted from it (``cold``: ``posix_fadvise`` DONTNEED per file, as decode_bench's
cold modes; a global ``/proc/sys/vm/drop_caches`` would disturb other jobs on the machine).
Peak RSS is each process's own (``wait4``'s ru_maxrss; with mmap it counts the mapped file
pages llama.cpp touched). One JSON document goes to stdout (and ``--out``): per-run records,
per-mode median/min/max, and the ratios ours / llama.cpp of every pair of modes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_bench import IDLE_CPU_PERCENT, wait_for_idle
from physical_limit import drop_page_cache, model_files, warm_page_cache

ORT_CODE = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
            "from offload_rt.cli import main; sys.exit(main(sys.argv[2:]))")
KEYS = ("decode_tokens_per_s", "prompt_tokens_per_s", "peak_rss_bytes", "others_cpu_fraction")
ORT_KEYS = ("time_to_first_token_s", "hit_rate", "bytes_per_token", "bench_peak_rss_bytes")


@dataclass(frozen=True)
class Mode:
    """One thing to measure: ``kind`` "llama" (a GGUF file) or "ort" (a model folder)."""

    kind: str
    name: str
    path: Path
    flags: tuple[str, ...]

    def files(self) -> list[Path]:
        return [self.path] if self.kind == "llama" else model_files(self.path)


def parse_mode(kind: str, spec: str) -> Mode:
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"--{kind} {spec!r}: expected NAME=PATH[,FLAG,...]")
    path, *flags = rest.split(",")
    if not Path(path).exists():
        raise SystemExit(f"--{kind} {name}: {path} does not exist")
    return Mode(kind, name, Path(path), tuple(f for f in flags if f))


def command(mode: Mode, a: argparse.Namespace) -> list[str]:
    p, n, t, r = map(str, (a.prompt_tokens, a.new_tokens, a.threads, a.repeats))
    if mode.kind == "llama":
        return [str(a.llama_bin / "llama-bench"), "-m", str(mode.path), "-p", p, "-n", n,
                "-t", t, "-r", r, "-o", "json", "-lm", a.load_mode, *mode.flags]
    return [sys.executable, "-c", ORT_CODE, t, "bench", str(mode.path), "--json", "--repeats",
            r, "--prompt-tokens", p, "--new-tokens", n, *mode.flags]


def run_measured(cmd: list[str]) -> tuple[str, dict]:
    """Run ``cmd``; its stdout and its own rusage (peak RSS, CPU seconds) and wall time."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return out.read(), {"peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": round(wall, 3),
                            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3)}


def parse_llama(stdout: str, a: argparse.Namespace) -> dict:
    """llama-bench's JSON: one record per test (pp P, tg N), ``samples_ts`` per repetition."""
    tests = json.loads(stdout)
    pp = next(t for t in tests if t["n_prompt"] == a.prompt_tokens and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_gen"] == a.new_tokens and t["n_prompt"] == 0)
    return {"decode_tokens_per_s": statistics.median(tg["samples_ts"]),
            "prompt_tokens_per_s": statistics.median(pp["samples_ts"]),
            "decode_samples": tg["samples_ts"], "prompt_samples": pp["samples_ts"],
            "model_size_bytes": tg.get("model_size"), "model_type": tg.get("model_type"),
            "build_commit": tg.get("build_commit")}


def parse_ort(stdout: str, a: argparse.Namespace) -> dict:
    """``offload-rt bench --json``: medians over its repeats."""
    r = json.loads(stdout.strip().splitlines()[-1])
    m = r["median"]
    return {"decode_tokens_per_s": m["decode_tokens_per_s"],
            "prompt_tokens_per_s": a.prompt_tokens / m["time_to_first_token_s"],
            "time_to_first_token_s": m["time_to_first_token_s"], "hit_rate": m["hit_rate"],
            "bytes_per_token": m["bytes_per_token"], "bench_peak_rss_bytes": r["peak_rss_bytes"],
            "offloaded": r["offloaded"], "options": r["options"],
            "same_tokens_every_run": r["same_tokens_every_run"], "token_ids": r["token_ids"]}


def one_run(mode: Mode, a: argparse.Namespace) -> dict:
    """Prepare the page cache, wait for idle, run; the record with others' CPU share."""
    prep = {"warm": warm_page_cache, "cold": drop_page_cache}.get(a.page_cache)
    prep_s = prep(mode.files()) if prep else 0.0
    idle = wait_for_idle(a.idle_threshold, a.idle_max_wait)
    cpu0 = psutil.cpu_times()
    stdout, usage = run_measured(command(mode, a))
    cpu1 = psutil.cpu_times()
    busy = (sum(cpu1) - cpu1.idle - cpu1.iowait) - (sum(cpu0) - cpu0.idle - cpu0.iowait)
    others = max(0.0, busy - usage["cpu_s"]) / (usage["wall_s"] * psutil.cpu_count())
    parsed = (parse_llama if mode.kind == "llama" else parse_ort)(stdout, a)
    return {**parsed, **usage, "others_cpu_fraction": round(others, 3), "idle": idle,
            "page_cache_prep_s": round(prep_s, 3)}


def _stat(runs: list[dict], key: str) -> dict | None:
    xs = [r[key] for r in runs if r.get(key) is not None]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None


def summarize(modes: list[Mode], runs: dict[str, list[dict]]) -> dict:
    table = {m.name: {"kind": m.kind, **{k: s for k in KEYS + ORT_KEYS
                                         if (s := _stat(runs[m.name], k))}} for m in modes}
    ratios: dict[str, dict[str, float]] = {"decode": {}, "prompt": {}}
    for ours in (m for m in modes if m.kind == "ort"):
        for peer in (m for m in modes if m.kind == "llama"):
            for what, key in (("decode", "decode_tokens_per_s"),
                              ("prompt", "prompt_tokens_per_s")):
                ratio = table[ours.name][key]["median"] / table[peer.name][key]["median"]
                ratios[what][f"{ours.name}/{peer.name}"] = round(ratio, 3)
    return {"modes": table, "ratios_ours_over_llama_cpp": ratios}


def run_all(modes: list[Mode], a: argparse.Namespace) -> dict:
    runs: dict[str, list[dict]] = {m.name: [] for m in modes}
    for r in range(a.rounds):
        k = r % len(modes)
        for mode in modes[k:] + modes[:k]:  # rotated: no mode always first
            res = one_run(mode, a)
            res["round"] = r
            runs[mode.name].append(res)
            print(f"[{r}] {mode.name}: {res['decode_tokens_per_s']:.2f} tok/s decode, "
                  f"{res['prompt_tokens_per_s']:.1f} tok/s prompt, peak RSS "
                  f"{res['peak_rss_bytes'] / 2**20:.0f} MiB, others' CPU "
                  f"{res['others_cpu_fraction']:.0%}", file=sys.stderr, flush=True)
    return {"benchmark": "llama_cpp_peer", "prompt_tokens": a.prompt_tokens,
            "new_tokens": a.new_tokens, "threads": a.threads, "rounds": a.rounds,
            "repeats": a.repeats, "load_mode": a.load_mode, "page_cache": a.page_cache,
            "llama_bin": str(a.llama_bin),
            "modes_run": {m.name: {"kind": m.kind, "path": str(m.path), "flags": list(m.flags)}
                          for m in modes},
            "machine": {"cpus": psutil.cpu_count(), "ram_bytes": psutil.virtual_memory().total},
            "summary": summarize(modes, runs), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama", action="append", default=[], metavar="NAME=GGUF[,FLAG,...]",
                   help="a llama.cpp mode: llama-bench on this file (repeatable)")
    p.add_argument("--ort", action="append", default=[], metavar="NAME=DIR[,FLAG,...]",
                   help="an offload_rt mode: offload-rt bench on this folder with these flags "
                        "(repeatable)")
    p.add_argument("--llama-bin", type=Path, help="llama.cpp's build/bin (holding "
                   "llama-bench); needed with --llama")
    p.add_argument("--threads", type=int, default=psutil.cpu_count(),
                   help="threads of both (llama-bench -t, torch.set_num_threads); default: "
                        "one per core")
    p.add_argument("--load-mode", default="mmap",
                   help="llama-bench -lm: mmap (default), none (read into RAM), dio, ...")
    p.add_argument("--page-cache", choices=("warm", "cold", "as-is"), default="warm",
                   help="before each run: read the mode's files (warm), evict them (cold: "
                        "posix_fadvise DONTNEED) or leave the cache alone")
    p.add_argument("--rounds", type=int, default=3, help="processes per mode (default 3)")
    p.add_argument("--repeats", type=int, default=3,
                   help="measurements per process: llama-bench -r, bench --repeats (default 3)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--idle-threshold", type=float, default=IDLE_CPU_PERCENT)
    p.add_argument("--idle-max-wait", type=float, default=60.0)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args(argv)
    modes = [parse_mode("llama", s) for s in a.llama] + [parse_mode("ort", s) for s in a.ort]
    if not modes or len({m.name for m in modes}) != len(modes):
        p.error("give at least one --llama or --ort mode, each with its own NAME")
    if a.llama and not (a.llama_bin and (a.llama_bin / "llama-bench").is_file()):
        p.error(f"--llama needs --llama-bin, the folder of llama.cpp's llama-bench (got "
                f"{a.llama_bin})")
    doc = json.dumps(run_all(modes, a))
    if a.out:
        a.out.write_text(doc)
    print(doc, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
