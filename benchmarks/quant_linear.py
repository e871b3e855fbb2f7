"""``linear_bench.py``'s ``quantized`` section: quantized ``x @ W.T`` kernels per shape and rows.

For each expert matrix ([w1; w3] and w2 of the ``small`` preset, and of Mixtral 8x7B with
``--quant-mixtral``) and each row count of x (bf16, the compute dtype), median microseconds of

* ``bf16``: ``cpu_linear.linear`` on the bf16 matrix (what float experts run);
* ``int8_kernel``: ``aten._weight_int8pack_mm`` (per-channel scales);
* ``int8_dequant``: ``quant.kernels.int8_dequant_mm`` (blocks converted to bf16 + GEMM);
* ``int4_kernel``: ``aten._weight_int4pack_mm_for_cpu`` (groups of ``--group-size``);
* ``int4_dequant``: ``quant.kernels.int4_dequant_mm`` (blocks dequantized to bf16 + GEMM);
* ``int8_dot`` / ``int4_dot``: ``quant.int_dot``'s kernels (``--quant-kernel int8-dot``: int8
  activations, integer dot products);
* ``int8_rule`` / ``int4_rule``: which of the two each format runs for that row count
  (``quant.kernels``' static rule).

Timings are interleaved (each repeat times every kernel once, in a rotated order, over a batch
sized to about ``target_s``) and the median (``us``) and minimum (``us_min``) over ``repeats``
are reported: on a shared 2-core machine a one-shot timing was off by 10x. ``crossover`` is,
per format, the smallest row count measured from which dequantize + GEMM was faster than the
kernel on every matrix (and stayed so), by medians; ``crossover_min`` by minima; the
``int8_dot`` and ``int4_dot`` entries are the int8-dot kernels' against the same dequantize
paths.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

SMALL = {"w1;w3": (7168, 1024), "w2": (1024, 3584)}
MIXTRAL = {"mixtral w1;w3": (28672, 4096), "mixtral w2": (4096, 14336)}
ROWS = (1, 4, 16, 32, 64, 128, 256)
QUANT_BLOCK = 4096  # rows quantized at a time (bounds float32 temporaries for Mixtral's shapes)


def _batch_us(fn: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                target_s: float) -> tuple[dict[str, float], dict[str, float]]:
    """(median, minimum) microseconds per call of each of ``fns`` over ``repeats`` batches,
    timed in turns (rotated order). The minimum is the batch least disturbed by other
    processes (on a shared 2-core machine a descheduled OpenMP thread stalls the other)."""
    iters = {}
    for name, fn in fns.items():
        fn()  # warm-up (kernel selection, page faults)
        iters[name] = max(1, int(target_s * 1e6 / max(1.0, _batch_us(fn, 1))))
    names, times = list(fns), {n: [] for n in fns}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(_batch_us(fns[name], iters[name]))
    return ({n: round(statistics.median(t), 1) for n, t in times.items()},
            {n: round(min(t), 1) for n, t in times.items()})


def quantized_weights(n: int, k: int, group: int) -> dict[str, torch.Tensor]:
    """A random [n, k] matrix (1/sqrt(k) scale) as bf16, int8 (q, s) and packed int4 (w, sz)."""
    from offload_rt.quant.int4 import pack_for_cpu, quantize_int4
    from offload_rt.quant.int8 import quantize_int8

    gen = torch.Generator().manual_seed(n * 31 + k)
    int4 = k % group == 0  # else int4 is left out (the group size must divide the input)
    parts: dict[str, list[torch.Tensor]] = {"bf16": [], "q8": [], "s8": [], "q4": [], "sz4": []}
    for start in range(0, n, QUANT_BLOCK):
        w = torch.randn(min(QUANT_BLOCK, n - start), k, generator=gen) / k**0.5
        parts["bf16"].append(w.to(torch.bfloat16))
        q8, s8 = quantize_int8(w, torch.bfloat16)
        parts["q8"].append(q8), parts["s8"].append(s8)
        if int4:
            q4, sz4 = quantize_int4(w, group, torch.bfloat16)
            parts["q4"].append(pack_for_cpu(q4)), parts["sz4"].append(sz4)
    out = {name: torch.cat(ts) for name, ts in parts.items() if ts and name != "sz4"}
    if int4:
        out["sz4"] = torch.cat(parts["sz4"], dim=1)
    return out


def _scheme() -> tuple[int, str] | None:
    """The packing of the int4 weights this machine's torch writes (``pack_for_cpu``)."""
    from offload_rt.quant.int4 import cpu_layout
    from offload_rt.quant.int4_layout import scheme_of_layout

    return scheme_of_layout(cpu_layout())


