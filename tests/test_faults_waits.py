"""Every wait of the engine ends (issue 18, item 2): a wait for a load that nobody runs, or for
a slot that nothing will free, is resolved or reported at once; a wait for a read that does not
return raises after ``WAIT_TIMEOUT_S`` naming the expert and the loading thread. Before, each
of these spun forever (and ``cancel()``/``close()`` could not end it)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint
from fault_injection import FaultyReader, assert_clean, run_guarded

import offload_rt
from cache_policies import ExpertKey
from offload_rt.engine import mover
from offload_rt.engine.expert_cache import LOADING, RESIDENT
from offload_rt.engine.offloaded import OffloadedExperts
from offload_rt.errors import LoaderError

SPEC = TinySpec(num_experts=8, top_k=2, num_layers=2, seed=91)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("waits"), SPEC)


@pytest.fixture()
def experts(model_dir: Path) -> Iterator[OffloadedExperts]:
    with offload_rt.load(model_dir, dtype="float32", cache_experts=2, prefetch=0) as rt:
        assert isinstance(rt.experts, OffloadedExperts)
        yield rt.experts


def use(experts: OffloadedExperts, layer: int, ids: list[int]) -> None:
    with experts.acquire(layer, ids) as buffers:
        assert sorted(buffers) == ids


def test_a_read_that_does_not_return_times_out_naming_expert_and_thread(
        experts: OffloadedExperts, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mover, "WAIT_TIMEOUT_S", 0.3)
    hung = FaultyReader(experts.reader, in_prefetch=False, nth=1, block=True)
    experts.reader = hung
    loader = threading.Thread(target=use, args=(experts, 0, [3]), name="slow-loader")
    loader.start()
    assert hung.blocked.wait(10)

    outcome = run_guarded(lambda: use(experts, 0, [3]))
    assert isinstance(outcome.error, LoaderError), repr(outcome.error)
    assert "expert L0E3" in str(outcome.error) and "'slow-loader'" in str(outcome.error)
    assert "has not returned" in str(outcome.error)

    hung.release.set()  # the read returns after all: the loader finishes, nothing is left
    loader.join(10)
    assert experts.device.cache.state[ExpertKey(0, 3)] == RESIDENT
    assert_clean(experts)


def test_leaked_pins_are_reported_at_once_and_released_at_the_next_forward(
        experts: OffloadedExperts) -> None:
    use(experts, 0, [0, 1])  # fills layer 0's two slots
    cache = experts.device.cache
    for key in (ExpertKey(0, 0), ExpertKey(0, 1)):
        cache.pin(key)  # as if an interrupted step had left them pinned

    outcome = run_guarded(lambda: use(experts, 0, [5]))
    assert isinstance(outcome.error, LoaderError), repr(outcome.error)
    assert "no slot of the device tier can take expert L0E5" in str(outcome.error)
    assert "L0E0, L0E1" in str(outcome.error)

    experts.observe(0, experts.predictor.norms[0].weight[None, :])  # a new forward begins
    assert dict(cache.pins) == {}
    assert run_guarded(lambda: use(experts, 0, [5])).error is None
    assert_clean(experts)


def test_a_key_left_loading_by_an_interrupted_load_is_loaded_again(
        experts: OffloadedExperts, caplog: pytest.LogCaptureFixture) -> None:
    key = ExpertKey(1, 6)
    with experts._cond:
        experts.device.cache.reserve(key)  # reserved, but the loader never registered
    assert experts.device.cache.state[key] == LOADING

    outcome = run_guarded(lambda: use(experts, 1, [6]))
    assert outcome.error is None, repr(outcome.error)
    assert experts.device.cache.state[key] == RESIDENT
    assert any("left loading" in r.getMessage() for r in caplog.records)
    assert_clean(experts)
