"""CUDA-only engine tests: pinned host slots, the copy stream's event ordering, and offloaded
runs on the GPU against the CPU (and GPU) resident model. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from offload_rt.checkpoint import Checkpoint
from offload_rt.direct_io import ALIGN
from offload_rt.engine.budget import footprint
from offload_rt.engine.offloaded import OffloadedExperts
from offload_rt.engine.slots import SlotPool
from offload_rt.engine.transfer import CudaHostToDevice

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SPEC = TinySpec(num_experts=8, top_k=2, num_layers=3, seed=41)
PROMPT = torch.randint(0, SPEC.vocab_size, (16,),
                       generator=torch.Generator().manual_seed(4)).tolist()
NEW_TOKENS = 16
MAX_SEQ = 64
MIN_MARGIN = 1e-3  # CPU vs GPU fp32 differ by ~1e-6: a smaller top-1/top-2 gap could flip a token
SLEEP_CYCLES = 200_000_000  # ~0.1 s of GPU time: long enough for an unordered copy to win


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("cuda"), SPEC)


def greedy_with_margin(rt: offload_rt.Runtime) -> tuple[list[int], float]:
    """Greedy tokens of the call sequence (prefill, then decode) and the smallest gap between
    the best and second-best logit along it."""
    logits = rt.model(torch.tensor(PROMPT), 0)[-1]
    tokens: list[int] = []
    margin = float("inf")
    for i in range(NEW_TOKENS):
        top = torch.topk(logits.float().cpu(), 2).values
        margin = min(margin, float(top[0] - top[1]))
        tokens.append(int(logits.argmax()))
        logits = rt.model(torch.tensor([tokens[-1]]), len(PROMPT) + i)[-1]
    return tokens, margin


@pytest.fixture(scope="module")
def cpu_reference(model_dir: Path) -> list[int]:
    with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=MAX_SEQ) as rt:
        tokens, margin = greedy_with_margin(rt)
        generated = rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
    assert margin > MIN_MARGIN, f"seed gives a near-tie ({margin:.2g}): pick another"
    assert generated == tokens
    return tokens


def forbid_device_wide_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """STYLE.md #6: the hot path only waits on events, never ``torch.cuda.synchronize`` or
    ``empty_cache``. Called after loading, so start-up may do as it likes."""
    def forbidden(*_: object, **__: object) -> None:
        raise AssertionError("device-wide synchronize/empty_cache on the hot path")

    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    monkeypatch.setattr(torch.cuda, "empty_cache", forbidden)


def test_host_slots_are_pinned() -> None:
    pool = SlotPool(3, 1024, torch.float32, torch.device("cpu"), pin_memory=True)
    assert pool.storage.is_pinned()
    assert [pool[i].shape for i in range(3)] == [(1024,)] * 3
    plain = SlotPool(3, 1024, torch.float32, torch.device("cpu"))
    assert not plain.storage.is_pinned()
    on_gpu = SlotPool(2, 1024, torch.float32, torch.device("cuda"), pin_memory=True)
    assert on_gpu.storage.is_cuda  # pin_memory only applies to host storage


def test_copy_stream_copies_and_ready_orders_the_reader() -> None:
    device = torch.device("cuda")
    h2d = CudaHostToDevice(device, num_slots=2)
    slots = torch.zeros(2, 4096, device=device)
    torch.cuda.current_stream(device).synchronize()  # the fill must not race the copy stream
    src = torch.arange(4096, dtype=torch.float32).pin_memory()
    compute = torch.cuda.Stream(device)
    with torch.cuda.stream(compute):
        h2d.copy(slots[1], src, 1)
        h2d.ready(1)  # the compute stream waits for the copy's event
        doubled = slots[1] * 2
        h2d.released(1)
    compute.synchronize()
    assert torch.equal(doubled.cpu(), src * 2)
    assert torch.equal(slots[0].cpu(), torch.zeros(4096))  # the other slot untouched


def _overwrite_while_read(ordered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot holds A; the compute stream sleeps, then reads the slot; meanwhile B is copied
    into it. Returns (what the read saw, A)."""
    device = torch.device("cuda")
    h2d = CudaHostToDevice(device, num_slots=1)
    a = torch.full((1 << 20,), 1.0).pin_memory()
    b = torch.full((1 << 20,), 7.0).pin_memory()
    slots = torch.empty(1, 1 << 20, device=device)
    compute = torch.cuda.Stream(device)
    with torch.cuda.stream(compute):
        h2d.copy(slots[0], a, 0)
        h2d.ready(0)
        torch.cuda._sleep(SLEEP_CYCLES)  # the read below runs only after this
        seen = slots[0] * 1  # a kernel reading the slot, enqueued but not yet run
        h2d.released(0)  # records the slot's last use on the compute stream
    if ordered:
        h2d.copy(slots[0], b, 0)  # must wait for the read before overwriting
    else:  # the bug the events prevent: a copy on another stream that waits for nothing
        side = torch.cuda.Stream(device)
        with torch.cuda.stream(side):
            slots[0].copy_(b, non_blocking=True)
        side.synchronize()
    compute.synchronize()
    return seen.cpu(), a