def _kernels(x: torch.Tensor, w: dict[str, torch.Tensor],
             group: int) -> dict[str, Callable[[], object]]:
    from offload_rt.model.cpu_linear import linear
    from offload_rt.quant import int_dot, kernels

    aten = torch.ops.aten
    fns: dict[str, Callable[[], object]] = {
        "bf16": lambda: linear(x, w["bf16"]),
        "int8_kernel": lambda: aten._weight_int8pack_mm(x, w["q8"], w["s8"]),
        "int8_dequant": lambda: kernels.int8_dequant_mm(x, w["q8"], w["s8"])}
    if "q4" in w:
        fns["int4_kernel"] = lambda: aten._weight_int4pack_mm_for_cpu(x, w["q4"], group, w["sz4"])
    scheme = _scheme()
    if "q4" in w and kernels.uses_int4_dequant(x.new_empty(10**4, x.shape[1]), w["q4"].shape[0],
                                               scheme):
        fns["int4_dequant"] = lambda: kernels.int4_dequant_mm(x, w["q4"], group, w["sz4"], scheme)
    fns["int8_dot"] = lambda: int_dot.int8_dot_mm(x, w["q8"], w["s8"])
    if "q4" in w and scheme is not None:
        fns["int4_dot"] = lambda: int_dot.int4_dot_mm(x, w["q4"], group, w["sz4"], scheme)
    return fns


def quantized(shapes: dict[str, tuple[int, int]], rows: tuple[int, ...], group: int,
              repeats: int, target_s: float) -> dict:
    """The section's JSON: one record per (matrix, row count), and the crossovers."""
    from offload_rt.quant import kernels
    from offload_rt.quant.int4 import cpu_layout

    records = []
    for name, (n, k) in shapes.items():
        w = quantized_weights(n, k, group)
        for t in rows:
            x = torch.randn(t, k, generator=torch.Generator().manual_seed(t)).to(torch.bfloat16)
            us, us_min = interleaved(_kernels(x, w, group), repeats, target_s)
            records.append({
                "matrix": name, "shape": [n, k], "rows": t, "us": us, "us_min": us_min,
                "int8_rule": "dequant" if kernels.uses_int8_dequant(x) else "kernel",
                "int4_rule": "dequant" if kernels.uses_int4_dequant(x, n, _scheme()) else "kernel",
                "bf16_over": {kk: round(us["bf16"] / v, 3) for kk, v in us.items()}})
        del w
    return {"group_size": group, "dtype": "bfloat16", "repeats": repeats,
            "int4_layout": cpu_layout(), "int4_scheme": _scheme(), "records": records,
            "rule": {"int8_dequant_min_rows": kernels.INT8_DEQUANT_MIN_ROWS,
                     "int4_dequant_min_rows": kernels.INT4_DEQUANT_MIN_ROWS,
                     "dequant_block_bytes": kernels.DEQUANT_BLOCK_BYTES},
            "crossover": {f: crossover(records, f) for f in DOT_FORMATS},
            "crossover_min": {f: crossover(records, f, "us_min") for f in DOT_FORMATS}}


DOT_FORMATS = ("int8", "int4", "int8_dot", "int4_dot")  # crossover entries


def crossover(records: list[dict], fmt: str, key: str = "us") -> int | None:
    """The smallest row count from which ``{fmt}_dequant`` beat ``{fmt}_kernel`` (``key``:
    medians, or ``us_min`` minima) on every matrix at it and every larger row count measured
    (None: never)."""
    wins: dict[int, bool] = {}
    base, _, dot = fmt.partition("_")  # "int4_dot": int4_dequant against int4_dot
    for r in records:
        dq, kernel = r[key].get(f"{base}_dequant"), r[key].get(fmt if dot else f"{fmt}_kernel")
        if kernel is None:
            continue
        win = dq is not None and dq < kernel
        wins[r["rows"]] = wins.get(r["rows"], True) and win
    best = None
    for t in sorted(wins, reverse=True):
        if not wins[t]:
            break
        best = t
    return best
