"""The demo model shipped inside the package (see README, 'Model card')."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from offload_rt.errors import CheckpointError

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
