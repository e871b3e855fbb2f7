"""The policy a run gets when it names none: LRU, except below one token's experts.

A global pool of fewer slots than layers x top_k is a cyclic scan for LRU: every expert a token
uses is evicted before the next token needs it (hit rate 0 on the demo model's held-out trace
at 7 slots and on a Mixtral 8x7B-shaped trace at 49; README, "Budgets, worked example"). There
the default is ``router`` (by the prefetcher's predictions), or ``lfu`` when prefetch is off
and nothing is predicted. A policy given by name is always kept.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from cache_policies.trace import read_trace
from offload_rt.checkpoint import Checkpoint
from offload_rt.engine.budget import footprint
from offload_rt.errors import OptionError
from offload_rt.options import DEFAULT_POLICY, default_policy
from offload_rt.trace_recorder import record_trace

SPEC = TinySpec(num_experts=8, top_k=2, num_layers=3, seed=22)
TOKEN_EXPERTS = SPEC.num_layers * SPEC.top_k  # 6: the experts one decode token routes to
MAX_SEQ = 64
CHUNK = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("default_policy"), SPEC)


def _global_budget(model_dir: Path, slots: int) -> int:
    fp = footprint(Checkpoint.open(model_dir).config, torch.float32, MAX_SEQ, CHUNK)
    return fp.fixed + slots * fp.slot


def _load(model_dir: Path, slots: int, **options: object) -> offload_rt.Runtime:
    return offload_rt.load(model_dir, dtype="float32", max_seq_len=MAX_SEQ, pool="global",
                           cpu_memory=_global_budget(model_dir, slots), **options)


def test_the_rule() -> None:
    assert default_policy(TOKEN_EXPERTS - 1, TOKEN_EXPERTS, prefetch=1) == "router"
    assert default_policy(TOKEN_EXPERTS - 1, TOKEN_EXPERTS, prefetch=0) == "lfu"
    assert default_policy(TOKEN_EXPERTS, TOKEN_EXPERTS, prefetch=1) == DEFAULT_POLICY == "lru"


@pytest.mark.parametrize(("slots", "options", "policy"), [
    (TOKEN_EXPERTS - 1, {}, "router"),
    (SPEC.top_k, {"prefetch": 2}, "router"),
    (TOKEN_EXPERTS - 1, {"prefetch": 0}, "lfu"),
    (TOKEN_EXPERTS, {}, "lru"),  # one token's experts fit: LRU keeps them to the next token
    (TOKEN_EXPERTS - 1, {"policy": "lru"}, "lru"),  # a policy given is kept
    (TOKEN_EXPERTS - 1, {"policy": "lrfu"}, "lrfu"),
])
def test_a_runtime_picks_the_default_from_its_plan(model_dir: Path, slots: int,
                                                   options: dict[str, object],
                                                   policy: str) -> None:
    with _load(model_dir, slots, **options) as rt:
        assert rt.plan.device_slots == slots and rt.offloaded
        assert rt.options.policy == policy
        pool = rt.experts.device.cache.pools[0]
        assert pool.policy.name == policy  # what the cache runs, not only what options say


def test_the_start_up_line_and_the_trace_say_which(model_dir: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="offload_rt"), \
            _load(model_dir, TOKEN_EXPERTS - 1) as rt:
        record_trace(rt, tmp_path / "t.jsonl.gz", [[1, 2, 3]], 4, ignore_eos=True)
    assert ("policy router (the default with fewer device slots than the 6 experts one token "
            "routes to)") in caplog.text
    assert read_trace(tmp_path / "t.jsonl.gz").header.policy == "router"


def test_a_resident_run_keeps_the_default(model_dir: Path) -> None:
    with offload_rt.load(model_dir, dtype="float32", max_seq_len=MAX_SEQ, offload=False) as rt:
        assert rt.options.policy == DEFAULT_POLICY and not rt.options.policy_given


def test_policy_given_is_not_an_option(model_dir: Path) -> None:
    """``policy_given`` is set by the options, never passed: ``load`` names it unknown (it
    listed every dataclass field as known, and the constructor then raised a TypeError)."""
    with pytest.raises(OptionError, match=r"unknown option\(s\) \['policy_given'\]") as err:
        offload_rt.load(model_dir, policy_given=True)
    assert "policy_given" not in str(err.value).split("known:")[1]
