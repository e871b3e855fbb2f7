"""Before / after: ``offload-rt bench`` from two source trees, interleaved, same flags.

    git worktree add /tmp/before <commit>
    python benchmarks/ab_bench.py /tmp/bench/small --before /tmp/before --rounds 3 \
        --mode resident=--no-offload --mode cold25=--cache-experts,2 [--prompt-tokens 128]

Each round runs every (mode, tree) pair once, in a rotated order, each in a fresh process
(``offload-rt bench --json --repeats N`` with the tree first on ``PYTHONPATH``; the after tree
defaults to this checkout). Prints JSON: per mode and tree the medians over rounds of decode
tokens/s and time to first token, the after / before ratios, and whether both trees generated
the same tokens (they must, for a change meant only to be faster or more exact).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def _bench(tree: Path, model_dir: Path, flags: list[str], a: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-c", "import sys; from offload_rt.cli import main; sys.exit(main())",
           "bench", str(model_dir), "--json", "--repeats", str(a.repeats),
           "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens), *flags]
    # cwd outside both trees: the current folder would shadow PYTHONPATH's offload_rt
    done = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: bench failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


KEYS = ("decode_tokens_per_s", "time_to_first_token_s")


def _figure(result: dict, key: str) -> float:
    return result["median"][key]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--before", type=Path, required=True, help="source tree of the baseline")
    p.add_argument("--after", type=Path, default=HERE, help="source tree (default: this one)")
    p.add_argument("--mode", action="append", required=True,
                   help="NAME=FLAG,FLAG,... for offload-rt bench (repeatable)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="generations per bench process")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    a = p.parse_args(argv)
    modes = {}
    for spec in a.mode:
        name, _, flags = spec.partition("=")
        modes[name] = [f for f in flags.split(",") if f]
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    pairs = [(m, t) for m in modes for t in trees]
    runs: dict[str, dict[str, list[dict]]] = {m: {t: [] for t in trees} for m in modes}
    for r in range(a.rounds):
        k = r % len(pairs)
        for mode, tree in pairs[k:] + pairs[:k]:
            result = _bench(trees[tree], a.model_dir, modes[mode], a)
            runs[mode][tree].append(result)
            print(f"[{r}] {mode} {tree}: {_figure(result, 'decode_tokens_per_s')} tok/s",
                  file=sys.stderr, flush=True)
    summary = {}
    for mode, by_tree in runs.items():
        med = {t: {key: statistics.median(_figure(x, key) for x in rs) for key in KEYS}
               for t, rs in by_tree.items()}
        tokens = {t: {tuple(x.get("token_ids") or ()) for x in rs} for t, rs in by_tree.items()}
        summary[mode] = {
            "flags": modes[mode], "median": med,
            "decode_after_over_before": round(med["after"]["decode_tokens_per_s"]
                                              / med["before"]["decode_tokens_per_s"], 3),
            "ttft_after_over_before": round(med["after"]["time_to_first_token_s"]
                                            / med["before"]["time_to_first_token_s"], 3),
            # None when a tree's bench predates the token_ids field
            "same_tokens": (len(tokens["after"] | tokens["before"]) == 1
                            if () not in tokens["after"] | tokens["before"] else None),
            "runs": {t: [{k: _figure(x, k) for k in KEYS} for x in rs]
                     for t, rs in by_tree.items()}}
    print(json.dumps({"benchmark": "ab", "model_dir": str(a.model_dir), "trees":
                      {t: str(p) for t, p in trees.items()}, "rounds": a.rounds,
                      "repeats": a.repeats, "prompt_tokens": a.prompt_tokens,
                      "new_tokens": a.new_tokens, "modes": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
