"""Bit-exactness by construction: every path hands the kernels each expert at the same address
modulo ALIGN, so offloading cannot change the bits whatever the CPU's kernels do with alignment.

CPU kernels round differently at different weight addresses (MKL's float32 single-row kernel on
AVX-512 EPYCs: ``benchmarks/alignment_probe.py``). Three kinds of tests:

* the rule itself, checked on the addresses (fails on any CPU when a path breaks it): resident,
  cold O_DIRECT and warm reads, a substituted plain reader, the CUDA layout's host tier run on
  CPU, for every file dtype / compute dtype pair, odd sizes included;
* results at several file phases of the experts (header padding shifts every tensor): resident
  and offloaded logits bit-identical, at one and at several threads (fails on sensitive CPUs
  when the rule is broken);
* the rule's basis, on this CPU: a kernel's bits depend on a weight's address only modulo
  ALIGN (experts), and not at all among 64-byte aligned addresses (the trunk and activations,
  which torch's allocator places).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint, read_safetensors
from safetensors.torch import save_file

import offload_rt
from cache_policies import ExpertKey, LRUPolicy, make_policy
from offload_rt.checkpoint import Checkpoint
from offload_rt.direct_io import ALIGN
from offload_rt.engine.assemble import build_offloaded, disk_reader
from offload_rt.engine.expert_cache import ExpertCache
from offload_rt.engine.offloaded import OffloadedExperts, Tier
from offload_rt.engine.placement import ExpertPlacement
from offload_rt.engine.slots import SlotPool
from offload_rt.engine.transfer import HostToDevice
from offload_rt.model.cpu_linear import linear
from offload_rt.model.experts import expert_ffn

MAX_SEQ = 48
PROMPT = [5, 17, 3, 99, 42, 7, 64, 1, 88, 23, 11, 70]  # a prefill: experts get 1..n tokens
DECODE = [9, 31, 2, 77, 50, 14]
CPU = torch.device("cpu")

# Odd sizes: a packed expert of 3*27*37 elements, so the experts' file offsets (and phases) take
# every multiple of the item size; a 64-byte aligned fresh tensor matches few of them.
ODD: dict[str, int] = {"num_experts": 4, "top_k": 1, "num_layers": 2, "hidden_size": 27,
                       "head_dim": 8, "intermediate_size": 37, "seed": 13}
DTYPE_PAIRS = [  # (file dtype, compute dtype)
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
    (torch.float16, torch.float32)]


def record_addresses(provider: object) -> dict[ExpertKey, set[int]]:
    """Wrap ``provider.acquire``: the address modulo ALIGN of every buffer it hands out."""
    seen: dict[ExpertKey, set[int]] = defaultdict(set)
    original = provider.acquire  # type: ignore[attr-defined]

    @contextmanager
    def acquire(layer: int, experts: Sequence[int]) -> Iterator[Mapping[int, torch.Tensor]]:
        with original(layer, experts) as buffers:
            for e, buf in buffers.items():
                seen[ExpertKey(layer, e)].add(buf.data_ptr() % ALIGN)
            yield buffers

    provider.acquire = acquire  # type: ignore[attr-defined]
    return seen


def run_calls(rt: offload_rt.Runtime) -> list[torch.Tensor]:
    """A prefill, then decode steps: every call's logits."""
    logits = [rt.model(torch.tensor(PROMPT), 0)]
    for i, tok in enumerate(DECODE):
        logits.append(rt.model(torch.tensor([tok]), len(PROMPT) + i))
    return logits


def assert_equal_logits(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), (f"{what}: call {i} (0 = prefill) differs, max |diff| "
                                   f"{(g.float() - w.float()).abs().max().item():.3g}")


def plain_reader(ckpt: Checkpoint) -> Callable[[ExpertKey, torch.Tensor], None]:
    """A reader that is only a callable (no ``nbytes``), as a user or a fault test injects."""
    real = disk_reader(ckpt, drop_page_cache=True)
    return lambda key, out: real(key, out)


def host_tier_engine(rt: offload_rt.Runtime) -> OffloadedExperts:
    """The CUDA layout with both tiers in RAM: disk -> host slots -> (copy) -> device slots."""
    cfg, dtype = rt.config, rt.dtype
    dev = ExpertCache("device", cfg.top_k * cfg.num_layers, 1, LRUPolicy)
    host = ExpertCache("host", cfg.top_k + 1, 1, LRUPolicy)
    item = torch.empty((), dtype=dtype).element_size()
    return OffloadedExperts(
        Tier(dev, SlotPool(dev.num_slots, cfg.expert_numel, dtype, CPU)),
        disk_reader(rt.checkpoint, drop_page_cache=True), cfg.expert_numel * item,
        placement=ExpertPlacement(rt.checkpoint, dtype, CPU),
        host=Tier(host, SlotPool(host.num_slots, cfg.expert_numel, dtype, CPU)),
        h2d=HostToDevice(), per_layer=False)


def _swap(rt: offload_rt.Runtime, experts: OffloadedExperts) -> None:
    rt.experts.close()
    rt.experts = experts
    rt.model.attach(experts, rt.max_seq_len)


PATHS = ("cold", "warm", "plain_reader", "host_tier")


def _offloaded_path(rt: offload_rt.Runtime, path: str) -> None:
    if path == "plain_reader":
        _swap(rt, build_offloaded(rt.checkpoint, rt.model, rt.plan, lambda: make_policy("lru"),
                                  dtype=rt.dtype, device=CPU, prefetch_depth=1,
                                  drop_page_cache=True, reader=plain_reader(rt.checkpoint)))
    elif path == "host_tier":
        _swap(rt, host_tier_engine(rt))


