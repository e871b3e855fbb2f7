"""The demo model shipped inside the package (see README, 'Model card')."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from offload_rt.errors import CheckpointError
from offload_rt.options import budget_given

# Expert slots per layer when the demo runs with default budgets: half of its 8 experts, so the
# cache and its statistics are visibly at work.
DEMO_CACHE_EXPERTS = 4


def demo_model_dir() -> Path:
    """Folder of the shipped demo model."""
    path = Path(str(resources.files("offload_rt") / "demo_model"))
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: the demo model is missing from this installation; "
                              "pass a MODEL_DIR")
    return path


def demo_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``load`` options for the demo model: ``options`` plus ``cache_experts=4`` unless the
    caller sized the expert cache itself (``cache_experts``, ``offload=False``, or a
    ``gpu_memory``/``cpu_memory`` size; 'auto' and None size nothing, so they keep the default).
    """
    sized = (options.get("cache_experts") is not None or options.get("offload") is False
             or budget_given(options.get("gpu_memory")) or budget_given(options.get("cpu_memory")))
    return dict(options) if sized else {**options, "cache_experts": DEMO_CACHE_EXPERTS}
