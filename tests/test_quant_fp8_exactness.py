"""fp8 experts never change the answer either: offloaded == resident, bit for bit.

The records of an fp8 checkpoint (``quant.fp8``) are computed from their bytes alone, by a rule
of shapes and dtypes, so the offloaded runtime must give exactly (``torch.equal``) the logits of
the resident runtime for ``test_engine_exactness``'s call sequence and the same tokens through
``generate``: every policy at minimum capacity, prefetch 0/1/2, both pools, reads past the page
cache or through it, bfloat16 compute, and the CUDA tier layout (disk -> host slots -> device
slots) run on the CPU, whose host -> device link moves records.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from test_engine_exactness import count_accesses, run_sequence
from test_quant_exactness import assert_same_logits, swap_in, two_tier
from test_quant_fp8 import SPEC, VARIANTS, make_fp8_checkpoint

import offload_rt
from offload_rt.engine.offloaded import OffloadedExperts
from offload_rt.quant.fp8 import Fp8Format

PROMPT_LEN = DECODE_STEPS = NEW_TOKENS = 12
MAX_SEQ = 48
SCHEMES = ("ct-channel", "hf-block")
POLICIES = ("lru", "lfu", "lrfu", "router", "static")


class Reference:
    """An fp8 folder's resident run: logits of the call sequence, accesses, greedy tokens."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.prompt = torch.randint(0, SPEC.vocab_size, (PROMPT_LEN,),
                                    generator=torch.Generator().manual_seed(3)).tolist()
        with offload_rt.load(model_dir, dtype="float32", offload=False,
                             max_seq_len=MAX_SEQ) as rt:
            assert isinstance(rt.expert_format, Fp8Format) and not rt.offloaded
            accesses = count_accesses(rt.experts)
            self.logits = [rt.model(torch.tensor(self.prompt), 0)]
            self.feed: list[int] = []
            for i in range(DECODE_STEPS):
                self.feed.append(int(self.logits[-1][-1].argmax()))
                self.logits.append(rt.model(torch.tensor([self.feed[-1]]), PROMPT_LEN + i))
            self.accesses = accesses[0]
            self.generated = rt.generate(self.prompt, max_new_tokens=NEW_TOKENS,
                                         ignore_eos=True).token_ids
        assert len(set(self.feed)) > 3, f"degenerate reference {self.feed}: pick another seed"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reference]:
    return {name: Reference(make_fp8_checkpoint(tmp_path_factory.mktemp(name), SPEC,
                                                VARIANTS[name])) for name in SCHEMES}


def _load(ref: Reference, **options: object) -> offload_rt.Runtime:
    return offload_rt.load(ref.model_dir, dtype="float32", offload=True, max_seq_len=MAX_SEQ,
                           **options)


CASES = list(itertools.product(SCHEMES, POLICIES, (0, 1, 2), ("layer", "global")))


@pytest.mark.parametrize(("scheme", "policy", "depth", "pool"), CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_offloaded_fp8_matches_resident(reference: dict[str, Reference], scheme: str,
                                        policy: str, depth: int, pool: str) -> None:
    ref = reference[scheme]
    with _load(ref, cache_experts=SPEC.top_k, policy=policy, prefetch=depth, pool=pool) as rt:
        experts = rt.experts
        assert isinstance(experts, OffloadedExperts)
        accesses = count_accesses(experts)
        experts.stats.reset()
        assert_same_logits(run_sequence(rt, ref.prompt, ref.feed), ref.logits)
        assert accesses[0] == ref.accesses and experts.stats.misses > 0
        out = rt.generate(ref.prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert out.token_ids == ref.generated


@pytest.mark.parametrize("drop_page_cache", [True, False])
@pytest.mark.parametrize("capacity", [3, 4])
def test_capacity_and_page_cache_do_not_change_bits(reference: dict[str, Reference],
                                                    capacity: int, drop_page_cache: bool) -> None:
    ref = reference["ct-channel"]
    with _load(ref, cache_experts=capacity, prefetch=1,
               drop_page_cache=drop_page_cache) as rt:
        assert_same_logits(run_sequence(rt, ref.prompt, ref.feed), ref.logits)


HOST_CASES = [(0, 0, "layer"), (0, 1, "global"), (2, 2, "layer"), (99, 1, "layer")]


@pytest.mark.parametrize(("host_extra", "depth", "pool"), HOST_CASES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_host_tier_path_moves_fp8_records(reference: dict[str, Reference], scheme: str,
                                          host_extra: int, depth: int, pool: str) -> None:
    ref = reference[scheme]
    pools = SPEC.num_layers if pool == "layer" else 1
    per_pool = SPEC.top_k * SPEC.num_layers // pools
    host_slots = min(SPEC.top_k + host_extra, SPEC.num_layers * SPEC.num_experts)
    with _load(ref, cache_experts=SPEC.top_k) as rt:
        fmt = rt.expert_format
        experts = two_tier(rt, fmt, per_pool, pools, host_slots, depth)
        swap_in(rt, experts)
        logits = run_sequence(rt, ref.prompt, ref.feed)
        experts.drain()
        s = experts.stats
    assert_same_logits(logits, ref.logits)
    assert s.host_misses > 0 and s.bytes_host_to_device > 0
    assert s.bytes_host_to_device == (s.misses + s.prefetch_issued) * fmt.nbytes


def test_bfloat16_compute_matches_resident(tmp_path: Path) -> None:
    model_dir = make_fp8_checkpoint(tmp_path, SPEC, VARIANTS["ct-block-partial"])
    prompt = list(range(3, 3 + PROMPT_LEN))
    with offload_rt.load(model_dir, dtype="bfloat16", offload=False, max_seq_len=MAX_SEQ) as rt:
        want = rt.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
        logits = run_sequence(rt, prompt, want)
    for pool in ("layer", "global"):
        with offload_rt.load(model_dir, dtype="bfloat16", cache_experts=SPEC.top_k, prefetch=1,
                             pool=pool, max_seq_len=MAX_SEQ) as rt:
            assert_same_logits(run_sequence(rt, prompt, want), logits)
            out = rt.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            assert out.token_ids == want


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_on_a_gpu_matches_resident_on_the_gpu(reference: dict[str, Reference]) -> None:
    """fp8 records in pinned host slots, copied to GPU slots, dequantized there."""
    ref = reference["hf-block"]
    opts = {"dtype": "float32", "max_seq_len": MAX_SEQ, "device": "cuda"}
    with offload_rt.load(ref.model_dir, offload=False, **opts) as rt:
        want = run_sequence(rt, ref.prompt, ref.feed)
    for pool in ("layer", "global"):
        with offload_rt.load(ref.model_dir, offload=True, cache_experts=SPEC.top_k, prefetch=1,
                             pool=pool, **opts) as rt:
            assert rt.experts.host is not None
            assert_same_logits(run_sequence(rt, ref.prompt, ref.feed), want)
