"""CPU kernels for ``x @ W.T``: ``F.linear`` against ``offload_rt.model.cpu_linear``'s choices.

    python benchmarks/linear_bench.py [--repeats 5] [--hidden 1024 --inter 3584 --vocab 32000]
        [--model-dir /tmp/bench/small] [--sections quantized --quant-mixtral] [--threads N]

The evidence behind ``offload_rt/model/cpu_linear.py``. Prints JSON:
* ``one_row``: per dtype and matrix (a decode step's shapes), median microseconds of
  ``F.linear`` and ``torch.mv`` over ``--repeats`` timed batches, measured interleaved;
* ``many_rows``: bfloat16, 16 / 128 / 512 rows (prefill shapes): ``F.linear`` against the
  float32 GEMM on the weight converted block by block (``cpu_linear._fp32_blocks``);
* ``bf16_shapes``: RSS growth of a process running bf16 GEMMs of every row count up to
  ``--shape-rows``, plain vs padded to ``cpu_linear.row_bucket`` (oneDNN keeps memory per row
  count on CPUs with bf16 instructions);
* ``quantized``: int8 / int4 weight-only kernels against dequantize + GEMM and bf16, per expert
  matrix and row count (``quant_linear.py``; the evidence for ``offload_rt/quant/kernels.py``);
* with ``--model-dir``: that model fully resident, the rules on and off (one runtime,
  alternating): decode tokens/s (24 tokens) and time to first token of a 128-token prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_linear

SECTIONS = ("one_row", "many_rows", "bf16_shapes", "quantized")


def _time(fn: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def _ratio(a: float, b: float) -> float:
    """a / b to three significant digits (a fixed number of decimals turns a ratio measured
    during a scheduling hiccup, e.g. 85 us / 20 ms, into 0.0)."""
    return float(f"{a / b:.3g}")


def _pair(a: Callable[[], object], b: Callable[[], object], repeats: int,
          iters: int) -> tuple[float, float]:
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):  # interleaved
        ta.append(_time(a, iters))
        tb.append(_time(b, iters))
    return statistics.median(ta), statistics.median(tb)


def _shapes(h: int, f: int, v: int) -> dict[str, tuple[int, int]]:
    return {"w1;w3": (2 * f, h), "w2": (h, f), "lm_head": (v, h), "wq/wo": (h, h),
            "wk/wv": (h // 4, h)}


def one_row(shapes: dict[str, tuple[int, int]], repeats: int, iters: int) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for name, (o, i) in shapes.items():
            w = (torch.randn(o, i) / i**0.5).to(dtype)
            x = torch.randn(1, i).to(dtype)
            lin, mv = _pair(lambda x=x, w=w: F.linear(x, w),
                            lambda x=x, w=w: torch.mv(w, x[0]), repeats, iters)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "matrix": name,
                         "shape": [o, i], "linear_us": round(lin, 1), "mv_us": round(mv, 1),
                         "linear_over_mv": _ratio(lin, mv)})
    return rows


def many_rows(shapes: dict[str, tuple[int, int]], repeats: int, iters: int) -> list[dict]:
    from offload_rt.model.cpu_linear import _fp32_blocks

    rows = []
    for name in ("w1;w3", "w2", "wq/wo"):
        o, i = shapes[name]
        w = (torch.randn(o, i) / i**0.5).to(torch.bfloat16)
        for n in (16, 128, 512):
            x = torch.randn(n, i).to(torch.bfloat16)
            lin, fp32 = _pair(lambda x=x, w=w: F.linear(x, w),
                              lambda x=x, w=w: _fp32_blocks(x, w), repeats, max(1, iters // 10))
            rows.append({"matrix": name, "shape": [o, i], "rows": n,
                         "linear_us": round(lin, 1), "fp32_blocks_us": round(fp32, 1),
                         "linear_over_fp32_blocks": _ratio(lin, fp32)})
    return rows


def model_ab(model_dir: str, repeats: int) -> dict:
    """Resident decode tokens/s and 128-token time to first token, rules on and off."""
    import offload_rt
    from offload_rt.model import cpu_linear

    on = (cpu_linear.MV_MIN_ROWS, cpu_linear.FP32_MIN_TOKENS)
    off = (2**62, 2**62)
    runs: dict[str, dict[str, list[float]]] = {m: {"decode_tokens_per_s": [],
                                                   "time_to_first_token_s": []}
                                               for m in ("rules", "f_linear_only")}
    with offload_rt.load(model_dir, offload=False, max_seq_len=160) as rt:
        prompt = [(i * 7919) % rt.config.vocab_size for i in range(128)]
        rt.generate(prompt, max_new_tokens=4, ignore_eos=True, temperature=0.0)  # warm-up
        for _ in range(repeats):
            for mode, figures in runs.items():
                cpu_linear.MV_MIN_ROWS, cpu_linear.FP32_MIN_TOKENS = on if mode == "rules" else off
                s = rt.generate(prompt, max_new_tokens=24, ignore_eos=True, temperature=0.0).stats
                for key, values in figures.items():
                    values.append(s[key])
    cpu_linear.MV_MIN_ROWS, cpu_linear.FP32_MIN_TOKENS = on
    med = {m: {k: statistics.median(v) for k, v in f.items()} for m, f in runs.items()}
    return {"runs": runs, "median": med,
            "decode_speedup": round(med["rules"]["decode_tokens_per_s"]
                                    / med["f_linear_only"]["decode_tokens_per_s"], 3),
            "first_token_speedup": round(med["f_linear_only"]["time_to_first_token_s"]
                                         / med["rules"]["time_to_first_token_s"], 3)}


SHAPES_PROBE = """
import json, sys, psutil, torch
from offload_rt.model import cpu_linear
torch.set_num_threads(int(sys.argv[3]))
bucketed, rows_max = sys.argv[1] == "bucketed", int(sys.argv[2])
weights = [torch.randn(o, i).to(torch.bfloat16) for o, i in json.loads(sys.argv[4])]
kernel = cpu_linear.padded_linear if bucketed else torch.nn.functional.linear
for w in weights:
    kernel(torch.randn(1, w.shape[1]).to(torch.bfloat16), w)
