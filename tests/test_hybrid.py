"""Hybrid miss handling (``engine.hybrid``): a device-tier miss computed by the CPU from the host
tier instead of copied, tested without a GPU on the CUDA layout with both tiers in RAM.

What it promises: a hybrid run equals, bit for bit, the resident model run with the same
experts placed on the same processor at the same steps. On a GPU the two processors' kernels
round differently; here both are the CPU, so the tests give the host's experts a kernel of
their own (float64 inside, ``distinct_host_ffn``) to make placements visible in the bits: a
replay of the recorded placements must match, and the plain resident run must not (the
control that shows the replay test can fail).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from cache_policies import ExpertKey, LRUPolicy
from offload_rt.engine.assemble import disk_reader
from offload_rt.engine.budget import footprint
from offload_rt.engine.expert_cache import ExpertCache
from offload_rt.engine.hybrid import (
    MAX_HOST_TOKENS,
    HybridCosts,
    HybridRule,
    host_work_bytes,
    measure_costs,
)
from offload_rt.engine.offloaded import OffloadedExperts, Tier
from offload_rt.engine.placement import ExpertPlacement
from offload_rt.engine.prefetch import NextLayerPredictor
from offload_rt.engine.slots import SlotPool
from offload_rt.engine.transfer import HostToDevice
from offload_rt.errors import OptionError
from offload_rt.model.experts import ExpertBuffers, ExpertProvider, expert_ffn
from offload_rt.options import RuntimeOptions
from offload_rt.quant.formats import FloatFormat
from offload_rt.runtime_plan import plan_runtime

SPEC = TinySpec(num_experts=8, top_k=2, num_layers=3, seed=12)
PROMPT_LEN, DECODE_STEPS, MAX_SEQ = 16, 12, 64
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("hybrid"), SPEC)


@pytest.fixture(scope="module")
def calls(model_dir: Path) -> tuple[list[int], list[int]]:
    """The prompt, and the resident run's greedy tokens fed to the decode steps."""
    prompt = torch.randint(0, SPEC.vocab_size, (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(5)).tolist()
    with _resident(model_dir) as rt:
        logits = rt.model(torch.tensor(prompt), 0)
        feed = []
        for i in range(DECODE_STEPS):
            feed.append(int(logits[-1].argmax()))
            logits = rt.model(torch.tensor([feed[-1]]), PROMPT_LEN + i)
    return prompt, feed


def _resident(model_dir: Path) -> offload_rt.Runtime:
    return offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=MAX_SEQ)


def run_calls(rt: offload_rt.Runtime, calls: tuple[list[int], list[int]]) -> list[torch.Tensor]:
    prompt, feed = calls
    logits = [rt.model(torch.tensor(prompt), 0)]
    for i, tok in enumerate(feed):
        logits.append(rt.model(torch.tensor([tok]), len(prompt) + i))
    return logits


