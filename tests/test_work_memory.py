"""The work term of the budget is sized from measured forwards.

For several shapes (demo-like, a large vocabulary, a long prefill chunk, decode steps, float32,
bfloat16 by oneDNN and by ``cpu_linear``'s float32 path, float16, one and two threads, a sliding
window) the peak of torch's allocations during a real ``Transformer.forward`` (torch.profiler,
``profile_memory=True``: every tensor torch allocates, intermediates of its kernels included) is
at most ``work_memory.forward_peak``, and ``forward_peak`` at most 2 x measured + 1 MiB: the test
fails if the estimate is too small and if it is absurdly large. Every token is routed to the same
experts (gates zeroed), the widest the MoE layer gets. A whole generation (chunked prefill,
sampling, offloaded experts read and converted) peaks within ``footprint(...).work``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import offload_rt
from offload_rt.config import ModelConfig
from offload_rt.engine import work_memory
from offload_rt.engine.budget import footprint
from offload_rt.model import cpu_linear
from offload_rt.model.experts import ResidentExperts
from offload_rt.model.transformer import Transformer

MiB = 2**20
SLACK = 1 * MiB  # the upper bound: forward_peak <= 2 x measured + SLACK


def _config(**fields: Any) -> ModelConfig:
    """The demo model's shapes (6 layers cut to 2), with ``fields`` changed."""
    base = ModelConfig(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=32, num_experts=8, top_k=2, vocab_size=4000,
                       rms_norm_eps=1e-5, rope_theta=1e4, max_seq_len=4096)
    return dataclasses.replace(base, **fields)


def _model(cfg: ModelConfig, dtype: torch.dtype, max_seq_len: int) -> Transformer:
    """Seeded random weights; zero gates, so every token picks the same top_k experts."""
    model = Transformer(cfg, device="cpu")
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.data = (0.05 * torch.randn(p.shape, generator=gen)).to(dtype)
    for block in model.layers:
        block.router.weight.data.zero_()
    experts = {(layer, e): (0.05 * torch.randn(cfg.expert_numel, generator=gen)).to(dtype)
               for layer in range(cfg.num_layers) for e in range(cfg.num_experts)}
    model.attach(ResidentExperts(experts, cfg.num_experts), max_seq_len)
    return model.eval()


def assert_estimate_bounds(measured: int, estimate: int) -> None:
    """The estimate covers the measured peak and is not far above it (<= 2x + ``SLACK``)."""
    report = f"measured {measured / MiB:.3f} MiB, estimate {estimate / MiB:.3f} MiB"
    assert measured <= estimate <= 2 * measured + SLACK, report


