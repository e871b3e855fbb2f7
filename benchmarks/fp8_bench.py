"""fp8 experts on a CPU: the E4M3 -> float32 conversion torch does (one element at a time)
against ``offload_rt.quant.fp8.scaled_float32``, per expert and per one-token expert FFN.

    python benchmarks/fp8_bench.py [--shapes small,mixtral] [--repeats 7] [--threads 1]

For each shape (small: hidden 1024, intermediate 3584; mixtral: 4096, 14336), median
milliseconds over ``--repeats`` rounds, the variants alternated within each round:
* ``dequantize_ms``: both matrices of one expert (per-channel scales) into bfloat16 scratch,
  ``plain`` (``q.float() * s``, the path before) against ``fast``; the results are checked
  bit-identical;
* ``ffn_ms``: ``Fp8Format.ffn`` on one token (dequantize + the two products), plain vs fast;
* ``limit_ms``: the memory traffic a dequantization cannot avoid (read 1 byte, write 2 per
  weight) at the rate a bfloat16 copy of the expert's size reaches in the same round: the
  hardware's bound for this step.
Prints JSON: per shape the medians, ``fast_over_plain`` speed-ups and ``fast_over_limit``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

from offload_rt.quant import fp8
from offload_rt.quant.fp8 import FP8, Fp8Format

SHAPES = {"small": (1024, 3584), "mixtral": (4096, 14336)}


def _plain(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _record(fmt: Fp8Format) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    record = torch.zeros(fmt.nbytes, dtype=torch.uint8)
    views = fmt.layout.views(record)
    for weight, scale in (("w13", "s13"), ("w2", "s2")):
        q = torch.randn(views[weight].shape, generator=g) * 100
        views[weight].copy_(q.clamp(-448, 448).to(FP8))
        views[scale].copy_(torch.rand(views[scale].shape, generator=g) * 1e-3)
    return record


def bench_shape(hidden: int, inter: int, repeats: int) -> dict[str, object]:
    fmt = Fp8Format(hidden, inter, "channel", None)
    record = _record(fmt)
    v = fmt.layout.views(record)
    x = torch.randn(1, hidden, dtype=torch.bfloat16)
    out13 = torch.empty(2 * inter, hidden, dtype=torch.bfloat16)
    out2 = torch.empty(hidden, inter, dtype=torch.bfloat16)
    ref13, ref2 = out13.clone(), out2.clone()

    def dequant(into13: torch.Tensor, into2: torch.Tensor) -> None:
        fp8.dequantize_into(into13, v["w13"], v["s13"], fmt.block13)
        fp8.dequantize_into(into2, v["w2"], v["s2"], fmt.block2)

    with mock.patch.object(fp8, "scaled_float32", _plain):
        dequant(ref13, ref2)
    dequant(out13, out2)
    identical = torch.equal(out13.view(torch.int16), ref13.view(torch.int16)) and \
        torch.equal(out2.view(torch.int16), ref2.view(torch.int16))
    weights = 3 * hidden * inter
    src, dst = torch.empty(weights, dtype=torch.bfloat16), torch.empty(weights,
                                                                        dtype=torch.bfloat16)
    src.fill_(1.0)
    dst.copy_(src)  # its pages faulted in before the timed copies
    rows: dict[str, list[float]] = {k: [] for k in ("plain_dequant", "fast_dequant", "plain_ffn",
                                                    "fast_ffn", "copy")}
    for _ in range(repeats):  # interleaved
        with mock.patch.object(fp8, "scaled_float32", _plain):
            rows["plain_dequant"].append(_ms(lambda: dequant(out13, out2)))
            rows["plain_ffn"].append(_ms(lambda: fmt.ffn(x, record)))
        rows["fast_dequant"].append(_ms(lambda: dequant(out13, out2)))
        rows["fast_ffn"].append(_ms(lambda: fmt.ffn(x, record)))
        rows["copy"].append(_ms(lambda: dst.copy_(src)))
    med = {k: statistics.median(t) for k, t in rows.items()}
    limit = med["copy"] * 3 / 4  # a copy moves 4 bytes a weight, a dequantization 3
    return {"hidden": hidden, "intermediate": inter, "identical": identical,
            "dequantize_ms": {"plain": round(med["plain_dequant"], 2),
                              "fast": round(med["fast_dequant"], 2)},
            "ffn_ms": {"plain": round(med["plain_ffn"], 2), "fast": round(med["fast_ffn"], 2)},
            "limit_ms": round(limit, 2),
            "fast_over_plain": {"dequantize": round(med["plain_dequant"] / med["fast_dequant"], 2),
                                "ffn": round(med["plain_ffn"] / med["fast_ffn"], 2)},
            "fast_over_limit": round(limit / med["fast_dequant"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,mixtral")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "shapes": {name: bench_shape(*SHAPES[name], args.repeats)
                         for name in args.shapes.split(",")}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
