"""Checks of request values that need no model: the sampling seed and stop strings.

No torch here: the command line runs them before it loads a model (a bad ``--seed`` or
``--stop`` is refused in a second, not after the weights are read), and the sampler and the
generation config run the same functions for the Python API, so both name the value the same
way. ``source`` in each function names the flag or argument (``--seed``, ``stop[1]``).
"""

from __future__ import annotations

from collections.abc import Sequence

from offload_rt.errors import OptionError
from offload_rt.text_input import check_text

# torch.Generator.manual_seed takes -2**63 .. 2**64 - 1 and maps a negative seed s to
# 2**64 + s; offload_rt takes the non-negative range only, so each seed has one spelling.
MAX_SEED = 2**64 - 1


def check_seed(seed: object, source: str = "seed") -> int | None:
    """``seed`` unchanged when it is None (a fresh random seed) or an int in 0..2**64 - 1.

    OptionError naming ``source`` otherwise (a bool, a float, a negative or a larger int:
    torch's generator raises a bare ``ValueError: Overflow`` for the latter).
    """
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionError(f"{source} must be an int or None, got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise OptionError(f"{source} {seed} is outside 0..{MAX_SEED} (2**64 - 1, the range of "
                          "torch's random generator); leave it out for a random seed")
    return seed


def check_stops(stops: Sequence[str], source: str = "stop") -> tuple[str, ...]:
    """``stops`` as a tuple of non-empty, valid Unicode strings.

    A stop string with a lone surrogate (``"\\udcff"``: a byte that was not UTF-8 on the
    command line) could never match generated text, which is always valid: OptionError naming
    ``source[i]`` (``text_input.check_text``).
    """
    if isinstance(stops, str):
        raise OptionError(f"{source} must be a sequence of strings, not one string: {stops!r}")
    out = tuple(stops)
    for index, stop in enumerate(out):
        if not isinstance(stop, str) or not stop:
            raise OptionError(f"{source} must hold non-empty strings, got {out!r}")
        check_text(stop, f"{source}[{index}]")
    return out
