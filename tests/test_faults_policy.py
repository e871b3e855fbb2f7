"""A policy (user code) that raises, in any hook, on the caller's or the prefetch thread: the
caller gets a ``PolicyError`` naming the policy and the hook, promptly; nothing hangs, no pin or
LOADING slot is left behind, and the next generation gives the resident tokens with
prefetching still working (issue 18, items 2-4)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fault_injection as fi
import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint
from fault_injection import assert_clean, run_guarded

import offload_rt
from cache_policies import ExpertKey
from offload_rt.cli import main
from offload_rt.engine.assemble import disk_reader
from offload_rt.engine.expert_cache import ExpertCache
from offload_rt.engine.offloaded import OffloadedExperts, Tier
from offload_rt.engine.placement import ExpertPlacement
from offload_rt.engine.prefetch import NextLayerPredictor
from offload_rt.engine.slots import SlotPool
from offload_rt.errors import PolicyError

SPEC = TinySpec(num_experts=8, top_k=2, num_layers=3, seed=41)
PROMPT = torch.randint(0, SPEC.vocab_size, (12,),
                       generator=torch.Generator().manual_seed(5)).tolist()
NEW_TOKENS = 12
MAX_SEQ = 64
RAISING = "fault_injection:RaisingPolicy"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("policy_faults"), SPEC)


@pytest.fixture(scope="module")
def resident_tokens(model_dir: Path) -> list[int]:
    with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=MAX_SEQ) as rt:
        return rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    fi.disarm()
    yield
    fi.disarm()


def generate(rt: offload_rt.Runtime) -> fi.Outcome:
    return run_guarded(lambda: rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True))


# Every hook the engine calls, on each thread that calls it: on_access and on_predict run only
# in the caller (a demand access, the router's predictions); the prefetch thread inserts and
# evicts (with cache_experts = top_k every pool is full after the first token).
CASES = [("on_insert", False), ("on_access", False), ("on_evict", False),
         ("choose_victim", False), ("on_predict", False),
         ("on_insert", True), ("on_evict", True), ("choose_victim", True)]


@pytest.mark.parametrize("pool", ["layer", "global"])
@pytest.mark.parametrize(("hook", "prefetch"), CASES,
                         ids=[f"{h}-{'prefetch' if p else 'caller'}" for h, p in CASES])
def test_a_raise_in_any_hook_is_a_policy_error_and_leaves_the_cache_usable(
        model_dir: Path, resident_tokens: list[int], hook: str, prefetch: bool,
        pool: str) -> None:
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k, prefetch=2,
                         pool=pool, policy=RAISING, max_seq_len=MAX_SEQ) as rt:
        experts = rt.experts
        assert isinstance(experts, OffloadedExperts)
        armed = fi.arm(hook, prefetch=prefetch, nth=3)

        outcome = generate(rt)
        assert armed.fired, f"{hook} was never called on that thread: nothing was tested"
        assert isinstance(outcome.error, PolicyError), repr(outcome.error)
        message = str(outcome.error)
        assert "RaisingPolicy" in message and hook in message
        assert "injected policy failure" in message
        assert ("prefetch thread" in message) == prefetch
        assert isinstance(outcome.error.__cause__, (PolicyError, RuntimeError))
        assert_clean(experts)

        again = generate(rt)  # raised once: the runtime goes on, exact, prefetching
        assert again.error is None, repr(again.error)
        assert again.result.token_ids == resident_tokens
        assert again.result.stats["prefetch_issued"] > 0
        assert_clean(experts)


def test_a_victim_that_is_not_a_candidate_is_a_policy_error(model_dir: Path) -> None:
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k, prefetch=0,
                         policy="fault_injection:OutsiderPolicy", max_seq_len=MAX_SEQ) as rt:
        outcome = generate(rt)
        assert isinstance(outcome.error, PolicyError), repr(outcome.error)
        assert "OutsiderPolicy" in str(outcome.error) and "choose_victim" in str(outcome.error)
        assert "L999E999" in str(outcome.error) and "not one of" in str(outcome.error)
        assert_clean(rt.experts)  # type: ignore[arg-type]


def test_prefetch_keeps_working_after_a_failure_on_its_thread(model_dir: Path) -> None:
    """The failure reaches the caller, and the thread is not dead: the very next generation
    prefetches again (before: 'Exception in thread offload-rt-prefetch', prefetching off)."""
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k, prefetch=1,
                         policy=RAISING, max_seq_len=MAX_SEQ) as rt:
        fi.arm("on_insert", prefetch=True, error=lambda: ZeroDivisionError("boom"))
        outcome = generate(rt)
        assert isinstance(outcome.error, PolicyError), repr(outcome.error)
        assert isinstance(outcome.error.__cause__.__cause__, ZeroDivisionError)
        for _ in range(2):
            again = generate(rt)
            assert again.error is None, repr(again.error)
            assert again.result.stats["prefetch_issued"] > 0


# ---- the command line: one error line, exit 2, no traceback, no hang ------------------------

def cli(capsys: pytest.CaptureFixture[str], model_dir: Path, *flags: str) -> tuple[int, str]:
    argv = ["generate", str(model_dir), "--prompt-ids", ",".join(map(str, PROMPT)),
            "--max-new-tokens", str(NEW_TOKENS), "--ignore-eos", "--json", "--dtype", "float32",
            "--cache-experts", str(SPEC.top_k), "--max-seq-len", str(MAX_SEQ), *flags]
    outcome = run_guarded(lambda: main(argv))
    assert outcome.error is None, repr(outcome.error)
    return outcome.result, capsys.readouterr().err


def test_cli_choose_victim_raising_is_one_error_line(capsys: pytest.CaptureFixture[str],
                                                     model_dir: Path) -> None:
    code, err = cli(capsys, model_dir, "--policy", "fault_injection:ChooseRaiser",
                    "--prefetch", "0")
    assert code == 2
    assert "offload-rt: error: cache policy" in err and "ChooseRaiser" in err
    assert "choose_victim" in err and "no victim today" in err and "Traceback" not in err


def test_cli_prefetch_thread_raising_exits_instead_of_hanging(
        capsys: pytest.CaptureFixture[str], model_dir: Path) -> None:
    code, err = cli(capsys, model_dir, "--policy", "fault_injection:PrefetchInsertRaiser",
                    "--prefetch", "2")
    assert code == 2
    assert "PrefetchInsertRaiser" in err and "on_insert" in err and "prefetch thread" in err
    assert "Traceback" not in err and "Exception in thread" not in err


def test_cli_policy_constructor_raising_is_one_error_line(capsys: pytest.CaptureFixture[str],
                                                         model_dir: Path) -> None:
    code, err = cli(capsys, model_dir, "--policy", "fault_injection:InitRaiser")
    assert code == 2
    assert "offload-rt: error: the cache policy of the device tier could not be built" in err
    assert "fault_injection.py" in err and "no state today" in err and "Traceback" not in err


def test_keys_the_policy_never_saw_are_not_offered_twice(model_dir: Path) -> None:
    """An on_insert that raised claimed no slot: the key is not resident, not loading."""
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k, prefetch=0,
                         policy=RAISING, max_seq_len=MAX_SEQ) as rt:
        experts = rt.experts
        assert isinstance(experts, OffloadedExperts)
        fi.arm("on_insert", nth=1)
        outcome = generate(rt)
        assert isinstance(outcome.error, PolicyError)
        assert set(experts.device.cache.state) == {
            k for pool in experts.device.cache.pools for k in pool.slots}
        assert all(isinstance(k, ExpertKey) for k in experts.device.cache.state)


# ---- the CUDA layout (disk -> pinned host tier -> device tier), both tiers in RAM ------------

def two_tier(rt: offload_rt.Runtime, host_slots: int, depth: int) -> OffloadedExperts:
    """What ``build_offloaded`` builds for a GPU, with both tiers in RAM, RaisingPolicy in
    each: host reads, host evictions and host -> device copies run on CPU."""
    cfg, cpu = rt.config, torch.device("cpu")
    dev = ExpertCache("device", cfg.top_k, cfg.num_layers, fi.RaisingPolicy)
    host = ExpertCache("host", host_slots, 1, fi.RaisingPolicy)
    predictor = NextLayerPredictor([b.ffn_norm for b in rt.model.layers],
                                   [b.router for b in rt.model.layers], cfg.top_k)
    return OffloadedExperts(
        Tier(dev, SlotPool(dev.num_slots, cfg.expert_numel, torch.float32, cpu)),
        disk_reader(rt.checkpoint, drop_page_cache=True), cfg.expert_numel * 4,
        placement=ExpertPlacement(rt.checkpoint, torch.float32, cpu),
        host=Tier(host, SlotPool(host_slots, cfg.expert_numel, torch.float32, cpu)),
        predictor=predictor, prefetch_depth=depth)


@pytest.mark.parametrize("nth", [1, 4, 9])
@pytest.mark.parametrize(("hook", "prefetch"), [("on_insert", False), ("on_access", False),
                                                ("on_evict", False), ("choose_victim", False),
                                                ("on_insert", True), ("choose_victim", True)])
def test_policy_errors_in_the_host_tier_leave_both_tiers_usable(
        model_dir: Path, resident_tokens: list[int], hook: str, prefetch: bool,
        nth: int) -> None:
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k, prefetch=0,
                         max_seq_len=MAX_SEQ) as rt:
        rt.experts.close()  # type: ignore[union-attr]
        rt.experts = experts = two_tier(rt, host_slots=SPEC.top_k + 1, depth=2)
        rt.model.attach(experts, MAX_SEQ)
        armed = fi.arm(hook, prefetch=prefetch, nth=nth)
        outcome = generate(rt)
        assert armed.fired
        assert isinstance(outcome.error, PolicyError), repr(outcome.error)
        assert_clean(experts)

        again = generate(rt)
        assert again.error is None, repr(again.error)
        assert again.result.token_ids == resident_tokens
        assert_clean(experts)
        experts.close()
