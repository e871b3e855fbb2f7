"""Quantized experts never change the answer either: offloaded == resident, bit for bit.

For int8 and int4 experts, read from a quantized folder (records) and quantized as they are
read from a float folder (``--experts``), the offloaded runtime must give exactly
(``torch.equal``) the logits of the resident runtime of the same format for the call sequence
of ``test_engine_exactness`` (a prefill, then decode steps fed with the resident run's greedy
tokens), and the same tokens through ``generate``: every policy at minimum capacity, prefetch
0/1/2, per-layer and global pools, and the CUDA tier layout (disk -> host slots -> device
slots) run on the CPU. A folder and the on-the-fly quantization of its float source hold the
same records, so they agree with each other too. "int8-int8dot" and "int4-int8dot" are those
records computed by the int8-dot kernels (``--quant-kernel int8-dot``, ``quant.int_dot``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint, make_quantized_checkpoint
from test_engine_exactness import count_accesses, run_sequence

import offload_rt
from cache_policies import LRUPolicy
from offload_rt.engine.assemble import disk_reader
from offload_rt.engine.expert_cache import ExpertCache
from offload_rt.engine.offloaded import OffloadedExperts, Tier
from offload_rt.engine.placement import ExpertPlacement
from offload_rt.engine.prefetch import NextLayerPredictor
from offload_rt.engine.slots import SlotPool
from offload_rt.engine.transfer import HostToDevice
from offload_rt.quant.formats import ExpertFormat

SPEC = TinySpec(num_experts=4, top_k=2, num_layers=2, hidden_size=64, intermediate_size=128,
                num_heads=4, num_kv_heads=2, seed=31)
GROUP = 32
PROMPT_LEN = DECODE_STEPS = NEW_TOKENS = 12
MAX_SEQ = 48
FORMATS = ("int8", "int4", "int8-int8dot", "int4-int8dot")
KERNELS = {"int8-int8dot": "int8-dot", "int4-int8dot": "int8-dot"}  # its --quant-kernel
SOURCES = ("folder", "on_the_fly")
POLICIES = ("lru", "lfu", "lrfu", "router", "static")


@dataclass(frozen=True)
class QuantReference:
    """A folder and the load options that run it in one format; the resident run's results."""

    model_dir: Path
    options: dict[str, object]
    prompt: list[int]
    feed: list[int]
    logits: list[torch.Tensor]
    accesses: int
    generated: list[int]


def _base(fmt: str) -> str:
    """The records' format: int8 or int4 for "int8-int8dot" or "int4-int8dot"."""
    return fmt.split("-")[0]


def _options(fmt: str, source: str) -> dict[str, object]:
    kernel = {"quant_kernel": KERNELS[fmt]} if fmt in KERNELS else {}
    if source == "folder":
        return kernel
    return {"experts": _base(fmt), **({"group_size": GROUP} if _base(fmt) == "int4" else {}),
            **kernel}


def _reference(model_dir: Path, options: dict[str, object]) -> QuantReference:
    prompt = torch.randint(0, SPEC.vocab_size, (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(SPEC.seed)).tolist()
    with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=MAX_SEQ,
                         **options) as rt:
        assert not rt.offloaded and rt.expert_format.name != "float"
        assert getattr(rt.expert_format, "kernel", "torch") == options.get("quant_kernel", "torch")
        accesses = count_accesses(rt.experts)
        logits = [rt.model(torch.tensor(prompt), 0)]
        feed: list[int] = []
        for i in range(DECODE_STEPS):
            feed.append(int(logits[-1][-1].argmax()))
            logits.append(rt.model(torch.tensor([feed[-1]]), PROMPT_LEN + i))
        n = accesses[0]
        generated = rt.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
    assert len(set(feed)) > 3, f"degenerate reference (tokens {feed}): pick another seed"
    return QuantReference(model_dir, options, prompt, feed, logits, n, generated)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], QuantReference]:
    """(format, source) -> its resident reference, built once per module."""
    made: dict[tuple[str, str], QuantReference] = {}
    folders: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in folders:
            out = tmp_path_factory.mktemp(name)
            folders[name] = (make_hf_checkpoint(out, SPEC) if name == "float" else
                             make_quantized_checkpoint(out, SPEC, name, GROUP))
        return folders[name]

    def get(fmt: str, source: str) -> QuantReference:
        if (fmt, source) not in made:
            model_dir = folder(_base(fmt) if source == "folder" else "float")
            made[fmt, source] = _reference(model_dir, _options(fmt, source))
        return made[fmt, source]

    return get


