"""One-row matrix products on this CPU: ``F.linear`` against ``torch.mv``, per dtype and shape.

    python benchmarks/matvec_bench.py [--repeats 5] [--hidden 1024 --inter 3584 --vocab 32000]
        [--model-dir /tmp/bench/small]

The evidence behind ``offload_rt.model.matvec``'s rule (``mv`` for one bfloat16 row against
matrices of >= 1024 rows). Prints JSON: per (dtype, shape) the median microseconds of each
kernel over ``--repeats`` timed batches, measured interleaved, and linear / mv. With
``--model-dir``, also the resident decode speed of that model with the rule on and off (one
runtime, alternating, ``--repeats`` generations of 24 tokens each way).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _time(fn, iters: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def _decode_ab(model_dir: str, repeats: int) -> dict:
    """Resident decode tokens/s with the mv rule on and off, alternating in one runtime."""
    import offload_rt
    from offload_rt.model import matvec

    rule = matvec.MV_MIN_ROWS
    runs: dict[str, list[float]] = {"mv_rule": [], "f_linear_only": []}
    with offload_rt.load(model_dir, offload=False, max_seq_len=64) as rt:
        prompt = [(i * 7919) % rt.config.vocab_size for i in range(32)]
        rt.generate(prompt, max_new_tokens=4, ignore_eos=True)  # warm-up
        for _ in range(repeats):
            for mode, times in runs.items():
                matvec.MV_MIN_ROWS = rule if mode == "mv_rule" else 2**62
                out = rt.generate(prompt, max_new_tokens=24, ignore_eos=True)
                times.append(out.stats["decode_tokens_per_s"])
    matvec.MV_MIN_ROWS = rule
    med = {m: statistics.median(v) for m, v in runs.items()}
    return {"runs": runs, "median_decode_tokens_per_s": med,
            "mv_rule_over_f_linear": round(med["mv_rule"] / med["f_linear_only"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=3584)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--model-dir", help="also time resident decoding of this model")
    a = p.parse_args(argv)
    h, f, v = a.hidden, a.inter, a.vocab
    shapes = {"w1;w3": (2 * f, h), "w2": (h, f), "lm_head": (v, h), "wq/wo": (h, h),
              "wk/wv": (h // 4, h)}
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for name, (o, i) in shapes.items():
            w = (torch.randn(o, i) / i**0.5).to(dtype)
            x = torch.randn(1, i).to(dtype)
            def lin(x: torch.Tensor = x, w: torch.Tensor = w) -> torch.Tensor:
                return F.linear(x, w)

            def mv(x: torch.Tensor = x, w: torch.Tensor = w) -> torch.Tensor:
                return torch.mv(w, x[0])

            lin(), mv()
            t_lin, t_mv = [], []
            for _ in range(a.repeats):  # interleaved
                t_lin.append(_time(lin, a.iters))
                t_mv.append(_time(mv, a.iters))
            ml, mm = statistics.median(t_lin), statistics.median(t_mv)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "matrix": name,
                         "shape": [o, i], "linear_us": round(ml, 1), "mv_us": round(mm, 1),
                         "linear_over_mv": round(ml / mm, 2)})
    doc = {"benchmark": "matvec", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "results": rows}
    if a.model_dir:
        doc["decode"] = _decode_ab(a.model_dir, a.repeats)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