def peak_allocated(run: Callable[[], object]) -> int:
    """Peak bytes of torch's CPU allocations alive during ``run()`` beyond those alive before:
    the profiler's allocation (+) and free (-) events, summed in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
        del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _forward_peak(model: Transformer, tokens: int, start: int) -> int:
    ids = torch.randint(0, model.cfg.vocab_size, (tokens,),
                        generator=torch.Generator().manual_seed(1))
    return peak_allocated(lambda: model(ids, start, last_only=True))


CASES = {  # name: (config fields, dtype, tokens of the forward, positions attended)
    "demo-prefill": ({}, torch.bfloat16, 512, 512),
    "demo-decode": ({}, torch.bfloat16, 1, 512),
    "float32-prefill": ({}, torch.float32, 512, 512),
    "float16-prefill": ({}, torch.float16, 300, 512),
    "large-vocab-decode": ({"vocab_size": 32000}, torch.float32, 1, 64),
    "large-vocab-prefill": ({"vocab_size": 32000}, torch.bfloat16, 64, 64),
    "long-prefill-chunk": ({"hidden_size": 256, "intermediate_size": 512, "num_heads": 8},
                           torch.float32, 1024, 2048),
    "wide-experts": ({"hidden_size": 512, "intermediate_size": 1536, "num_heads": 8,
                      "head_dim": 64}, torch.bfloat16, 256, 256),
    # the MoE phase peaks in the second expert's FFN, the first one's output still held
    "wide-experts-float32": ({"hidden_size": 512, "intermediate_size": 1536, "num_heads": 8,
                              "head_dim": 64}, torch.float32, 256, 256),
    "long-context-decode": ({"hidden_size": 256, "intermediate_size": 512, "num_heads": 8},
                            torch.float32, 1, 4096),
}
RUNS = ([(name, 1, False) for name in CASES]
        + [(name, 1, True) for name, case in CASES.items() if case[1] == torch.bfloat16]
        + [("demo-prefill", 2, False), ("demo-decode", 2, False), ("wide-experts", 2, True)])


@pytest.mark.parametrize(("name", "threads", "fp32_path"), RUNS,
                         ids=[f"{n}-{t}thread{'-fp32path' if f else ''}" for n, t, f in RUNS])
def test_forward_peak_bounds_the_measured_peak(name: str, threads: int, fp32_path: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fields, dtype, tokens, keys = CASES[name]
    # bf16 GEMMs run in oneDNN on CPUs with bf16 instructions, else by cpu_linear's float32
    # blocks: take each path whatever this CPU has (the estimate follows the same switch)
    monkeypatch.setattr(cpu_linear, "native_bf16", lambda: not fp32_path)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = _config(**fields)
        measured = _forward_peak(_model(cfg, dtype, keys), tokens, keys - tokens)
    finally:
        torch.set_num_threads(before)
    estimate = work_memory.forward_peak(cfg, dtype, tokens, keys, threads=threads)
    assert_estimate_bounds(measured, estimate)


@pytest.mark.parametrize(("tokens", "dtype"), [(512, torch.bfloat16), (256, torch.float32),
                                               (1, torch.float32)])
def test_cuda_bound_covers_the_math_attention(tokens: int, dtype: torch.dtype) -> None:
    """CUDA's estimate bounds attention by torch's math path (what a masked grouped-query
    prefill falls back to there); the same composite code runs on the CPU when forced."""
    cfg, keys = _config(), 512
    model = _model(cfg, dtype, keys)
    with sdpa_kernel([SDPBackend.MATH]):
        measured = _forward_peak(model, tokens, keys - tokens)
    estimate = work_memory.forward_peak(cfg, dtype, tokens, keys, device_type="cuda")
    assert measured <= estimate <= 2 * measured + SLACK


def test_chunk_past_a_sliding_window() -> None:
    """A chunk running past a full window attends over [window; chunk] keys, concatenated:
    that copy is the KV cache term's, the rest the work term's."""
    cfg, window, tokens, start = _config(sliding_window=64, max_seq_len=512), 64, 128, 256
    model = _model(cfg, torch.float32, 512)
    model(torch.randint(0, cfg.vocab_size, (start,)), 0, last_only=True)
    measured = _forward_peak(model, tokens, start)
    keys = window + tokens
    kv_copy = 2 * keys * cfg.num_kv_heads * cfg.head_dim * 4  # in footprint's kv_cache
    estimate = work_memory.forward_peak(cfg, torch.float32, tokens, keys, window=True)
    assert measured <= estimate + kv_copy <= 2 * measured + SLACK


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_generation_peaks_within_the_work_term(dtype: str | None) -> None:
    """The shipped demo model offloaded (4 of 8 experts per layer; in float32 its bf16 experts
    are read and converted), a 40-token prompt prefilled in 16-token chunks, 8 sampled tokens:
    the peak of everything torch allocates during the generation is within ``work``, and
    ``work`` is close to it (the constant: library buffers torch's allocator does not see,
    rotary tables, sampler, expert-read bounce buffers, margin: 4 MiB). Prefetch is off: the
    profiler records the calling thread only, so every expert read happens in it."""
    assert_generation_within_work(dtype=dtype, prefill_chunk=16, prefetch=0)


def assert_generation_within_work(**options: object) -> None:
    """The demo model loaded with ``options`` (offloaded; prefetch off, so every read is on the
    profiled calling thread): a 40-token prompt and 8 sampled tokens peak within the work term,
    and the term is close to the peak."""
    with offload_rt.load(**options) as rt:  # type: ignore[arg-type]
        prompt = torch.randint(3, rt.config.vocab_size, (40,),
                               generator=torch.Generator().manual_seed(2)).tolist()
        measured = peak_allocated(lambda: rt.generate(prompt, max_new_tokens=8, temperature=0.8,
                                                      top_p=0.9, seed=3))
        work = rt.plan.footprint.work
        assert rt.offloaded and rt.stats.misses > 0
    assert measured <= work <= 2 * measured + 4 * MiB, f"{measured=} {work=}"


def test_demo_work_buffers_are_sized_from_its_shapes() -> None:
    """The demo model's work term follows its chunk: the default 512-token chunk needs more than
    a 16-token one, and neither carries a flat reserve (the old estimate: 79 MiB)."""
    with offload_rt.load(prefetch=0) as rt:
        cfg, dt = rt.config, rt.dtype
    work_512 = footprint(cfg, dt, 512, 512).work
    work_16 = footprint(cfg, dt, 512, 16).work
    assert work_16 < work_512 < 8 * MiB
