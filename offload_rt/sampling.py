"""Pick the next token from a logits vector: greedy, or temperature / top-k / top-p sampling.

`check_finite` refuses a vector with NaN or +inf first: greedy would pick id 0 (argmax of NaN)
and sampling would fail inside torch.multinomial.

Any temperature > 0 samples, however small: the logits are divided by it in float64 after
subtracting their maximum, so the most likely token scores exactly 0 and every other one a
finite negative number or -inf (float64's smallest positive temperature, 5e-324, included);
the rest runs in float32. In float32 a temperature below 1.4e-45 rounds to 0, and 0 / 0 gave
NaN probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from offload_rt.errors import NumericalError, OptionError
from offload_rt.request_checks import check_seed

FLOAT16_MAX = 65504.0  # largest finite float16 (IEEE 754 binary16)


@dataclass(frozen=True)
class SamplingConfig:
    """How to choose each token. temperature 0 means greedy (deterministic, no randomness used).

    top_k 0 and top_p 1.0 disable those filters. seed None draws a fresh seed per Sampler, so runs
    differ; an int in 0..2**64 - 1 makes the token sequence reproducible for identical logits
    (``request_checks.check_seed``: OptionError outside it).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise OptionError(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise OptionError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise OptionError(f"top_k must be an int >= 0 (0 = disabled), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise OptionError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not 0.0 < self.top_p <= 1.0:  # also rejects NaN
            raise OptionError(f"top_p must be in (0, 1] (1 = disabled), got {self.top_p}")
        check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Turns one logits vector into a token id, owning its own random stream.

    A private generator (rather than torch's global one) keeps a seeded run reproducible no
    matter what else in the process draws random numbers. Sampling happens on the CPU: the vector
    must come back to the host anyway to become an int, and a CPU generator gives the same tokens
    whichever device produced the logits.
    """

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self._generator = torch.Generator(device="cpu")
        if config.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(config.seed)

    def sample(self, logits: torch.Tensor) -> int:
        """Choose a token id from `logits` [vocab]."""
        if logits.dim() != 1:
            raise ValueError(f"expected logits of shape [vocab], got {tuple(logits.shape)}")
        logits = logits.detach().to(device="cpu", dtype=torch.float32)
        if self.config.greedy:
            return int(torch.argmax(logits))  # ties: the lowest id
        probs = self.probabilities(logits)
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution `sample` draws from (temperature > 0): float32 [vocab], sums to 1."""
        logits = logits.to(torch.float32)
        # Shift first, so the maximum scores 0 (never inf - inf = NaN), then divide in float64,
        # where any positive temperature stays positive (module docstring); back in float32 a
        # quotient below its range is -inf, a probability of 0.
        shifted = (logits - logits.max()).to(torch.float64)
        scaled = (shifted / self.config.temperature).to(torch.float32)
        del shifted  # freed first: the peak stays engine/work_memory.SAMPLER_BYTES_PER_ID
        scaled = _keep_top_k(scaled, self.config.top_k)
        probs = torch.softmax(scaled, dim=-1)
        probs = _keep_top_p(probs, self.config.top_p)
        return probs / probs.sum()


def _keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Mask all but the k largest logits. Ties with the k-th value are all kept (deterministic)."""
    if k <= 0 or k >= logits.numel():
        return logits
    kth_value = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth_value, float("-inf"))


def _keep_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest high-probability set whose mass reaches top_p (never empty)."""
    if top_p >= 1.0:  # skip: rounding in cumsum could otherwise drop the tail
        return probs
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    # A token is dropped once the more likely tokens already reach top_p; the first never is.
    drop_sorted = mass_before >= top_p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return probs.masked_fill(drop, 0.0)


def check_finite(logits: torch.Tensor, step: int, dtype: torch.dtype | None) -> None:
    """NumericalError unless `logits` [vocab] has a finite maximum.

    One reduction (`max` propagates NaN): NaN, +inf, or nothing but -inf fails; a -inf among
    finite values is fine (masked ids carry it). `step` 0 is the prefill, N the N-th decode step;
    `dtype` is the compute dtype (None: unknown), which decides the advice.
    """
    top = float(logits.max())
    if math.isfinite(top):
        return
    found = "NaN" if math.isnan(top) else "+inf" if top > 0 else "only -inf"
    where = "the prefill (prompt)" if step == 0 else f"decode step {step}"
    name = "unknown" if dtype is None else str(dtype).removeprefix("torch.")
    advice = []
    if dtype is None or dtype == torch.float16:
        advice.append(f"activations beyond {FLOAT16_MAX:g} overflow float16: run in a wider dtype, "
                      "--dtype bfloat16 (same memory) or --dtype float32 (API: dtype=...)")
    if dtype != torch.float16:
        advice.append("the checkpoint's weights may be corrupt (NaN, inf or huge values): check "
                      "its files against their published checksums")
    message = (f"the model produced non-finite logits ({found}) at {where}, compute dtype "
               f"{name}: " + "; or ".join(advice))
    raise NumericalError(message)