def distinct_host_ffn(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """The float expert computed in float64 and rounded once: other bits than the float32
    kernel's, as a CPU's kernels give other bits than a GPU's."""
    return expert_ffn(x.double(), packed.double(), SPEC.hidden_size,
                      SPEC.intermediate_size).to(x.dtype)


def two_tier(rt: offload_rt.Runtime, rule: HybridRule | None, *, host_slots: int = 6,
             depth: int = 0) -> OffloadedExperts:
    """What ``build_offloaded`` makes for a GPU, with the device tier in RAM: top_k device
    slots per layer, ``host_slots`` pinned-host-like slots, ``rule`` for misses."""
    cfg = rt.config
    numel = cfg.expert_numel
    dev = ExpertCache("device", SPEC.top_k, SPEC.num_layers, LRUPolicy)
    host = ExpertCache("host", host_slots, 1, LRUPolicy)
    predictor = NextLayerPredictor([b.ffn_norm for b in rt.model.layers],
                                   [b.router for b in rt.model.layers], cfg.top_k)
    return OffloadedExperts(Tier(dev, SlotPool(dev.num_slots, numel, torch.float32, CPU)),
                            disk_reader(rt.checkpoint, drop_page_cache=True), numel * 4,
                            placement=ExpertPlacement(rt.checkpoint, torch.float32, CPU),
                            host=Tier(host, SlotPool(host_slots, numel, torch.float32, CPU)),
                            h2d=HostToDevice(), predictor=predictor, prefetch_depth=depth,
                            hybrid=rule)


def attach(rt: offload_rt.Runtime, experts: ExpertProvider, host_ffn: object = None) -> None:
    """Swap ``rt``'s expert provider for ``experts``; ``host_ffn``: the kernel for experts
    handed out on the host (None: the format's)."""
    if rt.experts is not experts and hasattr(rt.experts, "close"):
        rt.experts.close()
    rt.experts = experts
    rt.model.attach(experts, MAX_SEQ)
    if host_ffn is not None:
        for moe in rt.model._moe:
            moe.host_ffn = host_ffn


class Recording:
    """Wraps a provider; records, per acquire, (layer, experts, the ids handed out on host)."""

    def __init__(self, inner: OffloadedExperts) -> None:
        self.inner, self.log = inner, []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    @contextmanager
    def acquire(self, layer: int, experts: Sequence[int]) -> Iterator[Mapping[int, torch.Tensor]]:
        with self.inner.acquire(layer, experts) as buffers:
            self.log.append((layer, list(experts), getattr(buffers, "on_host", frozenset())))
            yield buffers


class Replay:
    """The resident experts, handing out the recorded placements in the recorded order (in
    the recorded engine's groups: at most ``top_k`` experts at once)."""

    def __init__(self, resident: ExpertProvider, log: list,
                 host_buffers: Mapping[tuple[int, int], torch.Tensor] | None = None) -> None:
        self.resident, self.log, self.host_buffers = resident, iter(log), host_buffers

    def max_group(self, layer: int) -> int:
        return SPEC.top_k

    def __getattr__(self, name: str) -> object:
        return getattr(self.resident, name)

    @contextmanager
    def acquire(self, layer: int, experts: Sequence[int]) -> Iterator[Mapping[int, torch.Tensor]]:
        want_layer, want_experts, on_host = next(self.log)
        assert (layer, list(experts)) == (want_layer, want_experts), "a different call sequence"
        with self.resident.acquire(layer, experts) as buffers:
            if self.host_buffers is not None:  # the experts the CPU computed, in host RAM
                buffers = {e: self.host_buffers[layer, e] if e in on_host else b
                           for e, b in buffers.items()}
            yield ExpertBuffers(buffers, on_host)


def hybrid_run(model_dir: Path, calls: tuple[list[int], list[int]], rule: HybridRule | None,
               host_ffn: object = None, **kw: object) -> tuple[list[torch.Tensor], Recording]:
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k,
                         max_seq_len=MAX_SEQ) as rt:
        engine = two_tier(rt, rule, **kw)  # type: ignore[arg-type]
        recording = Recording(engine)
        attach(rt, recording, host_ffn)  # type: ignore[arg-type]
        logits = run_calls(rt, calls)
        engine.drain()
        assert dict(engine.device.cache.pins) == {} and dict(engine.host.cache.pins) == {}
        engine.close()
    return logits, recording


def assert_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"call {i}: max |diff| {(g - w).abs().max().item():.3g}"


# ---- the cost model ---------------------------------------------------------------------------

def test_threshold_is_the_most_tokens_the_cpu_does_faster_than_the_copy() -> None:
    costs = HybridCosts(copy_s=0.010, host_fixed_s=0.002, host_per_token_s=0.001)
    assert costs.max_tokens() == 8  # host_s(8) = 9 ms < 10 ms; host_s(9) = 10 ms is not faster
    assert costs.host_s(8) < costs.copy_s <= costs.host_s(9)
    assert HybridCosts(0.010, 0.010, 0.0).max_tokens() == 0  # the CPU never wins
    assert HybridCosts(0.010, 0.011, 0.0).max_tokens() == 0
    assert HybridCosts(0.010, 0.001, 0.0).max_tokens() == MAX_HOST_TOKENS  # capped
    assert HybridCosts(0.010, 0.001, 1e-9).max_tokens() == MAX_HOST_TOKENS
    rule = HybridRule(costs.max_tokens(), costs)
    assert [rule.on_host(t) for t in (0, 1, 8, 9)] == [False, True, True, False]
    assert "<= 8 tokens" in rule.describe() and "copy 10.00 ms" in rule.describe()
    assert "off" in HybridRule(0, HybridCosts(0.01, 0.02, 0.0)).describe()


def test_measure_costs_times_the_copy_and_the_cpu_kernel() -> None:
    fmt = FloatFormat(64, 96, torch.float32)
    host = torch.full((fmt.numel,), float("nan"))
    device = torch.empty(fmt.numel)
    costs = measure_costs(fmt, host, device, HostToDevice(), 64, torch.float32)
    assert costs.copy_s > 0 and costs.host_fixed_s > 0 and costs.host_per_token_s >= 0
    assert torch.equal(host, torch.zeros(fmt.numel)) and torch.equal(device, host)


# ---- exactness --------------------------------------------------------------------------------

