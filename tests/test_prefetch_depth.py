"""The adaptive prefetch depth: deeper only while the predictions at that distance come true.

Pure bookkeeping (``engine.prefetch_depth.AdaptiveDepth``); the engine's use of it (which keys
are queued, the default options that turn it on) is tested below with a tiny model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from cache_policies import ExpertKey as K
from offload_rt.checkpoint import Checkpoint
from offload_rt.engine.budget import footprint
from offload_rt.engine.offloaded import OffloadedExperts
from offload_rt.engine.prefetch_depth import AdaptiveDepth

LAYERS, TOP_K = 32, 2


def _token(depth: AdaptiveDepth, right_at: dict[int, bool]) -> None:
    """One decode step over ``LAYERS`` layers: every layer routes to experts 0 and 1; the
    prediction made at each layer for distance j names them when ``right_at[j]``, else 6, 7."""
    depth.forget_step()
    for layer in range(LAYERS):
        depth.routed(layer, [0, 1])
        keys = [K(layer + j, e) for j in range(1, depth.ceiling + 1) if layer + j < LAYERS
                for e in ((0, 1) if right_at[j] else (6, 7))]
        depth.predicted(layer, keys)


def test_right_predictions_deepen_to_the_ceiling_after_the_warmup() -> None:
    depth = AdaptiveDepth(floor=2, ceiling=4, warmup=64)
    assert depth.depth == 2
    _token(depth, {1: True, 2: True, 3: True, 4: True})  # 58 checked at distance 3: not yet
    assert depth.depth == 2 and depth.precision(3) is None
    _token(depth, {1: True, 2: True, 3: True, 4: True})
    assert depth.depth == 4 and depth.precision(3) == depth.precision(4) == 1.0


def test_wrong_predictions_keep_the_floor_and_a_wrong_distance_stops_the_climb() -> None:
    wrong = AdaptiveDepth(floor=2, ceiling=4, warmup=8)
    for _ in range(3):
        _token(wrong, {1: False, 2: False, 3: False, 4: False})
    assert wrong.depth == 2 and wrong.precision(3) == 0.0
    gap = AdaptiveDepth(floor=2, ceiling=4, warmup=8)
    for _ in range(3):
        _token(gap, {1: True, 2: True, 3: False, 4: True})  # 4 right but 3 wrong: stay at 2
    assert gap.depth == 2


def test_the_threshold_is_the_share_of_predicted_experts_used() -> None:
    """Half of each prediction right (0.5): below 0.8, above 0.4."""
    for threshold, want in ((0.8, 2), (0.4, 3)):
        depth = AdaptiveDepth(floor=2, ceiling=3, threshold=threshold, warmup=8)
        for _ in range(2):
            depth.forget_step()
            for layer in range(LAYERS):
                depth.routed(layer, [0, 1])
                depth.predicted(layer, [K(layer + 3, 0), K(layer + 3, 7)])
        assert depth.precision(3) == 0.5 and depth.depth == want


def test_the_depth_falls_when_predictions_stop_coming_true() -> None:
    """The window decays: after many wrong steps the old right ones no longer hold it deep."""
    depth = AdaptiveDepth(floor=2, ceiling=4, warmup=8, window=128)
    for _ in range(4):
        _token(depth, {1: True, 2: True, 3: True, 4: True})
    assert depth.depth == 4
    for _ in range(8):
        _token(depth, {1: True, 2: True, 3: False, 4: False})
    assert depth.depth == 2 and depth.precision(3) < 0.8


def test_within_keeps_the_current_depth_and_bad_bounds_are_refused() -> None:
    depth = AdaptiveDepth(floor=2, ceiling=4)
    keys = [K(5 + j, 0) for j in range(1, 5)]
    assert depth.within(5, keys) == keys[:2]
    with pytest.raises(ValueError, match="floor <= ceiling"):
        AdaptiveDepth(floor=3, ceiling=2)
    with pytest.raises(ValueError, match="1 <= floor"):
        AdaptiveDepth(floor=0, ceiling=2)


# ---- in the runtime ---------------------------------------------------------------------------

SPEC = TinySpec(num_experts=8, top_k=2, num_layers=6, seed=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("depth"), SPEC)


def _engine(rt: offload_rt.Runtime) -> OffloadedExperts:
    assert isinstance(rt.experts, OffloadedExperts)
    return rt.experts


@pytest.mark.parametrize(("options", "want"), [
    ({}, ("adaptive", 2, 4)),  # the default with per-layer pools
    ({"prefetch": 4}, ("fixed", 4, 4)),  # a depth given is kept
    ({"prefetch": 1}, ("fixed", 1, 1)),
    ({"prefetch": 0}, ("off", 0, 0)),
    ({"pool": "global", "cpu_memory": "scan"}, ("fixed", 2, 2)),  # < one token's experts
])
def test_the_default_prefetch_adapts_its_depth_and_a_given_one_is_kept(
        model_dir: Path, options: dict, want: tuple[str, int, int]) -> None:
    kw = {"cache_experts": 4, **options}
    if kw.get("cpu_memory") == "scan":  # a global pool one slot short of a token's experts
        fp = footprint(Checkpoint.open(model_dir).config, torch.float32, 64, 512)
        del kw["cache_experts"]
        kw["cpu_memory"] = fp.fixed + (SPEC.num_layers * SPEC.top_k - 1) * fp.slot
    with offload_rt.load(model_dir, dtype="float32", max_seq_len=64, **kw) as rt:
        engine = _engine(rt)
        mode = "off" if engine.depth == 0 else "adaptive" if engine.adaptive else "fixed"
        floor = engine.adaptive.floor if engine.adaptive else engine.depth
        assert (mode, floor, engine.depth) == want
        assert rt.options.prefetch == want[2]


def test_an_adaptive_run_queues_only_the_current_depth_and_stays_exact(
        model_dir: Path) -> None:
    """Every prediction is checked, only the current depth's keys are queued, and the tokens
    are the resident model's whatever the depth (prefetch moves bytes, never results)."""
    prompt = [1, 5, 9, 3, 7]
    with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=64) as rt:
        want = rt.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
    with offload_rt.load(model_dir, dtype="float32", max_seq_len=64, cache_experts=3) as rt:
        engine = _engine(rt)
        assert engine.adaptive is not None
        engine.adaptive.warmup = 1  # judge every distance at once: the depth moves in this run
        queued: list[tuple[int, list[K]]] = []
        worker = engine._worker
        original = worker.submit

        def submit(keys: list[K]) -> None:
            queued.append((engine.adaptive.depth, list(keys)))
            original(keys)

        worker.submit = submit  # type: ignore[method-assign]
        got = rt.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
        engine.drain()
    assert got == want
    assert sum(engine.adaptive.checked) > 0  # decode steps checked the predictions
    for depth, keys in queued:
        layers = sorted({k.layer for k in keys})
        assert len(layers) <= depth or not keys
    assert torch.tensor([engine.adaptive.checked[j] for j in (3, 4)]).gt(0).all()


def test_chat_stats_say_the_depth_in_use(model_dir: Path) -> None:
    from offload_rt.cli_chat import _prefetch_text

    with offload_rt.load(model_dir, dtype="float32", max_seq_len=64, cache_experts=3) as rt:
        assert _prefetch_text(rt) == "2-4 adaptive, now 2"
    with offload_rt.load(model_dir, dtype="float32", max_seq_len=64, cache_experts=3,
                         prefetch=3) as rt:
        assert _prefetch_text(rt) == "3"
