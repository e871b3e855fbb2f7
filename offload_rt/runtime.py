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
from offload_rt.checkpoint import Checkpoint
from offload_rt.chunked_lm import ChunkedLM, IdDecoder
from offload_rt.context import choose_context
from offload_rt.demo import demo_model_dir, demo_options
from offload_rt.engine.assemble import build_offloaded
from offload_rt.engine.budget import plan_line, slots_text
from offload_rt.engine.offloaded import OffloadedExperts
from offload_rt.engine.out_of_memory import (
    generation_out_of_memory_error,
    is_out_of_memory,
    out_of_memory_error,
)
from offload_rt.engine.resident import load_resident
from offload_rt.engine.sizes import format_size
from offload_rt.engine.stats import EngineStats
from offload_rt.errors import BudgetError, BusyError, OptionError
from offload_rt.generation import GenerationConfig, GenerationResult, stream_text
from offload_rt.generation_config import read_generation_config
from offload_rt.model.build import Progress, build_trunk
from offload_rt.model.experts import ExpertProvider
from offload_rt.model.int8_linear import use_kernel as use_int8_kernel
from offload_rt.options import PREFETCH_FLOOR, RuntimeOptions, default_policy, default_prefetch
from offload_rt.prompt import check_ids, encode_messages, encode_text
from offload_rt.quant import int_dot
from offload_rt.quant.formats import ExpertFormat
from offload_rt.quant.select import select_format, select_trunk
from offload_rt.runtime_plan import plan_runtime
from offload_rt.sampling import SamplingConfig
from offload_rt.stream_decoder import StreamDecoder
from offload_rt.tensor_names import MISTRAL
from offload_rt.tokenizer import Tokenizer, has_tokenizer_file