@pytest.mark.parametrize(("max_tokens", "depth"), [(1, 0), (1, 1), (MAX_HOST_TOKENS, 2)])
def test_hybrid_with_the_same_kernel_matches_resident(model_dir: Path, calls: tuple,
                                                      max_tokens: int, depth: int) -> None:
    """With one kernel for both places (the CPU harness), where an expert runs cannot show:
    the run must equal resident bit for bit, and the CPU must have computed some misses."""
    with _resident(model_dir) as rt:
        want = run_calls(rt, calls)
    got, recording = hybrid_run(model_dir, calls, HybridRule(max_tokens), depth=depth)
    assert_equal(got, want)
    s = recording.inner.stats
    assert s.host_computed > 0 and s.host_computed <= s.misses
    on_host = [len(h) for _, _, h in recording.log]
    assert sum(on_host) == s.host_computed


def test_hybrid_equals_a_replay_of_its_placements(model_dir: Path, calls: tuple) -> None:
    got, recording = hybrid_run(model_dir, calls, HybridRule(1), distinct_host_ffn)
    assert recording.inner.stats.host_computed > 0
    with _resident(model_dir) as rt:
        plain = run_calls(rt, calls)
        attach(rt, Replay(rt.experts, recording.log), distinct_host_ffn)  # type: ignore[arg-type]
        replayed = run_calls(rt, calls)
    assert_equal(got, replayed)
    # control: the host kernel's bits show, so a wrong placement in the replay would fail
    assert not all(torch.equal(g, p) for g, p in zip(got, plain, strict=True))


def test_off_means_no_expert_runs_on_the_host(model_dir: Path, calls: tuple) -> None:
    with _resident(model_dir) as rt:
        want = run_calls(rt, calls)
    for rule in (None, HybridRule(0)):
        got, recording = hybrid_run(model_dir, calls, rule, distinct_host_ffn)
        assert_equal(got, want)  # the distinct host kernel never ran
        assert recording.inner.stats.host_computed == 0
        assert all(not h for _, _, h in recording.log)


# ---- decisions and statistics -----------------------------------------------------------------

def test_prefill_experts_with_more_tokens_than_the_threshold_are_copied(
        model_dir: Path, calls: tuple) -> None:
    _, recording = hybrid_run(model_dir, calls, HybridRule(1))
    engine = recording.inner
    s = engine.stats
    layers = SPEC.num_layers
    prefill, decode = recording.log[:layers], recording.log[layers:]
    assert any(h for _, _, h in decode)
    # in the prefill (16 tokens) an expert with one token may run on the host, others not
    prompt = torch.tensor(calls[0])
    assert s.host_computed_tokens == s.host_computed  # every host expert had one token
    assert all(len(h) <= len(e) for _, e, h in prefill) and prompt.numel() == PROMPT_LEN
    d = s.as_dict()
    assert d["host_computed"] == s.host_computed > 0
    assert d["host_computed_tokens"] == s.host_computed_tokens
    # a miss computed on the host moved nothing to the device
    _, copied = hybrid_run(model_dir, calls, None)
    assert s.bytes_host_to_device < copied.inner.stats.bytes_host_to_device


def test_a_host_tier_of_two_slots_still_finishes_exactly(model_dir: Path, calls: tuple) -> None:
    """top_k host slots: the step keeps one host slot unpinned for its copies, so it computes
    at most one expert on the host at a time and never waits on itself."""
    with _resident(model_dir) as rt:
        want = run_calls(rt, calls)
    got, recording = hybrid_run(model_dir, calls, HybridRule(MAX_HOST_TOKENS),
                                host_slots=SPEC.top_k)
    assert_equal(got, want)
    assert all(len(h) <= SPEC.top_k - 1 for _, _, h in recording.log)
    assert recording.inner.stats.host_computed > 0


def test_a_rule_without_a_host_tier_is_refused(model_dir: Path) -> None:
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k,
                         max_seq_len=MAX_SEQ) as rt:
        e = rt.experts
        with pytest.raises(ValueError, match="host tier"):
            OffloadedExperts(e.device, e.reader, e.expert_nbytes, placement=e.placement,
                             hybrid=HybridRule(1))


# ---- options and the memory plan ----------------------------------------------------------------

def test_hybrid_option_values_and_combinations(model_dir: Path) -> None:
    assert RuntimeOptions().hybrid == "auto"
    with pytest.raises(OptionError, match=r"--hybrid always \(hybrid='always'\) needs --device"):
        RuntimeOptions(hybrid="always")
    with pytest.raises(OptionError, match=r"--hybrid sometimes .*choose one of auto, off, always"):
        RuntimeOptions(hybrid="sometimes")
    with pytest.raises(OptionError, match=r"--hybrid off .* --no-offload"):
        RuntimeOptions(hybrid="off", offload=False)
    with pytest.raises(OptionError, match="--hybrid"):
        RuntimeOptions(hybrid=1)  # type: ignore[arg-type]
    RuntimeOptions(device="cuda", hybrid="always")  # checked before CUDA is needed
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k, hybrid="auto",
                         max_seq_len=MAX_SEQ) as rt:
        assert rt.experts.hybrid is None and rt.experts.host is None  # a CPU run: no effect


