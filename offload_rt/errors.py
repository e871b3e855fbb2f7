"""Errors a user can act on. Each message names the file, tensor or option at fault."""

from __future__ import annotations


class OffloadError(Exception):
    """Base class of every error offload_rt raises on purpose."""


class CheckpointError(OffloadError):
    """A model folder, config or weight file is missing, malformed or inconsistent."""


class TokenizerError(OffloadError):
    """The tokenizer file is missing, unreadable, or does not fit the model's vocabulary."""


class TokenIdError(TokenizerError, ValueError):
    """A token id the tokenizer has no piece for (also a ValueError: a bad argument value)."""


class OptionError(OffloadError):
    """A user-given option (CLI flag or API argument) is invalid."""


class BudgetError(OffloadError):
    """The memory budgets cannot hold what the model needs to run."""


class ContextLengthError(OffloadError):
    """Prompt plus requested tokens exceed the model's context."""


class BusyError(OffloadError):
    """A generation is already running on this runtime."""


class NumericalError(OffloadError):
    """The model produced NaN or infinite logits (overflow in the compute dtype, bad weights)."""


class LoaderError(OffloadError):
    """A background expert load failed; the original exception is chained."""


class PolicyError(OffloadError):
    """A cache policy (user code) raised in one of its hooks, or broke the policy contract
    (e.g. chose a victim that was not a candidate); names the policy class and the hook. The
    original exception is chained; the cache was left consistent."""