log = logging.getLogger(__name__)


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
        self.dtype = options.torch_dtype(self._default_dtype())
        context = choose_context(self.config, options.max_seq_len)
        self.max_seq_len, self.max_seq_len_source = context.max_seq_len, context.source
        self.generation_defaults = read_generation_config(ckpt.model_dir, ckpt.config.vocab_size)
        self.eos_token_ids = (self.generation_defaults.eos_token_ids or self.config.eos_token_ids
                              or _tokenizer_eos(tokenizer))
        self._busy = threading.Lock()
        self._cancel = threading.Event()
        self._closed = False
        self.last_result: GenerationResult | None = None
        self.last_prompt_ids: list[int] = []
        self._resident_stats = EngineStats()
        self.expert_format = select_format(ckpt, options.experts, options.group_size,
                                           self.dtype, self.device, options.quant_kernel)
        _check_quant_kernel(options, self.expert_format, ckpt)
        self.plan = plan_runtime(options, self.config, self.dtype, self.device, self.max_seq_len,
                                 file_dtype=ckpt.expert_dtype, fmt=self.expert_format)
        self.options = options = self._choose_policy(self._choose_prefetch(options))
        log.info("%s", plan_line(self.plan))
        self.model = self.experts = None  # type: ignore[assignment]
        stage = "trunk"
        try:  # a failure frees what was built (prefetch thread, slots, files), then is raised
            self.model = build_trunk(ckpt, self.dtype, self.device, progress, options.trunk)
            if options.quant_kernel not in (None, "torch"):
                use_int8_kernel(self.model, options.quant_kernel)
            stage = "experts"
            self.experts = self._experts(progress)
            stage = "kv_cache"
            self.model.attach(self.experts, self.max_seq_len, self.expert_format.ffn)
        except BaseException as exc:
            self._free_if_idle()
            if not is_out_of_memory(exc):
                raise
            raise out_of_memory_error(exc.with_traceback(None), stage, self.plan, self.config,
                                      device=self.device, dtype=self.dtype,
                                      offloaded=self.offloaded, options=options) from exc

    # ---- set-up -----------------------------------------------------------------------------
    def _default_dtype(self) -> torch.dtype:
        """config.json's dtype (transformers' default dtype="auto" computes in it), else the
        weights' dtype."""
        declared, weights = self.config.dtype, self.checkpoint.dtype
        if declared is None or getattr(torch, declared) == weights:
            return weights
        if self.options.dtype is None:
            log.warning("%s/config.json declares dtype %s but the weights are %s: computing in "
                        "%s, as transformers does; --dtype picks another", self.checkpoint.model_dir,
                        declared, str(weights).removeprefix("torch."), declared)
        return getattr(torch, declared)

    def _choose_prefetch(self, options: RuntimeOptions) -> RuntimeOptions:
        """``options`` with the plan's ``default_prefetch`` when no depth was given."""
        if options.prefetch_given or options.offload is False:
            return options
        depth = default_prefetch(self.plan.device_slots,
                                 self.config.num_layers * self.config.top_k)
        return options if depth == options.prefetch else options.with_chosen(prefetch=depth)

    @property
    def adaptive_prefetch(self) -> bool:
        """Whether the prefetch depth adapts (offloaded, not given, and deeper than its
        floor); False for resident experts, which have no prefetch."""
        return self.offloaded and not self.options.prefetch_given and \
            self.options.prefetch > PREFETCH_FLOOR  # type: ignore[operator]  # filled in

    def _choose_policy(self, options: RuntimeOptions) -> RuntimeOptions:
        """``options`` with the plan's ``default_policy`` when none was given (below one
        token's experts LRU keeps none to the next token); ``policy_note`` says so."""
        self.policy_note = ""
        if options.policy_given or options.offload is False:
            return options
        token_experts = self.config.num_layers * self.config.top_k
        chosen = default_policy(self.plan.device_slots, token_experts,
                                options.prefetch)  # type: ignore[arg-type]  # filled in
        if chosen == options.policy:
            return options
        self.policy_note = (f" (the default with fewer device slots than the {token_experts} "
                            "experts one token routes to)")
        return options.with_chosen(policy=chosen)

    @property
    def offloaded(self) -> bool:
        total = self.config.num_layers * self.config.num_experts
        if self.options.offload is not None:
            return self.options.offload
        return self.options.cache_experts is not None or self.plan.device_slots < total

    def _experts(self, progress: Progress | None) -> ExpertProvider:
        cfg, o, fmt = self.config, self.options, self.expert_format
        name = fmt.name + (f", {fmt.kernel} kernel" if getattr(fmt, "kernel", "torch") != "torch"
                           else "")
        if not self.offloaded:
            log.info("all %d experts resident (%s each, %s)", cfg.num_layers * cfg.num_experts,
                     format_size(self.plan.footprint.expert), name)
            return load_resident(self.checkpoint, fmt, self.device, progress)
        depth = f"{PREFETCH_FLOOR}-{o.prefetch} (adaptive)" if self.adaptive_prefetch \
            else str(o.prefetch)
        log.info("offloading: %s (%s each, %s), %d host slots, policy %s%s, prefetch %s",
                 slots_text(self.plan), format_size(self.plan.footprint.expert), name,
                 self.plan.host_slots, o.policy, self.policy_note, depth)
        return build_offloaded(self.checkpoint, self.model, self.plan,
                               lambda: make_policy(o.policy), dtype=self.dtype,
                               device=self.device, prefetch_depth=o.prefetch,
                               prefetch_floor=PREFETCH_FLOOR if self.adaptive_prefetch else None,
                               drop_page_cache=o.drop_page_cache, fmt=fmt,
                               hybrid=o.hybrid)  # type: ignore[arg-type]  # set by options

    # ---- generation -------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int] | None = None, *,
               messages: Sequence[Mapping[str, str]] | None = None) -> list[int]:
        """Prompt ids: raw text (BOS + sentencepiece), given ids, or a chat (template).

        OptionError for text that is not valid Unicode or ids outside the model's vocabulary
        (``offload_rt.prompt``)."""
        if (prompt is None) == (messages is None):
            raise OptionError("give exactly one of prompt= or messages=")
        if messages is not None:
            ids = encode_messages(self._tok(), messages)
            what = "the chat template rendered these messages as no tokens"
        elif isinstance(prompt, str):
            ids = encode_text(self._tok(), prompt)
            what = "the prompt text encodes to no tokens (empty, and this tokenizer adds no BOS)"
        else:
            ids, what = check_ids(prompt, self.config.vocab_size), "the prompt ids are empty"
        if not ids:
            raise OptionError(f"{what}; generation needs at least one prompt token")
        return ids

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise OptionError(f"{self.checkpoint.model_dir}: no tokenizer (tokenizer.json or "
                              "tokenizer.model); pass token ids")
        return self.tokenizer

    def _never_sampled(self) -> list[int]:
        """Padding ids (``Tokenizer.padding_ids``: no text) except the EOS ids, which stop."""
        padding = self.tokenizer.padding_ids if self.tokenizer else range(0)
        return [i for i in padding if i not in self.eos_token_ids]

    def stream(self, prompt: str | Sequence[int] | None = None, *,
               messages: Sequence[Mapping[str, str]] | None = None,
               max_new_tokens: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: Sequence[str] | None = None, ignore_eos: bool = False) -> Iterator[str]:
        """Yield text pieces as they are generated. ``self.last_result`` holds ids and timing.

        A parameter left None takes the model's default (``generation_config.json``, see
        ``self.generation_defaults``), else: 128 new tokens, greedy, no stop strings."""
        ids, config = self._request(prompt, messages, max_new_tokens, temperature, top_k, top_p,
                                    seed, stop, ignore_eos)
        return self._stream(ids, config, None)

    def generate(self, prompt: str | Sequence[int] | None = None, *,
                 messages: Sequence[Mapping[str, str]] | None = None,
                 max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: Sequence[str] | None = None, ignore_eos: bool = False) -> Output:
        """Run to completion; returns text, ids, finish reason and statistics. Defaults as
        ``stream``'s."""
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
                 messages: Sequence[Mapping[str, str]] | None, max_new_tokens: int | None,
                 temperature: float | None, top_k: int | None, top_p: float | None,
                 seed: int | None, stop: Sequence[str] | None, ignore_eos: bool
                 ) -> tuple[list[int], GenerationConfig]:
        self._check_open()
        _check_request_types(temperature, ignore_eos)
        ids = self.encode(prompt, messages=messages)
        d = self.generation_defaults
        sampling = SamplingConfig(*d.sampling(temperature, top_k, top_p), seed)
        return ids, GenerationConfig(max_new_tokens=d.new_tokens(max_new_tokens, len(ids)),
                                     max_new_tokens_source=d.new_tokens_source(max_new_tokens),
                                     stop=d.stops(stop), ignore_eos=ignore_eos,
                                     sampling=sampling)

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
            decoder = StreamDecoder(self._tok()) if self.tokenizer else IdDecoder()
            text_stream = stream_text(ChunkedLM(self.model, self.options.prefill_chunk,
                                                 self._never_sampled()), ids,
                                      config, decoder, eos_id=self.eos_token_ids,
                                      cancel=self._cancel,
                                      max_seq_len_source=self.max_seq_len_source)
            self.last_result = text_stream.result
            try:
                yield from text_stream
            except Exception as exc:  # the request failed: only allocation failures translate
                if isinstance(self.experts, OffloadedExperts):
                    self.experts.forget_request()
                if isinstance(exc, BudgetError) or not is_out_of_memory(exc):
                    raise
                raise generation_out_of_memory_error(
                    exc, self.plan, device=self.device, prompt_tokens=len(ids),
                    chunk=self.options.prefill_chunk) from exc
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
            self.checkpoint.close()  # the weight files' descriptors (after any read in flight)
        finally:
            self._busy.release()

    def __enter__(self) -> Runtime:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(model_dir: str | Path | None = None, *, progress: Progress | None = None,
         **options: Any) -> Runtime:
    """Open, validate and load a model folder. Options: see ``RuntimeOptions``.

    ``model_dir=None``: the shipped demo model, caching 4 of its 8 experts per layer unless the
    options size the cache (``offload_rt.demo.demo_options``), as the command line does.
    ``progress(done, total)`` is called as weights are read (the CLI draws a bar with it).
    """
    if model_dir is None:
        model_dir, options = demo_model_dir(), demo_options(options)
    known = [n for n, f in RuntimeOptions.__dataclass_fields__.items() if f.init]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise OptionError(f"unknown option(s) {unknown}; known: {sorted(known)}")
    checked = RuntimeOptions(**options)  # before any file is opened
    ckpt = Checkpoint.open(model_dir)
    trunk = select_trunk(ckpt, checked.trunk, checked.device)  # trunk=None: the folder's
    checked = RuntimeOptions(**{**options, "trunk": trunk})
    tokenizer = _fitted_tokenizer(ckpt)
    return Runtime(ckpt, checked, tokenizer, progress)


