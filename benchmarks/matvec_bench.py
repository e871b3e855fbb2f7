"""One-row matrix products on this CPU: ``F.linear`` against ``torch.mv``, per dtype and shape.

    python benchmarks/matvec_bench.py [--repeats 5] [--hidden 1024 --inter 3584 --vocab 32000]

The evidence behind ``offload_rt.model.matvec``'s rule (``mv`` for one bfloat16 row against
matrices of >= 1024 rows). Prints JSON: per (dtype, shape) the median microseconds of each
kernel over ``--repeats`` timed batches, measured interleaved, and linear / mv.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=3584)
    p.add_argument("--vocab", type=int, default=32000)
    a = p.parse_args(argv)
    h, f, v = a.hidden, a.inter, a.vocab
    shapes = {"w1;w3": (2 * f, h), "w2": (h, f), "lm_head": (v, h), "wq/wo": (h, h),
              "wk/wv": (h // 4, h)}
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for name, (o, i) in shapes.items():
            w = (torch.randn(o, i) / i**0.5).to(dtype)
            x = torch.randn(1, i).to(dtype)
            lin, mv = (lambda: F.linear(x, w)), (lambda: torch.mv(w, x[0]))
            lin(), mv()
            t_lin, t_mv = [], []
            for _ in range(a.repeats):  # interleaved
                t_lin.append(_time(lin, a.iters))
                t_mv.append(_time(mv, a.iters))
            ml, mm = statistics.median(t_lin), statistics.median(t_mv)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "matrix": name,
                         "shape": [o, i], "linear_us": round(ml, 1), "mv_us": round(mm, 1),
                         "linear_over_mv": round(ml / mm, 2)})
    print(json.dumps({"benchmark": "matvec", "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