def test_gpu_plans_keep_ram_for_experts_computed_on_the_cpu(model_dir: Path) -> None:
    rt_cfg = offload_rt.checkpoint.Checkpoint.open(model_dir).config
    fp = footprint(rt_cfg, torch.float32, MAX_SEQ, 512, device_type="cuda")
    fmt = FloatFormat(rt_cfg.hidden_size, rt_cfg.intermediate_size, torch.float32)
    work = host_work_bytes(rt_cfg, fmt, torch.float32)
    host_budget = 4 * fp.slot + work
    gpu = torch.device("cuda")  # a plan needs no GPU

    def host_slots(mode: str) -> int:
        o = RuntimeOptions(device="cuda", hybrid=mode, cpu_memory=host_budget,
                           gpu_memory=fp.fixed + 12 * fp.slot)
        return plan_runtime(o, rt_cfg, torch.float32, gpu, MAX_SEQ,
                            file_dtype=torch.float32).host_slots

    assert work > 2 * MAX_HOST_TOKENS * rt_cfg.hidden_size * 4
    assert host_slots("off") == (host_budget - 4096) // fp.slot
    assert host_slots("auto") == host_slots("always") == (host_budget - work - 4096) // fp.slot
    assert host_slots("auto") < host_slots("off")


def test_cli_flag_reaches_the_options() -> None:
    from offload_rt.cli import build_parser
    from offload_rt.cli_options import runtime_options

    args = build_parser().parse_args(["generate", "/m", "--hybrid", "off", "--prompt", "x"])
    assert runtime_options(args)["hybrid"] == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "/m", "--hybrid", "maybe", "--prompt", "x"])


# ---- on a GPU (skipped without CUDA) ---------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hybrid_on_gpu_equals_a_replay_of_its_placements(model_dir: Path, calls: tuple) -> None:
    """The real case: CPU kernels for the host's experts, GPU kernels for the others. The
    reference is the GPU-resident model with the recorded experts computed by the CPU from
    host copies placed as the host tier places them (their read phase)."""
    opts = {"device": "cuda", "dtype": "float32", "max_seq_len": MAX_SEQ}
    with offload_rt.load(model_dir, cache_experts=SPEC.top_k, prefetch=0, hybrid="always",
                         cpu_memory="64MiB", **opts) as rt:
        recording = Recording(rt.experts)
        attach(rt, recording)  # type: ignore[arg-type]
        got = [t.cpu() for t in run_calls(rt, calls)]
        stats = rt.experts.stats
    assert stats.host_computed > 0 and stats.hits + stats.misses > stats.host_computed
    with offload_rt.load(model_dir, offload=False, **opts) as rt:
        placement = ExpertPlacement(rt.checkpoint, torch.float32, CPU)
        keys = [(i, e) for i in range(SPEC.num_layers) for e in range(SPEC.num_experts)]
        pool = SlotPool(len(keys), rt.config.expert_numel, torch.float32, CPU)
        host = {}
        for slot, (i, e) in enumerate(keys):
            host[i, e] = pool.place(slot, placement.read_phase(ExpertKey(i, e)))
            with rt.experts.acquire(i, [e]) as buffers:
                host[i, e].copy_(buffers[e])
        attach(rt, Replay(rt.experts, recording.log, host))  # type: ignore[arg-type]
        replayed = [t.cpu() for t in run_calls(rt, calls)]
    assert_equal(got, replayed)


def test_auto_measures_its_rule_on_the_run_s_own_slots() -> None:
    from offload_rt.engine.assemble import _hybrid_rule

    fmt = FloatFormat(64, 96, torch.float32)

    def tier(name: str) -> Tier:
        return Tier(ExpertCache(name, 2, 1, LRUPolicy), SlotPool(2, fmt.numel, torch.float32, CPU))

    host, device = tier("host"), tier("device")
    host.slots.place(0, 0).fill_(float("nan"))
    auto = _hybrid_rule("auto", fmt, host, device, HostToDevice(), 64, torch.float32)
    assert auto.costs is not None and auto.max_tokens == auto.costs.max_tokens()
    assert torch.equal(host.slots[0], torch.zeros(fmt.numel))  # timed on zeros, not NaNs
    assert _hybrid_rule("always", fmt, host, device, HostToDevice(), 64,
                        torch.float32) == HybridRule(MAX_HOST_TOKENS)
