"""Policy results on the demo model: record routing on held-out text, replay every policy.

    python benchmarks/policy_table.py VAL_JSONL [--docs 40] [--new-tokens 32] \
        [--trace /tmp/demo_val.trace.jsonl.gz] [--plot docs/demo_hit_rates.png]

VAL_JSONL is the held-out split written by ``training/prepare_corpus.py`` (never trained on).
Prompts are fed one token per forward (``prefill_chunk=1``), so every access step is one token's
top-2 of one layer, as in decoding. Prints JSON rows: hit rate of each policy at 25% and 50% of
the experts per layer (2 and 4 of 8), and each as a fraction of Belady's optimum.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import offload_rt
from cache_policies.plot import plot_hit_rates
from cache_policies.sim_report import compare, format_table
from offload_rt.demo import demo_model_dir
from offload_rt.trace_recorder import record_trace

POLICIES = ["lru", "lfu", "lrfu", "router", "static", "opt"]


def held_out_prompts(path: Path, docs: int, max_chars: int) -> list[str]:
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        doc = json.loads(line)
        text = doc.get("text") or doc.get("question", "") + " " + doc.get("answer", "")
        if text.strip():
            prompts.append(text.strip()[:max_chars])
        if len(prompts) == docs:
            break
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("val_jsonl", type=Path)
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--max-chars", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--trace", type=Path, default=Path("/tmp/demo_val.trace.jsonl.gz"))
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    prompts = held_out_prompts(args.val_jsonl, args.docs, args.max_chars)
    with offload_rt.load(demo_model_dir(), dtype="float32", cache_experts=8, prefetch=1,
                         prefill_chunk=1) as rt:
        trace = record_trace(rt, args.trace, prompts, args.new_tokens,
                             prompt_source=f"{args.val_jsonl.name}: first {len(prompts)} docs")
    rows = compare(trace, POLICIES, capacities=[2, 4], per_layer=True, label="demo-val")
    print(format_table(rows))
    if args.plot is not None:
        plot_hit_rates(compare(trace, POLICIES, capacities=[2, 3, 4, 5, 6], label="demo-val"),
                       args.plot, title="demo model, held-out text: hit rate vs slots per layer")
    print(json.dumps({"tokens": trace.num_tokens, "rows": [
        {"capacity": r.capacity, "policy": r.policy, "hit_rate": round(r.hit_rate, 4),
         "of_opt": round(r.of_opt, 3)} for r in rows]}))


if __name__ == "__main__":
    main()
