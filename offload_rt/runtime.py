"""The embedding API: ``offload_rt.load(model_dir, **options)`` -> ``Runtime``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cache_policies import make_policy
from offload_rt.chat_template import encode_chat
from offload_rt.checkpoint import Checkpoint
from offload_rt.engine.assemble import build_offloaded
from offload_rt.engine.budget import MemoryPlan, footprint, plan_memory
from offload_rt.engine.offloaded import OffloadedExperts
from offload_rt.engine.resident import load_resident
from offload_rt.engine.sizes import format_size, parse_size
from offload_rt.engine.stats import EngineStats
from offload_rt.errors import BusyError, OptionError
from offload_rt.generation import GenerationConfig, GenerationResult, stream_text
from offload_rt.model.build import Progress, build_trunk
from offload_rt.model.experts import ExpertProvider
from offload_rt.model.transformer import Transformer
from offload_rt.options import RuntimeOptions
from offload_rt.sampling import SamplingConfig
from offload_rt.stream_decoder import StreamDecoder
from offload_rt.tokenizer import Tokenizer

log = logging.getLogger(__name__)
DEFAULT_CONTEXT = 4096


class _ChunkedLM:
    """The generation loop's model: prefill in chunks (bounded work memory), last logits only."""

    def __init__(self, model: Transformer, chunk: int) -> None:
        self.model, self.chunk = model, chunk
        self.max_seq_len = model.max_seq_len

    def reset(self) -> None:
        self.model.reset()

    def forward(self, token_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        logits = None
        for i in range(0, token_ids.shape[0], self.chunk):
            logits = self.model(token_ids[i:i + self.chunk], start_pos + i, last_only=True)
        assert logits is not None
        return logits


@dataclass
class Output:
    """What ``Runtime.generate`` returns."""

    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    stats: dict[str, Any] = field(default_factory=dict)


class Runtime:
    """A loaded model ready to generate. Not re-entrant: one generation at a time."""

    def __init__(self, ckpt: Checkpoint, options: RuntimeOptions,
                 tokenizer: Tokenizer | None, progress: Progress | None = None) -> None:
        self.checkpoint, self.options, self.tokenizer = ckpt, options, tokenizer
        self.config = ckpt.config
        self.device = options.torch_device()
        self.dtype = options.torch_dtype(ckpt.dtype)
        self.max_seq_len = min(options.max_seq_len or DEFAULT_CONTEXT, self.config.max_seq_len)
        self._busy = threading.Lock()
        self._cancel = threading.Event()
        self._closed = False
        self.last_result: GenerationResult | None = None
        self.last_prompt_ids: list[int] = []
        self._resident_stats = EngineStats()
        self.plan = self._plan()
        self.model = build_trunk(ckpt, self.dtype, self.device, progress)
        self.experts = self._experts(progress)
        self.model.attach(self.experts, self.max_seq_len)

    # ---- set-up -----------------------------------------------------------------------------
    def _plan(self) -> MemoryPlan:
        o, cfg = self.options, self.config
        if o.cache_experts is not None and not cfg.top_k <= o.cache_experts <= cfg.num_experts:
            raise OptionError(f"--cache-experts must be between top_k ({cfg.top_k}) and the "
                              f"number of experts ({cfg.num_experts}), got {o.cache_experts}")
        fp = footprint(cfg, self.dtype, self.max_seq_len, o.prefill_chunk)
        gpu = parse_size(o.gpu_memory, "--gpu-memory")
        cpu = parse_size(o.cpu_memory, "--cpu-memory")
        on_gpu = self.device.type == "cuda"
        return plan_memory(cfg, fp, self.device, device_budget=gpu if on_gpu else cpu,
                           host_budget=cpu if on_gpu else None,
                           cache_experts=o.cache_experts,
                           per_layer={"layer": True, "global": False}.get(o.pool))

    @property
    def offloaded(self) -> bool:
        total = self.config.num_layers * self.config.num_experts
        if self.options.offload is not None:
            return self.options.offload
        return self.options.cache_experts is not None or self.plan.device_slots < total

    def _experts(self, progress: Progress | None) -> ExpertProvider:
        cfg, o = self.config, self.options
        if not self.offloaded:
            log.info("all %d experts resident (%s each)", cfg.num_layers * cfg.num_experts,
                     format_size(self.plan.footprint.expert))
            return load_resident(self.checkpoint, self.dtype, self.device, progress)
        log.info("offloading: %d device slots (%s each), %d host slots, policy %s, prefetch %d",
                 self.plan.device_slots, format_size(self.plan.footprint.expert),
                 self.plan.host_slots, o.policy, o.prefetch)
        return build_offloaded(self.checkpoint, self.model, self.plan,
                               lambda: make_policy(o.policy), dtype=self.dtype,
                               device=self.device, prefetch_depth=o.prefetch,
                               drop_page_cache=o.drop_page_cache)

    # ---- generation -------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int] | None = None, *,
               messages: Sequence[Mapping[str, str]] | None = None) -> list[int]:
        """Prompt ids: raw text (BOS + sentencepiece), given ids, or a chat (template)."""
        if (prompt is None) == (messages is None):
            raise OptionError("give exactly one of prompt= or messages=")
        if messages is not None:
            return encode_chat(self._tok(), messages)
        if isinstance(prompt, str):
            return self._tok().encode(prompt, bos=True)
        ids = [int(t) for t in prompt]  # type: ignore[union-attr]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise OptionError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                              f"(0..{self.config.vocab_size - 1})")
        return ids

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise OptionError(f"{self.checkpoint.model_dir}: no tokenizer.model; pass token ids")
        return self.tokenizer

    def stream(self, prompt: str | Sequence[int] | None = None, *,
               messages: Sequence[Mapping[str, str]] | None = None, max_new_tokens: int = 128,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, stop: Sequence[str] = (),
               ignore_eos: bool = False) -> Iterator[str]:
        """Yield text pieces as they are generated. ``self.last_result`` holds ids and timing."""
        ids, config = self._request(prompt, messages, max_new_tokens, temperature, top_k, top_p,
                                    seed, stop, ignore_eos)
        return self._stream(ids, config, None)

    def generate(self, prompt: str | Sequence[int] | None = None, *,
                 messages: Sequence[Mapping[str, str]] | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] = (),
                 ignore_eos: bool = False) -> Output:
        """Run to completion; returns text, ids, finish reason and statistics."""
        start = time.perf_counter()
        ids, config = self._request(prompt, messages, max_new_tokens, temperature, top_k, top_p,
                                    seed, stop, ignore_eos)
        ended: list[tuple[list[int], str, dict[str, Any]]] = []

        def done(result: GenerationResult) -> None:
            ended.append((list(result.token_ids), result.finish_reason,
                          self.stats_dict(time.perf_counter() - start)))

        text = "".join(self._stream(ids, config, done))
        token_ids, finish_reason, stats = ended[0]
        return Output(text, list(ids), token_ids, finish_reason, stats)

    def _request(self, prompt: str | Sequence[int] | None,
                 messages: Sequence[Mapping[str, str]] | None, max_new_tokens: int,
                 temperature: float, top_k: int, top_p: float, seed: int | None,
                 stop: Sequence[str], ignore_eos: bool) -> tuple[list[int], GenerationConfig]:
        self._check_open()
        ids = self.encode(prompt, messages=messages)
        return ids, GenerationConfig(max_new_tokens=max_new_tokens, stop=tuple(stop),
                                     ignore_eos=ignore_eos,
                                     sampling=SamplingConfig(temperature, top_k, top_p, seed))

    def _stream(self, ids: list[int], config: GenerationConfig,
                on_done: Callable[[GenerationResult], None] | None) -> Iterator[str]:
        """The generation itself. ``on_done`` runs at its end while this call still holds the
        runtime, so the results and statistics it reads cannot be another call's."""
        if not self._busy.acquire(blocking=False):
            raise BusyError("a generation is already running on this runtime; wait for it or "
                            "call cancel()")
        try:
            self._check_open()  # close() may have run since the request was checked
            self.last_prompt_ids = ids  # set under the lock: a refused call keeps its hands off
            self._cancel.clear()
            self.stats.reset()
            decoder = StreamDecoder(self._tok()) if self.tokenizer else _IdDecoder()
            text_stream = stream_text(_ChunkedLM(self.model, self.options.prefill_chunk), ids,
                                      config, decoder, eos_id=self.config.eos_token_id,
                                      cancel=self._cancel)
            self.last_result = text_stream.result
            yield from text_stream
            if on_done is not None:
                on_done(text_stream.result)
        finally:
            self._busy.release()
            if self._closed:  # close() was called meanwhile and left the freeing to us
                self._free_if_idle()

    def cancel(self) -> None:
        """Stop the running generation (from any thread) before its next token."""
        self._cancel.set()

    @property
    def stats(self) -> EngineStats:
        if isinstance(self.experts, OffloadedExperts):
            return self.experts.stats
        return self._resident_stats

    def stats_dict(self, wall_s: float | None = None) -> dict[str, Any]:
        r = self.last_result
        out = self.stats.as_dict()
        if r is not None:
            n = len(r.token_ids)
            out.update(tokens=n, prompt_tokens=r.prompt_tokens,
                       time_to_first_token_s=round(r.time_to_first_token_s, 6),
                       decode_tokens_per_s=round(r.decode_tokens_per_s, 3))
            if wall_s:
                out["tokens_per_s"] = round(n / wall_s, 3)
                out["wall_s"] = round(wall_s, 6)
        out["offloaded"] = self.offloaded
        return out

    def close(self) -> None:
        """Stop background threads and drop the model's memory; later calls raise OptionError.

        A generation running in another thread is cancelled (it ends before its next token) and
        the memory is freed as it ends, so the engine is never torn down under a forward pass.
        """
        self._closed = True
        self.cancel()
        self._free_if_idle()

    def _check_open(self) -> None:
        if self._closed:
            raise OptionError("this runtime is closed (close() was called); load the model again")

    def _free_if_idle(self) -> None:
        if not self._busy.acquire(blocking=False):
            return  # a generation is running: its stream calls this again as it ends
        try:
            if isinstance(self.experts, OffloadedExperts):
                self.experts.close()
            self.experts = None  # type: ignore[assignment]
            self.model = None  # type: ignore[assignment]
        finally:
            self._busy.release()

    def __enter__(self) -> Runtime:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _IdDecoder:
    """Stands in for a tokenizer-less model: text is empty, ids are still returned."""

    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def load(model_dir: str | Path, *, progress: Progress | None = None, **options: Any) -> Runtime:
    """Open, validate and load a model folder. Options: see ``RuntimeOptions``.

    ``progress(done, total)`` is called as weights are read (the CLI draws a bar with it).
    """
    ckpt = Checkpoint.open(model_dir)
    tok_path = Path(ckpt.model_dir)
    tokenizer = Tokenizer.from_model_dir(tok_path) if any(
        tok_path.glob("tokenizer.model*")) else None
    known = RuntimeOptions.__dataclass_fields__
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise OptionError(f"unknown option(s) {unknown}; known: {sorted(known)}")
    return Runtime(ckpt, RuntimeOptions(**options), tokenizer, progress)