def _load(ref: QuantReference, **options: object) -> offload_rt.Runtime:
    return offload_rt.load(ref.model_dir, dtype="float32", offload=True, max_seq_len=MAX_SEQ,
                           **ref.options, **options)


def assert_same_logits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"call {i} (0 = prefill): max |diff| " \
                                  f"{(g - w).abs().max().item():.3g}"


CASES = list(itertools.product(FORMATS, SOURCES, POLICIES, (0, 1, 2), ("layer", "global")))


@pytest.mark.parametrize(("fmt", "source", "policy", "depth", "pool"), CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_offloaded_matches_resident(reference: Callable[[str, str], QuantReference], fmt: str,
                                    source: str, policy: str, depth: int, pool: str) -> None:
    ref = reference(fmt, source)
    with _load(ref, cache_experts=SPEC.top_k, policy=policy, prefetch=depth, pool=pool) as rt:
        experts = rt.experts
        assert isinstance(experts, OffloadedExperts)
        assert experts.device.slots.storage.dtype == torch.uint8  # slots hold records
        accesses = count_accesses(experts)
        experts.stats.reset()
        assert_same_logits(run_sequence(rt, ref.prompt, ref.feed), ref.logits)
        assert accesses[0] == ref.accesses
        assert experts.stats.misses > 0
        out = rt.generate(ref.prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert out.token_ids == ref.generated


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_folder_and_its_float_source_quantized_at_load_agree(
        reference: Callable[[str, str], QuantReference], fmt: str) -> None:
    """The factory's records and the QuantizingReader's are encoded from the same float
    weights with the same scale dtype: the same bytes, so the same logits."""
    assert_same_logits(reference(fmt, "on_the_fly").logits, reference(fmt, "folder").logits)


@pytest.mark.parametrize(("fmt", "source"), list(itertools.product(FORMATS, SOURCES)))
def test_bfloat16_compute_matches_resident(tmp_path: Path, fmt: str, source: str) -> None:
    """A 16-bit compute dtype: the scales are in it, x is not cast (min capacity, prefetch)."""
    spec = TinySpec(**{**SPEC.__dict__, "dtype": torch.bfloat16})
    model_dir = (make_quantized_checkpoint(tmp_path, spec, _base(fmt), GROUP) if source == "folder"
                 else make_hf_checkpoint(tmp_path, spec))
    opts = {"max_seq_len": MAX_SEQ, **_options(fmt, source)}
    prompt = list(range(3, 3 + PROMPT_LEN))
    with offload_rt.load(model_dir, offload=False, **opts) as rt:
        assert rt.dtype == torch.bfloat16
        want = rt.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
        logits = run_sequence(rt, prompt, want)
    for pool in ("layer", "global"):
        with offload_rt.load(model_dir, cache_experts=spec.top_k, prefetch=1, pool=pool,
                             **opts) as rt:
            assert_same_logits(run_sequence(rt, prompt, want), logits)
            out = rt.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            assert out.token_ids == want


# ---- the CUDA layout (disk -> host tier -> device tier), both tiers in CPU memory ---------------

def two_tier(rt: offload_rt.Runtime, fmt: ExpertFormat, per_pool: int, pools: int,
             host_slots: int, depth: int) -> OffloadedExperts:
    """What ``build_offloaded`` makes for a GPU, for records, with the device tier in RAM."""
    cfg, cpu = rt.config, torch.device("cpu")
    dev = ExpertCache("device", per_pool, pools, LRUPolicy)
    host = ExpertCache("host", host_slots, 1, LRUPolicy)
    predictor = NextLayerPredictor([b.ffn_norm for b in rt.model.layers],
                                   [b.router for b in rt.model.layers], cfg.top_k)
    return OffloadedExperts(
        Tier(dev, SlotPool(dev.num_slots, fmt.numel, fmt.storage_dtype, cpu)),
        disk_reader(rt.checkpoint, True, fmt), fmt.nbytes,
        placement=ExpertPlacement.for_format(rt.checkpoint, fmt, cpu),
        host=Tier(host, SlotPool(host_slots, fmt.numel, fmt.storage_dtype, cpu)),
        h2d=HostToDevice(), predictor=predictor, prefetch_depth=depth, per_layer=pools > 1)


def swap_in(rt: offload_rt.Runtime, experts: OffloadedExperts) -> None:
    rt.experts.close()
    rt.experts = experts
    rt.model.attach(experts, rt.max_seq_len, rt.expert_format.ffn)


HOST_CASES = [(0, 0, "layer"), (0, 1, "global"), (2, 2, "layer"), (99, 1, "layer")]


@pytest.mark.parametrize(("host_extra", "depth", "pool"), HOST_CASES)
@pytest.mark.parametrize(("fmt", "source"), list(itertools.product(FORMATS, SOURCES)))
def test_host_tier_path_matches_resident(reference: Callable[[str, str], QuantReference],
                                         fmt: str, source: str, host_extra: int, depth: int,
                                         pool: str) -> None:
    ref = reference(fmt, source)
    pools = SPEC.num_layers if pool == "layer" else 1
    per_pool = SPEC.top_k * SPEC.num_layers // pools
    host_slots = min(SPEC.top_k + host_extra, SPEC.num_layers * SPEC.num_experts)
    with _load(ref, cache_experts=SPEC.top_k) as rt:
        fmt_ = rt.expert_format
        experts = two_tier(rt, fmt_, per_pool, pools, host_slots, depth)
        swap_in(rt, experts)
        logits = run_sequence(rt, ref.prompt, ref.feed)
        experts.drain()
        s = experts.stats
    assert_same_logits(logits, ref.logits)
    assert s.host_misses > 0 and s.bytes_host_to_device > 0
    # what crosses the host -> device link is records, whatever the disk holds
    assert s.bytes_host_to_device == (s.misses + s.prefetch_issued) * fmt_.nbytes


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("source", SOURCES)
def test_int8_on_a_gpu_matches_resident_on_the_gpu(
        reference: Callable[[str, str], QuantReference], source: str) -> None:
    """int8 records in pinned host slots, copied to GPU slots, dequantized for one GEMM."""
    ref = reference("int8", source)
    opts = {"dtype": "float32", "max_seq_len": MAX_SEQ, "device": "cuda", **ref.options}
    with offload_rt.load(ref.model_dir, offload=False, **opts) as rt:
        want = run_sequence(rt, ref.prompt, ref.feed)
    for pool in ("layer", "global"):
        with offload_rt.load(ref.model_dir, offload=True, cache_experts=SPEC.top_k, prefetch=1,
                             pool=pool, **opts) as rt:
            assert rt.experts.host is not None
            assert_same_logits(run_sequence(rt, ref.prompt, ref.feed), want)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_int8_dot_kernel_is_what_runs(reference: Callable[[str, str], QuantReference],
                                          fmt: str) -> None:
    """Its own bits (int8 activations), near torch's kernel's on the same records: the
    -int8dot cases above run the kernel they name, not torch's."""
    dot, torch_kernel = reference(f"{fmt}-int8dot", "folder"), reference(fmt, "folder")
    assert not all(torch.equal(a, b) for a, b in zip(dot.logits, torch_kernel.logits))
    first = dot.logits[0], torch_kernel.logits[0]
    assert (first[0] - first[1]).abs().max() < 0.05 * first[1].abs().max()
