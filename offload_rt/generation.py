"""The generation loop: prefill the prompt, then decode one token at a time, as ids or as text.

Model-agnostic: anything with `reset`, `forward(token_ids, start_pos)` and `max_seq_len` works,
so tests drive it with a fake model and the runtime with the offloaded MoE model. Use:
`stream = stream_text(...)`, iterate it for text, then read `stream.result`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from offload_rt.errors import ContextLengthError, OptionError
from offload_rt.request_checks import check_stops
from offload_rt.sampling import Sampler, SamplingConfig, check_finite
from offload_rt.stop_strings import StopStringFilter

logger = logging.getLogger(__name__)

FinishReason = Literal["eos", "length", "stop", "cancelled"]


class CausalLM(Protocol):
    """What the loop needs from a model: a KV cache it can clear and a logits function."""

    max_seq_len: int  # context length (KV cache size)

    def reset(self) -> None: ...

    def forward(self, token_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        """token_ids: long [T] at positions start_pos.. -> float32 logits [T, vocab]."""
        ...


class TextDecoder(Protocol):
    """Incremental detokenizer (offload_rt.stream_decoder.StreamDecoder satisfies it)."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@dataclass(frozen=True)
class GenerationConfig:
    """When to stop and how to pick tokens. `stop` strings end generation at the text level.

    `stop` strings must be valid Unicode (a lone surrogate could never match generated text:
    OptionError naming `stop[i]`). `max_new_tokens_source` says where `max_new_tokens` came
    from when the caller did not give it (`GenerationDefaults.new_tokens_source`), for the
    message of a request that does not fit the context; "" = given by the caller.
    """

    max_new_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    max_new_tokens_source: str = ""

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise OptionError(f"max_new_tokens must be an int >= 1, got {n!r}")
        object.__setattr__(self, "stop", check_stops(self.stop))  # a list stored immutably


@dataclass
class GenerationResult:
    """What a finished run produced, filled in as it goes.

    token_ids excludes the prompt and the EOS token, but includes the tokens that spelled a stop
    string (they were generated and are in the KV cache). text is filled by stream_text only,
    and excludes the stop string.
    finish_reason stays None while running or if the caller stopped iterating early. Timings
    count only the loop's own work, not time the caller spends between tokens.
    """

    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    time_to_first_token_s: float = 0.0  # reset + prefill forward + first sample
    decode_steps: int = 0  # one-token forwards after the prefill
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class TextChunk:
    """A piece of text and the ids pushed since the previous piece (they may span several)."""

    text: str
    token_ids: list[int]


EosIds = int | Collection[int] | None  # one id, several (any of them stops), or none


def _check_prompt(model: CausalLM, prompt_ids: Sequence[int], config: GenerationConfig,
                  max_seq_len_source: str) -> None:
    if len(prompt_ids) == 0:
        raise OptionError("prompt_ids is empty; generation needs at least one prompt token")
    needed = len(prompt_ids) + config.max_new_tokens
    if needed > model.max_seq_len:
        source = f" ({max_seq_len_source})" if max_seq_len_source else ""
        given = config.max_new_tokens_source
        origin = (f" (from {given}; --max-new-tokens N (API: max_new_tokens=N) overrides it)"
                  if given else "")
        room = model.max_seq_len - len(prompt_ids)
        advice = (f"shorten the prompt or lower max_new_tokens (at most {room} fit after this "
                  "prompt)" if room >= 1 else "shorten the prompt: it alone fills the context")
        raise ContextLengthError(
            f"prompt of {len(prompt_ids)} tokens + max_new_tokens {config.max_new_tokens}"
            f"{origin} = {needed} exceeds the context length (max_seq_len) of "
            f"{model.max_seq_len}{source}; {advice}"
        )


def _stop_ids(eos_id: EosIds) -> frozenset[int]:
    if eos_id is None:
        return frozenset()
    return frozenset([eos_id]) if isinstance(eos_id, int) else frozenset(eos_id)


def _log_finish(result: GenerationResult) -> None:
    r = result
    n, ttft, rate = len(r.token_ids), r.time_to_first_token_s, r.decode_tokens_per_s
    logger.debug(
        "finished (%s): %d tokens, first %.3fs, %.2f tok/s", r.finish_reason, n, ttft, rate
    )