def _check_quant_kernel(options: RuntimeOptions, fmt: ExpertFormat, ckpt: Checkpoint) -> None:
    """``--quant-kernel int8-dot`` with nothing it computes (float or fp8 experts and a float
    trunk) is a mistake: OptionError naming what runs instead. Otherwise its kernels are built
    now, at start-up (``native.KernelBuildError``), not at the first forward."""
    if options.quant_kernel in (None, "torch"):
        return
    if options.trunk != "int8" and fmt.name not in ("int8", "int4"):
        where = f"--experts {options.experts}" if options.experts else str(ckpt.model_dir)
        raise OptionError(
            f"--quant-kernel {options.quant_kernel} computes int8/int4 experts and an int8 "
            f"trunk, and this run has neither: its experts run as {fmt.name} ({where}) and its "
            "trunk as float; drop --quant-kernel, or add --experts int4|int8 or --trunk int8")
    int_dot.load()


def _check_request_types(temperature: object, ignore_eos: object) -> None:
    """The request values that are compared or tested before ``SamplingConfig`` checks them:
    a temperature of another type (``"0.5"``) and a non-bool ``ignore_eos`` (``"no"`` is
    truthy) are ``OptionError``s naming them."""
    if temperature is not None and (isinstance(temperature, bool)
                                    or not isinstance(temperature, (int, float))):
        raise OptionError(f"temperature must be a number >= 0 (0 = greedy) or None, got "
                          f"{temperature!r}")
    if not isinstance(ignore_eos, bool):
        raise OptionError(f"ignore_eos must be True or False, got {ignore_eos!r}")


def _fitted_tokenizer(ckpt: Checkpoint) -> Tokenizer | None:
    """The folder's tokenizer checked against the model's vocabulary (``fit_to_model``), or
    None for a folder without one (prompts are then token ids)."""
    if not has_tokenizer_file(ckpt.model_dir):
        return None
    config_file = ckpt.model_dir / ("params.json" if ckpt.layout == MISTRAL else "config.json")
    return Tokenizer.from_model_dir(ckpt.model_dir).fit_to_model(ckpt.config.vocab_size,
                                                                 config_file)


def _tokenizer_eos(tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """The tokenizer's EOS id, for a model whose config files name none (params.json); 2
    (Mixtral's) without a tokenizer; none when the tokenizer names none."""
    if tokenizer is None:
        return (2,)
    return () if tokenizer.eos_id is None else (tokenizer.eos_id,)