@pytest.fixture(scope="module")
def odd_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[torch.dtype], Path]:
    made: dict[torch.dtype, Path] = {}

    def get(dtype: torch.dtype) -> Path:
        if dtype not in made:
            made[dtype] = make_hf_checkpoint(tmp_path_factory.mktemp(f"odd_{dtype}"),
                                             TinySpec(dtype=dtype, **ODD))
        return made[dtype]

    return get


@pytest.mark.parametrize(("file_dtype", "dtype"), DTYPE_PAIRS,
                         ids=[f"{a}-{b}".replace("torch.", "") for a, b in DTYPE_PAIRS])
def test_every_path_places_each_expert_where_the_resident_model_has_it(
        odd_checkpoints: Callable[[torch.dtype], Path], file_dtype: torch.dtype,
        dtype: torch.dtype) -> None:
    model_dir = odd_checkpoints(file_dtype)
    name = str(dtype).replace("torch.", "")
    placement = ExpertPlacement(Checkpoint.open(model_dir), dtype, CPU)
    with offload_rt.load(model_dir, dtype=name, offload=False, max_seq_len=MAX_SEQ) as rt:
        resident = record_addresses(rt.experts)
        want = run_calls(rt)
    rule = {key: {placement.compute_phase(key)} for key in resident}
    assert resident == rule
    if file_dtype == dtype:  # the file's phases, which a fresh (64-byte aligned) tensor lacks
        assert any(phase % 64 for (phase,) in rule.values()), rule
    for path in PATHS:
        with offload_rt.load(model_dir, dtype=name, offload=True, cache_experts=1, prefetch=1,
                             drop_page_cache=path != "warm", max_seq_len=MAX_SEQ) as rt:
            _offloaded_path(rt, path)
            seen = record_addresses(rt.experts)
            got = run_calls(rt)
        assert {k: seen[k] for k in resident if k in seen} == \
            {k: rule[k] for k in resident if k in seen}, path
        assert set(seen) <= set(rule) and len(seen) > 1, path
        assert_equal_logits(got, want, f"{path}, {file_dtype} file in {dtype}")


def pad_header(model_dir: Path, nbytes: int) -> None:
    """Shift every tensor of ``model.safetensors`` by ``nbytes`` (a multiple of 8: the header is
    padded to 8 bytes) through a longer ``__metadata__``."""
    path = model_dir / "model.safetensors"
    metadata, tensors = read_safetensors(path)
    before = path.stat().st_size
    save_file(tensors, path, {**(metadata or {}), "pad": "x" * nbytes})
    # '"pad":"' + '",' adds 9 bytes of JSON besides the x's; rounding to 8 absorbs the rest
    assert path.stat().st_size - before in range(nbytes, nbytes + 17)


FILE_SHIFTS = (0, 8, 16, 24, 40)
DEFAULT_THREADS = max(2, min(4, os.cpu_count() or 1))


@pytest.mark.parametrize("threads", [1, DEFAULT_THREADS])
@pytest.mark.parametrize("shift", FILE_SHIFTS)
def test_offloaded_matches_resident_at_every_file_phase(tmp_path: Path, shift: int,
                                                        threads: int) -> None:
    """Experts whose file bytes start at several phases (so do their slots); the resident
    model must follow them. Float32, where single-row kernels are the most sensitive."""
    model_dir = make_hf_checkpoint(tmp_path, TinySpec(num_experts=4, top_k=2, num_layers=2,
                                                      seed=21))
    pad_header(model_dir, shift)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with offload_rt.load(model_dir, offload=False, max_seq_len=MAX_SEQ) as rt:
            want = run_calls(rt)
        for drop in (True, False):
            with offload_rt.load(model_dir, offload=True, cache_experts=2, prefetch=1,
                                 drop_page_cache=drop, max_seq_len=MAX_SEQ) as rt:
                assert_equal_logits(run_calls(rt), want, f"shift {shift}, drop {drop}")
    finally:
        torch.set_num_threads(before)


# ---- the basis: what the kernels' bits depend on, on this CPU ------------------------------------

def _at(storage: torch.Tensor, byte_offset: int, like: torch.Tensor) -> torch.Tensor:
    """A copy of ``like`` at ``byte_offset`` past ``storage``'s first ALIGN boundary."""
    item = like.element_size()
    start = (-storage.data_ptr()) % ALIGN // item + byte_offset // item
    view = storage[start:start + like.numel()].view(like.shape)
    view.copy_(like)
    assert (view.data_ptr() - byte_offset) % ALIGN == 0
    return view


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 16, 33])
def test_kernel_bits_depend_on_weight_address_only_modulo_align(dtype: torch.dtype,
                                                                rows: int) -> None:
    """The placement rule's basis: an expert at the same phase in another page gives the same
    bits (experts sit at file phases: any multiple of the item size), and so does a weight at
    any 64-byte aligned address (the trunk and activations: torch allocates at 64 bytes)."""
    gen = torch.Generator().manual_seed(rows)
    hidden, inter = 40, 72
    packed = torch.randn(3 * hidden * inter, generator=gen).to(dtype)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    storage = torch.empty(packed.numel() + 4 * ALIGN, dtype=dtype)
    item = packed.element_size()
    for phase in (0, item, 6 * item, 64, 1000 * item):
        want = expert_ffn(x, _at(storage, phase, packed), hidden, inter)
        for other in (phase + ALIGN, phase + 2 * ALIGN):
            got = expert_ffn(x, _at(storage, other, packed), hidden, inter)
            assert torch.equal(got, want), (dtype, rows, phase, other)
    weight = packed[: inter * hidden].view(inter, hidden)
    want = linear(x, _at(storage, 0, weight))
    for offset in (64, 128, 192, 448, ALIGN + 64):
        assert torch.equal(linear(x, _at(storage, offset, weight)), want), (dtype, rows, offset)
