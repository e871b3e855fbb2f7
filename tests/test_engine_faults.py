"""A failing expert read surfaces as ``LoaderError`` promptly, never a hang, and leaves the
runtime usable: no pin left behind, and the next generation gives the resident tokens.

Every generation runs in a helper thread joined with a timeout, so a hang fails the test
instead of hanging the suite.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from cache_policies import ExpertKey, make_policy
from offload_rt.engine.assemble import build_offloaded, disk_reader
from offload_rt.engine.expert_cache import LOADING
from offload_rt.engine.offloaded import OffloadedExperts, Reader
from offload_rt.errors import LoaderError

SPEC = TinySpec(num_experts=8, top_k=2, num_layers=3, seed=31)
PROMPT = torch.randint(0, SPEC.vocab_size, (16,),
                       generator=torch.Generator().manual_seed(9)).tolist()
NEW_TOKENS = 16
MAX_SEQ = 64
HANG_S = 30.0  # a generation here takes well under a second: anything near this is a hang
SURFACE_S = 1.0  # a background failure must reach the caller within this
PREFETCH_THREAD = "offload-rt-prefetch"  # PrefetchWorker's thread name


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("faults"), SPEC)


@pytest.fixture(scope="module")
def resident_tokens(model_dir: Path) -> list[int]:
    with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=MAX_SEQ) as rt:
        return rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids


class FaultyReader:
    """Delegates to ``inner``, but the ``nth`` read made on the chosen side (the prefetch
    thread, or any other thread = demand loads) sleeps ``delay`` seconds and raises."""

    def __init__(self, inner: Reader, *, in_prefetch: bool, nth: int = 1,
                 delay: float = 0.0) -> None:
        self.inner, self.in_prefetch, self.nth, self.delay = inner, in_prefetch, nth, delay
        self.calls = 0
        self.failed_key: ExpertKey | None = None
        self.failed_at: float | None = None
        self._lock = threading.Lock()

    def __call__(self, key: ExpertKey, out: torch.Tensor) -> None:
        if (threading.current_thread().name == PREFETCH_THREAD) == self.in_prefetch:
            with self._lock:
                self.calls += 1
                fire = self.calls == self.nth
            if fire:
                time.sleep(self.delay)
                self.failed_key, self.failed_at = key, time.perf_counter()
                raise OSError("injected read failure")  # names no expert: the engine must
        self.inner(key, out)


@dataclass
class Outcome:
    result: Any = None
    error: BaseException | None = None
    done_at: float = 0.0


def run_guarded(fn: Callable[[], Any]) -> Outcome:
    """Run ``fn`` in a thread; fail the test if it has not returned or raised in HANG_S."""
    outcome = Outcome()

    def target() -> None:
        try:
            outcome.result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.error = exc
        outcome.done_at = time.perf_counter()

    thread = threading.Thread(target=target, name="test-generation", daemon=True)
    thread.start()
    thread.join(HANG_S)
    assert not thread.is_alive(), f"generation still running after {HANG_S} s: a hang"
    return outcome


def assert_clean(experts: OffloadedExperts) -> None:
    """After a failure: no pin and no half-loaded slot left behind."""
    experts.drain()
    cache = experts.device.cache
    assert dict(cache.pins) == {}, f"pins left after the failure: {dict(cache.pins)}"
    assert [k for k, s in cache.state.items() if s == LOADING] == []
    for pool in cache.pools:
        assert len(pool.slots) + len(pool.free) == pool.capacity


def generate(rt: offload_rt.Runtime) -> Outcome:
    return run_guarded(lambda: rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True))


@pytest.mark.parametrize("delay", [0.0, 0.3], ids=["fast-fail", "slow-fail"])
@pytest.mark.parametrize("pool", ["layer", "global"])
def test_prefetch_failure_surfaces_within_a_second(model_dir: Path, resident_tokens: list[int],
                                                  pool: str, delay: float) -> None:
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k, prefetch=2,
                         pool=pool, max_seq_len=MAX_SEQ) as rt:
        experts = rt.experts
        assert isinstance(experts, OffloadedExperts)
        good = experts.reader
        faulty = FaultyReader(good, in_prefetch=True, delay=delay)
        experts.reader = faulty

        outcome = generate(rt)
        assert faulty.failed_at is not None, "no prefetch read happened: nothing was tested"
        assert isinstance(outcome.error, LoaderError), outcome.error
        assert isinstance(outcome.error.__cause__, OSError)
        assert outcome.done_at - faulty.failed_at < SURFACE_S
        assert_clean(experts)

        experts.reader = good
        again = generate(rt)
        assert again.error is None, again.error
        assert again.result.token_ids == resident_tokens
        assert_clean(experts)


@pytest.mark.parametrize(("prefetch", "nth"), [(0, 1), (0, 7), (1, 5), (2, 9)])
def test_demand_failure_names_the_expert(model_dir: Path, resident_tokens: list[int],
                                         prefetch: int, nth: int) -> None:
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k,
                         prefetch=prefetch, max_seq_len=MAX_SEQ) as rt:
        experts = rt.experts
        assert isinstance(experts, OffloadedExperts)
        good = experts.reader
        faulty = FaultyReader(good, in_prefetch=False, nth=nth)
        experts.reader = faulty

        outcome = generate(rt)
        assert faulty.failed_key is not None
        assert isinstance(outcome.error, LoaderError), outcome.error
        assert str(faulty.failed_key) in str(outcome.error)  # e.g. "loading expert L1E3 failed"
        assert_clean(experts)
        assert faulty.failed_key not in experts.device.cache.state  # its slot was given back

        experts.reader = good
        again = generate(rt)
        assert again.error is None, again.error
        assert again.result.token_ids == resident_tokens
        assert_clean(experts)


def test_reader_injected_through_build_offloaded(model_dir: Path) -> None:
    """The documented seam: ``build_offloaded(..., reader=...)`` is the reader the engine uses.
    Driven through the model directly: prefill, then decode steps."""
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k, prefetch=1,
                         max_seq_len=MAX_SEQ) as rt:
        reference = [rt.model(torch.tensor(PROMPT), 0)]
        for i in range(4):
            reference.append(rt.model(torch.tensor([PROMPT[i]]), len(PROMPT) + i))
        rt.experts.close()

        faulty = FaultyReader(disk_reader(rt.checkpoint, drop_page_cache=False),
                              in_prefetch=False, nth=3)
        experts = build_offloaded(rt.checkpoint, rt.model, rt.plan, lambda: make_policy("lru"),
                                  dtype=torch.float32, device=torch.device("cpu"),
                                  prefetch_depth=1, drop_page_cache=False, reader=faulty)
        rt.model.attach(experts, rt.max_seq_len)
        try:
            outcome = run_guarded(lambda: rt.model(torch.tensor(PROMPT), 0))
            assert isinstance(outcome.error, LoaderError)
            assert str(faulty.failed_key) in str(outcome.error)
            assert_clean(experts)

            logits = [rt.model(torch.tensor(PROMPT), 0)]
            for i in range(4):
                logits.append(rt.model(torch.tensor([PROMPT[i]]), len(PROMPT) + i))
            assert all(torch.equal(a, b) for a, b in zip(logits, reference, strict=True))
        finally:
            experts.close()
