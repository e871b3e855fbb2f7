"""offload_rt: run Mixture-of-Experts language models with expert weights streamed between tiers.

    import offload_rt
    rt = offload_rt.load("path/to/model", cpu_memory="8GiB", policy="lru", prefetch=1)
    print(rt.generate("The capital of France is", max_new_tokens=16).text)

``offload_rt.load()`` without a path loads the shipped demo model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from offload_rt.errors import (
    BudgetError,
    BusyError,
    CheckpointError,
    ContextLengthError,
    LoaderError,
    NumericalError,
    OffloadError,
    OptionError,
    PolicyError,
    TokenIdError,
    TokenizerError,
)

if TYPE_CHECKING:
    from offload_rt.runtime import Output, Runtime, load

__version__ = "0.1.0"
# Every error class of offload_rt.errors is exported here (tests/test_flags.py checks).
__all__ = ["BudgetError", "BusyError", "CheckpointError", "ContextLengthError", "LoaderError",
           "NumericalError", "OffloadError", "OptionError", "Output", "PolicyError", "Runtime",
           "TokenIdError", "TokenizerError", "load"]
_RUNTIME_NAMES = ("Output", "Runtime", "load")


def __getattr__(name: str) -> Any:
    """``load``, ``Runtime`` and ``Output`` import torch: only on first use, so the command
    line (``--help``, ``simulate``) and pure-Python tools start without it."""
    if name in _RUNTIME_NAMES:
        from offload_rt import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'offload_rt' has no attribute {name!r}")