before = psutil.Process().memory_info().rss
for rows in range(2, rows_max + 1):
    for w in weights:
        kernel(torch.randn(rows, w.shape[1]).to(torch.bfloat16), w)
print(psutil.Process().memory_info().rss - before)
"""


def bf16_shapes(shapes: dict[str, tuple[int, int]], rows_max: int) -> dict:
    """RSS growth of a process that runs bf16 GEMMs of every row count 2..rows_max against the
    given weights, plain ``F.linear`` vs ``cpu_linear.padded_linear`` (rows padded to
    ``row_bucket``), each in a fresh process. On CPUs with bf16 instructions oneDNN keeps
    memory per row count; elsewhere padding is off and both rows measure the same code."""
    import subprocess

    from offload_rt.model import cpu_linear

    weights = json.dumps([list(v) for k, v in shapes.items() if k != "lm_head"])
    out = {}
    for mode in ("plain", "bucketed"):
        done = subprocess.run([sys.executable, "-c", SHAPES_PROBE, mode, str(rows_max),
                               str(torch.get_num_threads()), weights],
                              capture_output=True, text=True, check=True)
        out[f"{mode}_growth_mib"] = round(int(done.stdout.split()[-1]) / 2**20, 1)
    return {"native_bf16": cpu_linear.native_bf16(), "row_counts": rows_max - 1,
            "weights": len(json.loads(weights)), **out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=3584)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--model-dir", help="also time that model resident, rules on and off")
    p.add_argument("--shape-rows", type=int, default=128,
                   help="bf16_shapes: GEMMs of every row count up to this")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated, of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--quant-rows", default=",".join(map(str, quant_linear.ROWS)),
                   help="quantized: row counts of x")
    p.add_argument("--quant-mixtral", action="store_true",
                   help="quantized: also Mixtral 8x7B's expert matrices (~2 GB of RAM)")
    p.add_argument("--group-size", type=int, default=64, help="quantized: int4 group size")
    p.add_argument("--target-ms", type=float, default=20.0,
                   help="quantized: milliseconds per timed batch")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, the cores)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    shapes = _shapes(a.hidden, a.inter, a.vocab)
    sections = a.sections.split(",")
    doc: dict = {"benchmark": "linear", "torch": torch.__version__,
                 "threads": torch.get_num_threads(),
                 "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if "one_row" in sections:
        doc["one_row"] = one_row(shapes, a.repeats, a.iters)
    if "many_rows" in sections:
        doc["many_rows"] = many_rows(shapes, a.repeats, a.iters)
    if "bf16_shapes" in sections:
        doc["bf16_shapes"] = bf16_shapes(shapes, a.shape_rows)
    if "quantized" in sections:
        experts = {"w1;w3": shapes["w1;w3"], "w2": shapes["w2"],
                   **(quant_linear.MIXTRAL if a.quant_mixtral else {})}
        rows = tuple(int(r) for r in a.quant_rows.split(","))
        doc["quantized"] = quant_linear.quantized(experts, rows, a.group_size, a.repeats,
                                                  a.target_ms / 1e3)
    if a.model_dir:
        doc["model"] = model_ab(a.model_dir, a.repeats)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