def test_copy_into_a_slot_waits_for_its_last_reader() -> None:
    seen, a = _overwrite_while_read(ordered=True)
    assert torch.equal(seen, a), "the copy overwrote the slot before the kernel read it"


def test_the_ordering_test_can_fail() -> None:
    """Control: without the event wait the same schedule does corrupt the read, so the test
    above is sensitive to the ordering it checks."""
    seen, a = _overwrite_while_read(ordered=False)
    assert not torch.equal(seen, a)


@pytest.mark.parametrize(("pool", "prefetch"), [("layer", 1), ("global", 2), ("layer", 0)])
def test_offloaded_on_gpu_gives_the_cpu_resident_tokens(model_dir: Path,
                                                       cpu_reference: list[int], pool: str,
                                                       prefetch: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fp = footprint(Checkpoint.open(model_dir).config, torch.float32, MAX_SEQ, 512,
                   device_type="cuda")  # the work buffers the runtime plans on a GPU
    pools = SPEC.num_layers if pool == "layer" else 1
    gpu_budget = fp.fixed + SPEC.top_k * pools * fp.slot  # the least the GPU tier accepts
    host_budget = (SPEC.top_k + 3) * fp.slot + ALIGN  # fewer host slots than experts, too
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with offload_rt.load(model_dir, device="cuda", dtype="float32", gpu_memory=gpu_budget,
                         cpu_memory=host_budget, pool=pool, prefetch=prefetch,
                         max_seq_len=MAX_SEQ) as rt:
        experts = rt.experts
        assert isinstance(experts, OffloadedExperts) and rt.offloaded
        assert experts.device.slots.storage.is_cuda
        assert experts.host is not None and experts.host.slots.storage.is_pinned()
        assert experts.host.cache.num_slots == SPEC.top_k + 3
        with monkeypatch.context() as hot_path:
            forbid_device_wide_sync(hot_path)
            tokens, _ = greedy_with_margin(rt)
            out = rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        experts.drain()
        assert dict(experts.device.cache.pins) == {} and dict(experts.host.cache.pins) == {}
    assert tokens == cpu_reference
    assert out.token_ids == cpu_reference
    assert out.stats["misses"] > 0 and out.stats["bytes_host_to_device"] > 0
    assert torch.cuda.max_memory_allocated() - before <= gpu_budget


def test_offloaded_on_gpu_is_bit_identical_to_resident_on_gpu(model_dir: Path) -> None:
    """Exactness holds on the GPU too: same kernels on the same shapes, whether the weights
    sit in a slot row or in their own allocation."""
    def run(**options: object) -> list[torch.Tensor]:
        with offload_rt.load(model_dir, device="cuda", dtype="float32", max_seq_len=MAX_SEQ,
                             **options) as rt:
            logits = [rt.model(torch.tensor(PROMPT), 0)]
            for i, tok in enumerate(PROMPT[:8]):
                logits.append(rt.model(torch.tensor([tok]), len(PROMPT) + i))
            return [t.cpu() for t in logits]

    resident = run(offload=False)
    offloaded = run(offload=True, cache_experts=SPEC.top_k, prefetch=1, cpu_memory="64MiB")
    for i, (a, b) in enumerate(zip(offloaded, resident, strict=True)):
        assert torch.equal(a, b), f"call {i}: max |diff| {(a - b).abs().max().item():.3g}"
