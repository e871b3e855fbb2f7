"""Model families, registered by config.json's ``model_type`` (see ``base.Family``).

To add a family: a module here with its ``Family`` (field table, ``read``, tensor names) and
one line in ``FAMILIES``; a block part no family has yet is a ``ModelConfig`` field that
``offload_rt/model/`` builds and ``tensor_names.trunk_shapes`` sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offload_rt.errors import CheckpointError
from offload_rt.families import gpt_oss
from offload_rt.families.base import Family
from offload_rt.families.mixtral import MIXTRAL
from offload_rt.families.olmoe import OLMOE
from offload_rt.families.qwen2_moe import QWEN2_MOE
from offload_rt.families.qwen3_moe import QWEN3_MOE

FAMILIES: dict[str, Family] = {f.model_type: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE)}
# Recognised model types we do not run, with what they would need.
REFUSED: dict[str, str] = {"gpt_oss": gpt_oss.MISSING}


def get(model_type: str) -> Family:
    """The family registered as ``model_type`` (``ModelConfig.family``); KeyError if none."""
    return FAMILIES[model_type]


def family_of(data: dict[str, Any], path: Path) -> Family:
    """The family config.json ``data`` (read from ``path``) belongs to: by ``model_type``,
    else by a class name in ``architectures``. A refused or unknown type is a
    ``CheckpointError`` naming it and the families offload_rt runs."""
    model_type = data.get("model_type")
    archs = data.get("architectures") or []
    if isinstance(model_type, str) and model_type in REFUSED:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported: it needs "
                              f"{REFUSED[model_type]}, which offload_rt does not implement")
    if isinstance(model_type, str) and model_type in FAMILIES:
        return FAMILIES[model_type]
    by_class = [f for f in FAMILIES.values() if isinstance(archs, list)
                and f.architecture in archs]
    if by_class:
        return by_class[0]
    raise CheckpointError(f"{path}: unsupported architecture (model_type={model_type!r}, "
                          f"architectures={archs}); offload_rt runs the MoE families "
                          f"{', '.join(FAMILIES)} (config.json's model_type)")
