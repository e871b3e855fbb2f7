"""Sampler: greedy, filters, reproducibility, and that draws follow the intended distribution."""

from __future__ import annotations

import math

import pytest
import torch

from offload_rt.errors import OptionError
from offload_rt.sampling import Sampler, SamplingConfig


def _draws(config: SamplingConfig, logits: torch.Tensor, n: int) -> list[int]:
    sampler = Sampler(config)
    return [sampler.sample(logits) for _ in range(n)]


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9])
    assert Sampler(SamplingConfig()).sample(logits) == 1


def test_greedy_ties_pick_lowest_id() -> None:
    logits = torch.tensor([1.0, 5.0, 5.0, 5.0])
    assert Sampler(SamplingConfig(temperature=0.0)).sample(logits) == 1


def test_accepts_half_precision_and_returns_int() -> None:
    logits = torch.tensor([0.0, 2.0, 1.0], dtype=torch.bfloat16)
    token = Sampler(SamplingConfig(temperature=0.7, seed=0)).sample(logits)
    assert isinstance(token, int) and 0 <= token < 3


def test_rejects_batched_logits() -> None:
    with pytest.raises(ValueError, match="vocab"):
        Sampler(SamplingConfig()).sample(torch.zeros(2, 5))


def test_same_seed_same_tokens() -> None:
    logits = torch.zeros(100)
    config = SamplingConfig(temperature=1.0, seed=1234)
    assert _draws(config, logits, 50) == _draws(config, logits, 50)


def test_different_seeds_differ() -> None:
    logits = torch.zeros(100)
    a = _draws(SamplingConfig(temperature=1.0, seed=1), logits, 50)
    b = _draws(SamplingConfig(temperature=1.0, seed=2), logits, 50)
    assert a != b


def test_no_seed_is_not_fixed() -> None:
    logits = torch.zeros(1000)
    config = SamplingConfig(temperature=1.0, seed=None)
    assert _draws(config, logits, 32) != _draws(config, logits, 32)


def test_private_generator_ignores_global_rng() -> None:
    logits = torch.zeros(100)
    config = SamplingConfig(temperature=1.0, seed=7)
    sampler = Sampler(config)
    first = sampler.sample(logits)
    torch.manual_seed(999)
    torch.rand(10)
    assert [first, sampler.sample(logits)] == _draws(config, logits, 2)


@pytest.mark.parametrize("seed", range(10))
def test_top_k_one_equals_greedy(seed: int) -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(seed))
    config = SamplingConfig(temperature=5.0, top_k=1, seed=seed)
    assert _draws(config, logits, 20) == [int(logits.argmax())] * 20


@pytest.mark.parametrize("seed", range(10))
def test_tiny_top_p_equals_greedy(seed: int) -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(seed))
    config = SamplingConfig(temperature=5.0, top_p=1e-6, seed=seed)
    assert _draws(config, logits, 20) == [int(logits.argmax())] * 20


def test_tiny_temperature_is_greedy_not_nan() -> None:
    logits = torch.tensor([1.0, 2.0, 1.5])
    assert _draws(SamplingConfig(temperature=1e-30, seed=0), logits, 10) == [1] * 10


def test_top_k_keeps_only_k_largest() -> None:
    logits = torch.tensor([0.0, 4.0, 1.0, 3.0, 2.0])
    probs = Sampler(SamplingConfig(temperature=1.0, top_k=2)).probabilities(logits)
    assert torch.nonzero(probs).flatten().tolist() == [1, 3]
    assert probs.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    logits = torch.tensor([0.2, 0.5, 0.3, 0.0]).log()  # probabilities 0.2, 0.5, 0.3, 0
    kept = {
        top_p: torch.nonzero(
            Sampler(SamplingConfig(temperature=1.0, top_p=top_p)).probabilities(logits)
        )
        .flatten()
        .tolist()
        for top_p in (0.3, 0.6, 0.9, 1.0)
    }
    assert kept == {0.3: [1], 0.6: [1, 2], 0.9: [0, 1, 2], 1.0: [0, 1, 2]}


def test_top_p_renormalizes() -> None:
    logits = torch.tensor([0.2, 0.5, 0.3]).log()
    probs = Sampler(SamplingConfig(temperature=1.0, top_p=0.6)).probabilities(logits)
    assert probs.tolist() == pytest.approx([0.0, 0.5 / 0.8, 0.3 / 0.8], abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_softmax(temperature: float) -> None:
    logits = torch.tensor([0.0, 1.0, 2.0])
    n = 10_000
    counts = torch.bincount(
        torch.tensor(_draws(SamplingConfig(temperature=temperature, seed=0), logits, n)),
        minlength=3,
    )
    expected = torch.softmax(logits / temperature, dim=-1)
    assert (counts / n).tolist() == pytest.approx(expected.tolist(), abs=0.02)  # ~4 sigma


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"seed": "42"}, "seed"),
    ],
)
def test_invalid_options_name_the_option(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(OptionError, match=option):
        SamplingConfig(**kwargs)  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        SamplingConfig().temperature = 1.0  # type: ignore[misc]
