"""The model's own generation defaults: ``generation_config.json`` (Hugging Face, optional).

What a request leaves out (``None``) comes from here, as transformers' ``generate`` takes it
from ``model.generation_config``: the EOS ids that stop generation (every id of a list), the
sampling defaults (``do_sample``, ``temperature``, ``top_k``, ``top_p``), the default length
(``max_new_tokens``, else ``max_length`` minus the prompt) and ``stop_strings``. Fields that
change the tokens and that offload_rt does not implement are refused by name: at load when
they act on greedy decoding too (``repetition_penalty``, ``num_beams``...), at a sampling
request when they only shape sampling (``min_p``, ``typical_p``...). docs/model_fields.md has
the table. No torch here: the CLI reads this file before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offload_rt.config import read_json
from offload_rt.errors import CheckpointError, ContextLengthError, OptionError
from offload_rt.model_fields import HARMLESS, HONOURED, REFUSED, token_ids
from offload_rt.text_input import check_text

FILE = "generation_config.json"
DEFAULT_MAX_NEW_TOKENS = 128
SAMPLING_ONLY = "refused when sampling"
# transformers' global defaults for a do_sample model that leaves them out
# (GenerationConfig._get_default_generation_params)
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}

# Refused fields -> their inert values (the values that change nothing).
REFUSED_UNLESS: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (1, 1.0), "encoder_repetition_penalty": (1, 1.0),
    "no_repeat_ngram_size": (0,), "encoder_no_repeat_ngram_size": (0,), "min_length": (0,),
    "min_new_tokens": (0,), "num_beams": (1,), "num_beam_groups": (1,),
    "diversity_penalty": (0, 0.0), "penalty_alpha": (0, 0.0), "dola_layers": (),
    "bad_words_ids": ([],), "force_words_ids": ([],), "constraints": ([],),
    "suppress_tokens": ([],), "begin_suppress_tokens": ([],), "forced_bos_token_id": (),
    "forced_eos_token_id": (), "sequence_bias": ({}, []), "exponential_decay_length_penalty": (),
    "guidance_scale": (1, 1.0), "watermarking_config": (), "token_healing": (False,),
}
SAMPLING_ONLY_UNLESS: dict[str, tuple[Any, ...]] = {
    "typical_p": (1, 1.0), "epsilon_cutoff": (0, 0.0), "eta_cutoff": (0, 0.0), "min_p": (),
    "top_h": (),
}
FIELDS: dict[str, str] = {
    **dict.fromkeys(("eos_token_id", "do_sample", "temperature", "top_k", "top_p",
                     "max_new_tokens", "max_length", "stop_strings"), HONOURED),
    **dict.fromkeys(REFUSED_UNLESS, REFUSED),
    **dict.fromkeys(SAMPLING_ONLY_UNLESS, SAMPLING_ONLY),
    **dict.fromkeys((
        "_from_model_config", "transformers_version", "bos_token_id", "pad_token_id",
        "decoder_start_token_id", "use_cache", "cache_implementation", "cache_config",
        "max_cache_len", "output_attentions", "output_hidden_states", "output_scores",
        "output_logits", "return_dict_in_generate", "num_return_sequences", "compile_config",
        "disable_compile", "continuous_batching_config", "prefill_chunk_size", "low_memory",
        "max_time", "remove_invalid_values", "renormalize_logits", "early_stopping",
        "length_penalty", "is_assistant", "num_assistant_tokens",
        "num_assistant_tokens_schedule", "assistant_confidence_threshold",
        "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
        "assistant_ensemble_weight", "prompt_lookup_num_tokens", "max_matching_ngram_size",
        "speculation_type", "use_mtp"), HARMLESS),
}


@dataclass(frozen=True)
class GenerationDefaults:
    """The honoured fields of one ``generation_config.json`` (None: the file does not set it;
    an absent file sets nothing). ``sampling_only`` holds the sampling-only fields it sets."""

    path: Path | None = None
    eos_token_ids: tuple[int, ...] | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None
    stop_strings: tuple[str, ...] | None = None
    sampling_only: dict[str, Any] = field(default_factory=dict)

    def default(self, name: str) -> Any:
        """The model's default for a request parameter (temperature, top_k, top_p,
        max_new_tokens), or None when its file sets none (a do_sample: false file sets
        greedy: temperature 0)."""
        if name == "max_new_tokens":
            return self.max_new_tokens
        if self.do_sample is None:
            return None
        if not self.do_sample:
            return {"temperature": 0.0, "top_k": 0, "top_p": 1.0}[name]
        value = getattr(self, name)
        return HF_SAMPLING_DEFAULTS[name] if value is None else value

    def sampling(self, temperature: float | None, top_k: int | None, top_p: float | None
                 ) -> tuple[float, int, float]:
        """The caller's values where given, else the model's, else greedy (0, 0 = off, 1 =
        off). ``OptionError`` when the result samples and the file sets a sampling-only field
        offload_rt does not implement."""
        greedy = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        out = {k: v if v is not None else self._or(k, greedy[k]) for k, v in given.items()}
        if out["temperature"] > 0:
            chosen = ("the temperature given" if temperature is not None else
                      f"the file's do_sample {self.do_sample}")
            self.check_sampling(f"this request samples (temperature {out['temperature']:g}, "
                                f"{chosen})")
        return out["temperature"], out["top_k"], out["top_p"]

    def check_sampling(self, why: str) -> None:
        """``OptionError`` when the file sets a sampling-only field offload_rt does not
        implement; ``why`` says who chose to sample (the message names the way out)."""
        if not self.sampling_only:
            return
        name, value = next(iter(self.sampling_only.items()))
        raise OptionError(f"{self.path}: {name} {value!r} shapes sampling and offload_rt does "
                          f"not implement it; {why}: pass --temperature 0 (API: "
                          f"temperature=0) to generate greedily, or remove {name} from the file")

    def _or(self, name: str, fallback: Any) -> Any:
        value = self.default(name)
        return fallback if value is None else value

    def new_tokens(self, max_new_tokens: int | None, prompt_tokens: int) -> int:
        """The caller's max_new_tokens, else the file's, else its max_length minus the prompt
        (as transformers' generate), else DEFAULT_MAX_NEW_TOKENS."""
        if max_new_tokens is not None:
            return max_new_tokens
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is None:
            return DEFAULT_MAX_NEW_TOKENS
        if self.max_length <= prompt_tokens:
            raise ContextLengthError(
                f"{self.path}: max_length {self.max_length} (prompt plus new tokens) leaves no "
                f"room after a prompt of {prompt_tokens} tokens; pass max_new_tokens "
                "(--max-new-tokens)")
        return self.max_length - prompt_tokens

    def new_tokens_source(self, max_new_tokens: int | None) -> str:
        """Where ``new_tokens(max_new_tokens, ...)`` takes its value from, for an error
        message ("" when the caller gave it)."""
        if max_new_tokens is not None:
            return ""
        if self.max_new_tokens is not None:
            return f"max_new_tokens in {self.path}"
        if self.max_length is not None:
            return f"max_length {self.max_length} in {self.path}, minus the prompt"
        return f"offload_rt's default, DEFAULT_MAX_NEW_TOKENS = {DEFAULT_MAX_NEW_TOKENS}"

    def stops(self, stop: Sequence[str] | None) -> tuple[str, ...]:
        """The caller's stop strings when given (an empty list disables the file's)."""
        if isinstance(stop, str):
            raise OptionError(f"stop must be a sequence of strings, not one string: {stop!r}")
        return tuple(stop) if stop is not None else self.stop_strings or ()


def read_generation_config(model_dir: Path,
                           vocab_size: int | None = None) -> GenerationDefaults:
    """``model_dir/generation_config.json`` read and checked; no file: no defaults.

    Raises ``CheckpointError`` naming the file and field for malformed JSON, a value of the
    wrong type, a refused field with a value that changes the tokens, or (with the model's
    ``vocab_size``) an ``eos_token_id`` the model can never produce: it replaces config.json's
    stop ids, so no generation would ever stop.
    """
    path = Path(model_dir) / FILE
    if not path.is_file():
        return GenerationDefaults()
    data = read_json(path)
    for name, inert in REFUSED_UNLESS.items():
        if data.get(name) is not None and data[name] not in inert:
            raise CheckpointError(f"{path}: {name} {data[name]!r} changes the generated tokens "
                                  "and offload_rt does not implement it; remove it (or set it "
                                  "to its neutral value) to run this model")
    eos = token_ids(data, "eos_token_id", path, (), vocab_size) \
        if data.get("eos_token_id") is not None else None
    return GenerationDefaults(
        path=path, eos_token_ids=eos or None,
        do_sample=_typed(data, "do_sample", path, bool),
        temperature=_number(data, "temperature", path, low=0.0),
        top_k=_typed(data, "top_k", path, int, low=0),
        top_p=_number(data, "top_p", path, low=0.0, high=1.0),
        max_new_tokens=_typed(data, "max_new_tokens", path, int, low=1),
        max_length=_typed(data, "max_length", path, int, low=1),
        stop_strings=_strings(data, "stop_strings", path),
        sampling_only={k: data[k] for k, inert in SAMPLING_ONLY_UNLESS.items()
                       if data.get(k) is not None and data[k] not in inert})


def _bad(path: Path, name: str, what: str, value: Any) -> CheckpointError:
    return CheckpointError(f"{path}: field '{name}' must be {what}, got {value!r}")


def _typed(data: dict[str, Any], name: str, path: Path, kind: type, low: int | None = None
           ) -> Any:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(path, name, f"{'a boolean' if kind is bool else 'an integer'}", value)
    if low is not None and value < low:
        raise _bad(path, name, f"an integer >= {low}", value)
    return value


def _number(data: dict[str, Any], name: str, path: Path, low: float, high: float | None = None
            ) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and not (low < value <= high)):
        span = f"in ({low}, {high}]" if high is not None else f">= {low}"
        raise _bad(path, name, f"a number {span}", value)
    return float(value)


def _strings(data: dict[str, Any], name: str, path: Path) -> tuple[str, ...] | None:
    value = data.get(name)
    if value is None:
        return None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values):
        raise _bad(path, name, "a string or a list of non-empty strings", value)
    for index, text in enumerate(values):  # JSON can spell a lone surrogate ("\ud800")
        try:
            check_text(text, f"{path}: field '{name}'[{index}]")
        except OptionError as exc:
            raise CheckpointError(str(exc)) from None
    return tuple(values)
