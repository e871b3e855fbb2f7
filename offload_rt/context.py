"""The context length a runtime allocates (``max_seq_len``), and where its limit comes from.

The KV cache is sized for it, so by default it is min(model's context, ``DEFAULT_CONTEXT``):
a 32k-context model does not reserve 32k positions of KV memory unless asked to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from offload_rt.config import ModelConfig

log = logging.getLogger(__name__)
DEFAULT_CONTEXT = 4096
_RAISE = "--max-seq-len N (API: max_seq_len=N)"


@dataclass(frozen=True)
class Context:
    """``max_seq_len`` positions; ``source`` says where that limit comes from and how to raise
    it, for the message of a request that does not fit (``ContextLengthError``)."""

    max_seq_len: int
    source: str


def choose_context(cfg: ModelConfig, requested: int | None) -> Context:
    """The context for a ``max_seq_len`` option (None: not given).

    Above the model's context the option is capped to it, with a warning naming both numbers
    (a library warning reaches the CLI's stderr without -v: logging's last-resort handler).
    """
    model_ctx, field = cfg.max_seq_len, cfg.max_seq_len_source
    model = f"the model's context ({field})" if field else "the model's context"
    if requested is None:
        if model_ctx <= DEFAULT_CONTEXT:
            return Context(model_ctx, model)
        return Context(DEFAULT_CONTEXT, f"offload_rt's default, DEFAULT_CONTEXT = "
                                        f"{DEFAULT_CONTEXT}; {model} is {model_ctx}: "
                                        f"{_RAISE} raises it up to {model_ctx}")
    if requested > model_ctx:
        log.warning("max_seq_len (--max-seq-len) %d is above the model's context of %d%s: "
                    "using %d", requested, model_ctx, f" ({field})" if field else "", model_ctx)
        return Context(model_ctx, f"{model}; the requested max_seq_len {requested} was "
                                  f"capped to it")
    if requested == model_ctx:
        return Context(requested, f"set by max_seq_len (--max-seq-len), which is {model}")
    return Context(requested, f"set by max_seq_len (--max-seq-len) {requested}; {model} is "
                              f"{model_ctx}: {_RAISE} raises it up to {model_ctx}")
