"""Hybrid miss handling: compute a missed expert where its weights already are instead of
moving them.

On a GPU run an expert that misses the device tier normally goes disk -> pinned host slot ->
device slot, and the GPU computes it. Moving a Mixtral 8x7B expert (176 M weights: 352 MB in
bf16, ~94 MB as int4 records) over PCIe takes milliseconds, while the CPU computes one token's
worth of it from host RAM in about the time it takes to read those bytes once from memory. So,
per miss, the engine compares (Fiddler, Kamahori et al. 2024, arXiv:2402.07033, section 3;
llama.cpp's ``--cpu-moe`` makes the same choice statically):

    copy_s = seconds one host -> device copy of the expert's record takes
    host_s(T) = host_fixed_s + host_per_token_s * (T - 1)   (the CPU computing T tokens of it)

and runs the expert on the CPU when ``host_s(T) < copy_s``, where T is how many tokens of this
forward pass the router sent to it. Both figures are measured at start-up on the run's own
slots and kernels (``measure_costs``). A disk read, when the host tier misses too, precedes
both choices and is left out; so are the GPU's own compute time (microseconds per expert for a
decode step) and the hidden state's trip (H values each way). As ``host_s`` grows with T and
``copy_s`` does not, the rule is a threshold on T: ``HybridRule.max_tokens``. Prefill chunks,
whose experts get many tokens each, go to the GPU.

Exactness with hybrid on: the CPU's and the GPU's kernels round differently, so an expert run on
the CPU gives other bits than on the GPU. What holds: a run equals, bit for bit, the resident
model run with the same experts placed on the same processor at the same steps
(``tests/test_hybrid.py`` replays recorded placements). The placements are a function of the
routing and the cache's contents; with prefetch the contents depend on when the prefetch
threads' reads land, so two runs may place an expert differently and differ in the last bits.
``hybrid="off"`` keeps the plain promise (offloaded == resident); on a CPU-only run there is
nothing to decide (every expert already runs where it sits) and the option has no effect.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from offload_rt.config import ModelConfig
from offload_rt.engine import work_memory as wm
from offload_rt.engine.transfer import HostToDevice
from offload_rt.quant.formats import ExpertFormat

log = logging.getLogger(__name__)

MODES = ("auto", "off", "always")
# Most tokens one expert computed on the CPU may get: bounds the host memory its computation
# takes (reserved from --cpu-memory, ``host_work_bytes``) and the time a misjudged cost can
# cost. Decode steps route one token per expert; the crossover measured on any machine so far
# is far below this.
MAX_HOST_TOKENS = 64
REPEATS = 3  # timings per figure at start-up; the median is kept
WIDE_TOKENS = 16  # a second token count, for host_per_token_s


@dataclass(frozen=True)
class HybridCosts:
    """Seconds for one expert of this run's format: copied host -> device (``copy_s``), and
    computed on the CPU for one token (``host_fixed_s``) plus each further token
    (``host_per_token_s``)."""

    copy_s: float
    host_fixed_s: float
    host_per_token_s: float

    def host_s(self, tokens: int) -> float:
        return self.host_fixed_s + self.host_per_token_s * max(0, tokens - 1)

    def max_tokens(self, cap: int = MAX_HOST_TOKENS) -> int:
        """The most tokens for which the CPU is faster than the copy (0: never), at most
        ``cap``."""
        if self.host_fixed_s >= self.copy_s:
            return 0
        if self.host_per_token_s <= 0:
            return cap
        fit = 1 + int((self.copy_s - self.host_fixed_s) / self.host_per_token_s)
        while fit > 1 and self.host_s(fit) >= self.copy_s:  # float rounding at the boundary
            fit -= 1
        return min(cap, fit)


@dataclass(frozen=True)
class HybridRule:
    """Which device-tier misses run on the host: those routed ``max_tokens`` tokens or fewer
    in this forward pass. ``costs``: what the threshold was derived from (None: given)."""

    max_tokens: int
    costs: HybridCosts | None = None

    def on_host(self, tokens: int) -> bool:
        return 0 < tokens <= self.max_tokens

    def describe(self) -> str:
        """The start-up line's account of the rule."""
        if self.costs is None:
            return f"hybrid: a missed expert with <= {self.max_tokens} tokens runs on the CPU"
        c = self.costs
        measured = (f"(copy {c.copy_s * 1e3:.2f} ms vs CPU {c.host_fixed_s * 1e3:.2f} ms + "
                    f"{c.host_per_token_s * 1e3:.3f} ms per further token)")
        if self.max_tokens == 0:
            return f"hybrid: off, copying beats the CPU for every miss {measured}"
        return (f"hybrid: a missed expert with <= {self.max_tokens} tokens runs on the CPU "
                f"{measured}")


def _median_s(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    fn()  # warm-up: first calls allocate, pick kernels, fault pages in
    sync()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_costs(fmt: ExpertFormat, host_record: torch.Tensor, device_record: torch.Tensor,
                  h2d: HostToDevice, hidden_size: int, dtype: torch.dtype) -> HybridCosts:
    """Time one host -> device copy of ``host_record`` (a host slot's expert buffer) into
    ``device_record`` (slot 0's), and ``fmt.ffn`` on ``host_record`` for 1 and
    ``WIDE_TOKENS`` tokens of ``hidden_size`` in ``dtype``. Call at start-up, before any
    expert is loaded: both records are overwritten (the host one with zeros, so the timing
    never meets NaNs or denormals)."""
    host_record.zero_()
    sync = torch.cuda.synchronize if device_record.is_cuda else (lambda: None)
    copy_s = _median_s(lambda: h2d.copy(device_record, host_record, 0), sync)
    h2d.released(0)
    x = torch.zeros(WIDE_TOKENS, hidden_size, dtype=dtype)
    one = _median_s(lambda: fmt.ffn(x[:1], host_record), lambda: None)
    wide = _median_s(lambda: fmt.ffn(x, host_record), lambda: None)
    return HybridCosts(copy_s, one, max(0.0, (wide - one) / (WIDE_TOKENS - 1)))


def host_work_bytes(cfg: ModelConfig, fmt: ExpertFormat, dtype: torch.dtype,
                    tokens: int = MAX_HOST_TOKENS) -> int:
    """Host RAM the CPU computing one expert for up to ``tokens`` tokens takes besides its
    record, bounded by what a whole CPU forward of that many tokens allocates
    (``work_memory.forward_peak`` and ``gemm_scratch``, with their safety margin) plus x's rows
    copied to the host and y's (H each). Reserved from ``--cpu-memory``."""
    threads = torch.get_num_threads()
    peak = wm.forward_peak(cfg, dtype, tokens, 1, device_type="cpu", threads=threads, fmt=fmt)
    peak += wm.gemm_scratch(cfg, dtype, tokens, device_type="cpu", threads=threads, fmt=fmt)
    item = torch.empty((), dtype=dtype).element_size()
    return peak + peak // wm.MARGIN_FRACTION + wm.MARGIN_BYTES + 2 * tokens * cfg.hidden_size * item
