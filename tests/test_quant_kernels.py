"""The quantized kernels' rule (``offload_rt/quant/kernels.py``): torch's weight-only kernels for
few rows, dequantize + GEMM for many; both sides compute the same product, the choice is by row
count alone, and offloaded == resident holds on both sides of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint, make_quantized_checkpoint
from test_quant_budget import _quantized_model
from test_work_memory import assert_estimate_bounds, peak_allocated

import offload_rt
from offload_rt.engine import work_memory
from offload_rt.quant import int4_layout, kernels
from offload_rt.quant.int4 import cpu_layout, dequantize_int4, pack_for_cpu, quantize_int4
from offload_rt.quant.int8 import dequantize_int8, quantize_int8

MiB = 2**20
SPEC = TinySpec(num_experts=4, top_k=2, num_layers=2, hidden_size=64, intermediate_size=128,
                num_heads=4, num_kv_heads=2, seed=31, max_position_embeddings=1024)
DECODE_STEPS = 6


def _weights(n: int, k: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) / k**0.5
    q8, s8 = quantize_int8(w, dtype)
    q4, sz = quantize_int4(w, 32, dtype)
    return {"q8": q8, "s8": s8, "q4": pack_for_cpu(q4), "sz": sz,
            "w8": dequantize_int8(q8, s8, torch.float64),
            "w4": dequantize_int4(q4, sz, 32, torch.float64)}


def _scheme() -> int4_layout.Scheme:
    """The packing of this torch's int4 records (skips when it is none the kernels unpack)."""
    scheme = int4_layout.scheme_of_layout(cpu_layout())
    if scheme is None:
        pytest.skip(f"torch packs int4 here ({cpu_layout()}) in a layout quant.kernels does "
                    "not unpack: int4 always runs the kernel")
    return scheme


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_both_paths_compute_the_same_product(fmt: str, dtype: torch.dtype,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel and dequantize + GEMM against the float64 product of the dequantized weights, at
    a row count each is chosen for; several dequantization blocks (a small block size)."""
    scheme = _scheme() if fmt == "int4" else None
    monkeypatch.setattr(kernels, "DEQUANT_BLOCK_BYTES", 64 * 128 * 2)
    w = _weights(320, 128, dtype)
    assert len(kernels.blocks(320, 128, 2, 64)) == 5
    for rows in (1, 64):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).to(dtype)
        if fmt == "int8":
            kernel = torch.ops.aten._weight_int8pack_mm(x, w["q8"], w["s8"])
            dequant = kernels.int8_dequant_mm(x, w["q8"], w["s8"])
        else:
            kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w["q4"], 32, w["sz"])
            dequant = kernels.int4_dequant_mm(x, w["q4"], 32, w["sz"], scheme)
        want = x.double() @ w["w8" if fmt == "int8" else "w4"].T
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        for got in (kernel, dequant):
            assert got.dtype == dtype and got.shape == want.shape
            err = (got.double() - want).abs().max() / want.abs().max()
            assert err < tol, (rows, float(err))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_rule_is_the_row_count(fmt: str) -> None:
    """Below the threshold ``int8_mm`` / ``int4_mm`` are the kernel bit for bit, from it on the
    dequantize + GEMM path."""
    scheme = _scheme() if fmt == "int4" else None
    w = _weights(256, 128, torch.bfloat16)
    low = kernels.INT8_DEQUANT_MIN_ROWS if fmt == "int8" else kernels.INT4_DEQUANT_MIN_ROWS
    for rows, dequantized in ((1, False), (low - 1, False), (low, True), (2 * low, True)):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).bfloat16()
        if fmt == "int8":
            got = kernels.int8_mm(x, w["q8"], w["s8"])
            want = (kernels.int8_dequant_mm(x, w["q8"], w["s8"]) if dequantized else
                    torch.ops.aten._weight_int8pack_mm(x, w["q8"], w["s8"]))
            assert kernels.uses_int8_dequant(x) == dequantized
        else:
            got = kernels.int4_mm(x, w["q4"], 32, w["sz"], scheme)
            want = (kernels.int4_dequant_mm(x, w["q4"], 32, w["sz"], scheme) if dequantized
                    else torch.ops.aten._weight_int4pack_mm_for_cpu(x, w["q4"], 32, w["sz"]))
            assert kernels.uses_int4_dequant(x, 256, scheme) == dequantized
        assert torch.equal(got, want), rows


def _count_paths(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, int]]:
    """Count the calls of each path by rows of x (``int8_mm``/``int4_mm`` look them up in the
    module)."""
    calls: Counter[tuple[str, int]] = Counter()

    def counted(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def wrapper(*args: torch.Tensor) -> torch.Tensor:
            calls[name, args[0].shape[0]] += 1
            return fn(*args)
        return wrapper

    for name in ("int8_dequant_mm", "int4_dequant_mm"):
        monkeypatch.setattr(kernels, name, counted(name, getattr(kernels, name)))
    monkeypatch.setattr(kernels.torch.ops, "aten", _CountingAten(torch.ops.aten, counted))
    return calls


class _CountingAten:
    """``torch.ops.aten`` with the two weight-only kernels counted."""

    def __init__(self, aten: object, counted: Callable[..., Callable[..., torch.Tensor]]) -> None:
        self._aten, self._counted = aten, counted

    def __getattr__(self, name: str) -> object:
        op = getattr(self._aten, name)
        if name not in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"):
            return op
        return self._counted(name, op)


def _segments(threshold: int) -> list[int]:
    """Prompt pieces fed one forward each: with top-2 of 4 experts an expert gets about half of
    a piece's tokens, so pieces of about 2 x ``threshold`` put experts on both sides of it."""
    return [2 * threshold - 6, 2 * threshold, 2 * threshold + 6]


def _run_segments(rt: offload_rt.Runtime, tokens: list[int], pieces: list[int],
                  feed: list[int]) -> list[torch.Tensor]:
    """One forward per piece of ``tokens``, then one decode step per token of ``feed``."""
    logits, pos = [], 0
    for n in pieces:
        logits.append(rt.model(torch.tensor(tokens[pos:pos + n]), pos))
        pos += n
    return logits + [rt.model(torch.tensor([t]), pos + i) for i, t in enumerate(feed)]


@pytest.mark.parametrize("source", ["folder", "on_the_fly"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_offloaded_matches_resident_across_the_rule(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, source: str) -> None:
    """Forwards whose experts get row counts just below and from the threshold (kernel and
    dequantize + GEMM), then decode steps (one row: the kernels), resident and offloaded at
    minimum capacity with prefetch, both pools: the same logits bit for bit, and each path ran
    near the threshold."""
    if fmt == "int4":
        _scheme()  # skips where the kernels cannot unpack int4
    model_dir = (make_quantized_checkpoint(tmp_path, SPEC, fmt, 32) if source == "folder"
                 else make_hf_checkpoint(tmp_path, SPEC))
    low = kernels.INT8_DEQUANT_MIN_ROWS if fmt == "int8" else kernels.INT4_DEQUANT_MIN_ROWS
    pieces = _segments(low)
    opts: dict[str, object] = {"dtype": "float32",
                               "max_seq_len": sum(pieces) + DECODE_STEPS + 2}
    if source == "on_the_fly":
        opts.update(experts=fmt, **({"group_size": 32} if fmt == "int4" else {}))
    tokens = torch.randint(0, SPEC.vocab_size, (sum(pieces),),
                           generator=torch.Generator().manual_seed(5)).tolist()
    calls = _count_paths(monkeypatch)
    with offload_rt.load(model_dir, offload=False, **opts) as rt:
        feed = [int(_run_segments(rt, tokens, pieces, [])[-1][-1].argmax())]
        for i in range(DECODE_STEPS - 1):
            feed.append(int(rt.model(torch.tensor([feed[-1]]), sum(pieces) + i)[-1].argmax()))
        want = _run_segments(rt, tokens, pieces, feed)
    kernel = "_weight_int8pack_mm" if fmt == "int8" else "_weight_int4pack_mm_for_cpu"
    rows = {path: {n for (p, n) in calls if p == path} for path in (kernel, f"{fmt}_dequant_mm")}
    assert rows[kernel] & set(range(low // 2, low)), calls  # just below the threshold
    assert 1 in rows[kernel] and min(rows[f"{fmt}_dequant_mm"]) < 2 * low, calls
    assert max(rows[kernel]) < low <= min(rows[f"{fmt}_dequant_mm"]), calls
    for pool in ("layer", "global"):
        with offload_rt.load(model_dir, cache_experts=SPEC.top_k, prefetch=1, pool=pool,
                             **opts) as rt:
            assert rt.offloaded
            got = _run_segments(rt, tokens, pieces, feed)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(g, w), f"{pool} call {i}: {(g - w).abs().max().item():.3g}"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_work_term_counts_the_dequantized_blocks(fmt: str, dtype: torch.dtype,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill past the row threshold with several dequantization blocks per matrix: the
    peak of torch's allocations stays within ``forward_peak``, and not far below it."""
    if fmt == "int4":
        _scheme()  # skips where the kernels cannot unpack int4
    monkeypatch.setattr(kernels, "DEQUANT_BLOCK_BYTES", 256 * 2**10)
    fields = {"hidden_size": 512, "intermediate_size": 1536, "num_heads": 8, "head_dim": 64}
    tokens = keys = 128
    model, quantized = _quantized_model(fields, dtype, fmt, keys)
    assert len(kernels.blocks(3072, 512, 2, 64)) > 1
    ids = torch.randint(0, model.cfg.vocab_size, (tokens,),
                        generator=torch.Generator().manual_seed(1))
    measured = peak_allocated(lambda: model(ids, 0, last_only=True))
    estimate = work_memory.forward_peak(model.cfg, dtype, tokens, keys, fmt=quantized)
    assert_estimate_bounds(measured, estimate)


KERNEL_PROBE = """
import sys, torch
from offload_rt.quant import kernels
k = int(sys.argv[1])
gen = torch.Generator().manual_seed(k)
w = torch.randint(-127, 128, (32, k), dtype=torch.int8, generator=gen)
s = torch.rand(32, generator=gen).to(torch.bfloat16)
worst = 0.0
for rows in range(1, 12):
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    ref = x.float() @ (w.float() * s.float()[:, None]).T
    err = (kernels.int8_mm(x, w, s).float() - ref).abs().max() / ref.abs().max()
    worst = max(worst, float(err))
print(worst)
"""


@pytest.mark.parametrize("k", [24, 40, 56, 64])
def test_int8_products_are_right_whatever_the_inner_size(k: int) -> None:
    """torch's int8 kernel crashed (SIGSEGV) or was off by ~500 at K = 24, 40, 56 with 2-11
    rows (found on a Qwen2-MoE whose experts are 24 wide); run in a subprocess so a crash is a
    failure, not the end of the suite."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", KERNEL_PROBE, str(k)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout) < 0.02  # relative to the largest output: bf16 rounding