class TokenStream(Iterator[int]):
    """Generated token ids, one per `next`; `result` holds ids, finish reason and timings.

    Validation happens at construction so a bad request fails before any model work; the model
    is reset and run only as the stream is iterated.
    """

    def __init__(
        self,
        model: CausalLM,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        *,
        eos_id: EosIds,
        cancel: threading.Event | None = None,
        max_seq_len_source: str = "",
    ) -> None:
        _check_prompt(model, prompt_ids, config, max_seq_len_source)
        self.result = GenerationResult(prompt_tokens=len(prompt_ids))
        self._model = model
        self._config = config
        self._stop_ids = frozenset() if config.ignore_eos else _stop_ids(eos_id)
        self._cancel = cancel
        self._ids = self._run(torch.tensor(list(prompt_ids), dtype=torch.long))

    def __next__(self) -> int:
        return next(self._ids)

    def close(self) -> None:
        """Stop early: no further forward passes run."""
        self._ids.close()

    def _run(self, prompt: torch.Tensor) -> Iterator[int]:
        sampler = Sampler(self._config.sampling)
        inputs, pos = prompt, 0  # the first forward is the whole prompt (prefill)
        for step in range(self._config.max_new_tokens):
            if self._cancel is not None and self._cancel.is_set():
                self._finish("cancelled")
                return
            start = time.perf_counter()
            if step == 0:
                self._model.reset()
            with torch.inference_mode():
                logits = self._model.forward(inputs, pos)  # [T, vocab]
            # NaN/inf -> NumericalError; dtype is optional (the runtime's model names it)
            check_finite(logits[-1], step, getattr(self._model, "dtype", None))
            token = sampler.sample(logits[-1])
            self._record_time(step, time.perf_counter() - start)
            if token in self._stop_ids:
                self._finish("eos")
                return
            self.result.token_ids.append(token)
            yield token
            pos += inputs.numel()
            inputs = torch.tensor([token], dtype=torch.long)
        self._finish("length")

    def _record_time(self, step: int, seconds: float) -> None:
        if step == 0:
            self.result.time_to_first_token_s = seconds
        else:
            self.result.decode_steps += 1
            self.result.decode_s += seconds

    def _finish(self, reason: FinishReason) -> None:
        self.result.finish_reason = reason
        _log_finish(self.result)


def generate_ids(
    model: CausalLM,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    *,
    eos_id: EosIds,
    cancel: threading.Event | None = None,
    max_seq_len_source: str = "",
) -> TokenStream:
    """Generate token ids after `prompt_ids`; read `.result` on the returned stream afterwards.

    Stops at EOS (any of `eos_id`'s ids; not yielded) unless config.ignore_eos, after
    max_new_tokens, or once `cancel` is set (checked before each forward pass, so at most one
    more token follows). `max_seq_len_source` says, in a ContextLengthError, where the
    model's max_seq_len comes from and how to raise it.
    """
    return TokenStream(model, prompt_ids, config, eos_id=eos_id, cancel=cancel,
                       max_seq_len_source=max_seq_len_source)


class TextStream(Iterator[str]):
    """Generated text pieces, honouring stop strings; `result` also gets the final text.

    Iterate it for `str` pieces, or iterate `chunks()` for TextChunk (text plus the ids behind
    it); both draw from the same single-use stream.
    """

    def __init__(self, tokens: TokenStream, decoder: TextDecoder, stop: Sequence[str]) -> None:
        self._tokens = tokens
        self.result = tokens.result
        self._decoder = decoder
        self._filter = StopStringFilter(stop)
        self._chunks = self._run()

    def __next__(self) -> str:
        return next(self._chunks).text

    def chunks(self) -> Iterator[TextChunk]:
        return self._chunks

    def close(self) -> None:
        """Stop early: no further forward passes run."""
        self._chunks.close()
        self._tokens.close()

    def _run(self) -> Iterator[TextChunk]:
        pending: list[int] = []  # ids whose text has not been emitted yet
        for token in self._tokens:
            pending.append(token)
            text, stopped = self._filter.push(self._decoder.push(token))
            if stopped:
                self._tokens.close()
                self._stop()
            if text:
                yield self._emit(text, pending)
                pending = []
            if stopped:
                return
        yield from self._finish(pending)

    def _finish(self, pending: list[int]) -> Iterator[TextChunk]:
        """After the ids end: the decoder's last bytes may still complete a stop string."""
        text, stopped = self._filter.push(self._decoder.flush())
        if stopped:
            self._stop()
        else:
            text += self._filter.flush()
        if text:
            yield self._emit(text, pending)

    def _emit(self, text: str, ids: list[int]) -> TextChunk:
        self.result.text += text
        return TextChunk(text=text, token_ids=ids)

    def _stop(self) -> None:
        self.result.finish_reason = "stop"
        _log_finish(self.result)


def stream_text(
    model: CausalLM,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    decoder: TextDecoder,
    *,
    eos_id: EosIds,
    cancel: threading.Event | None = None,
    max_seq_len_source: str = "",
) -> TextStream:
    """Generate text after `prompt_ids`, stopping at EOS, length, cancel or a stop string.

    Text that might be the start of a stop string is held until disambiguated; the stop string
    itself is never emitted. Read `.result` on the returned stream afterwards.
    """
    tokens = TokenStream(model, prompt_ids, config, eos_id=eos_id, cancel=cancel,
                         max_seq_len_source=max_seq_len_source)
    return TextStream(tokens, decoder, config.stop)
