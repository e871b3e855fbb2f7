"""An int8 trunk stored in a quantized folder (``offload-rt quantize --trunk int8``).

The matrices ``tensor_names.int8_trunk_shapes`` names (every layer's attention projections q,
k, v, o and an untied LM head) are stored as they would be quantized at load
(``model.int8_linear.quantize_rows``: symmetric int8, one scale per output channel):

    <prefix>.weight        I8  [out, in]
    <prefix>.weight_scale  D   [out]        w ~ weight * weight_scale[:, None]

with D the ``scale_dtype`` of config.json's ``quantization_config.trunk``
(``{"format": "int8", "scale_dtype": "bfloat16"}``; docs/quantized_format.md). The folder's
bytes are those of ``--trunk int8 --dtype D`` at load: each matrix is cast to D, then
quantized by the same function (``quantize_matrix``). Loading reads them as they are: no float
copy, no re-quantization (``model.build``). Every refusal is a ``CheckpointError`` naming
config.json and the field, or the file and the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from offload_rt.config import ModelConfig
from offload_rt.errors import CheckpointError
from offload_rt.families.base import TensorNames
from offload_rt.model.int8_linear import quantize_rows
from offload_rt.safetensors_file import TensorInfo, read_tensor
from offload_rt.tensor_names import int8_trunk_shapes

TRUNK_FORMAT = "int8"
SCALE_SUFFIX = "weight_scale"  # the scale beside <prefix>.weight (compressed-tensors' name)
SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class StoredInt8Trunk:
    """A folder's int8 trunk: its scales' dtype and the config.json that says so."""

    scale_dtype: torch.dtype
    source: Path

    def spec(self) -> dict[str, Any]:
        """``quantization_config.trunk`` as written."""
        return trunk_spec(self.scale_dtype)


def trunk_spec(scale_dtype: torch.dtype) -> dict[str, Any]:
    """``quantization_config.trunk`` of a folder whose trunk is int8 with ``scale_dtype``."""
    return {"format": TRUNK_FORMAT, "scale_dtype": str(scale_dtype).removeprefix("torch.")}


def read_trunk_spec(value: object, path: Path) -> StoredInt8Trunk | None:
    """``quantization_config.trunk`` of config.json at ``path``: None (absent or null: the
    trunk is float), or the int8 trunk it describes; ``CheckpointError`` naming the field."""
    if value is None:
        return None
    where = f"{path}: quantization_config.trunk"
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} must be an object such as {trunk_spec(torch.bfloat16)} "
                              f"(or absent for a float trunk), got {value!r} "
                              "(docs/quantized_format.md)")
    if value.get("format") != TRUNK_FORMAT:
        raise CheckpointError(f"{where}.format {value.get('format')!r} is not supported (only "
                              f"{TRUNK_FORMAT!r}; a float trunk has no 'trunk' field) "
                              "(docs/quantized_format.md)")
    dtype = value.get("scale_dtype")
    if dtype not in SCALE_DTYPES:
        raise CheckpointError(f"{where}.scale_dtype {dtype!r} is not one of "
                              f"{list(SCALE_DTYPES)} (docs/quantized_format.md)")
    return StoredInt8Trunk(SCALE_DTYPES[dtype], path)


def scale_name(weight: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``...q_proj.weight_scale``."""
    return weight.removesuffix("weight") + SCALE_SUFFIX


def quantize_matrix(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """w [out, in] as stored -> (int8 [out, in], scale [out] in ``scale_dtype``): what
    ``--trunk int8`` computes at load in compute dtype ``scale_dtype`` (``model.build``: the
    weight read in the compute dtype, then ``quantize_rows``)."""
    return quantize_rows(w.to(scale_dtype), scale_dtype)


def int8_trunk_scales(trunk: StoredInt8Trunk, tensors: dict[str, TensorInfo],
                      files: TensorNames, cfg: ModelConfig) -> dict[str, TensorInfo]:
    """Weight name -> its scale's ``TensorInfo`` for every int8 trunk matrix, checked: the
    weight int8 (its shape is checked with the other tensors'), the scale present, [out] and
    in the config's scale dtype."""
    scales = {}
    for canonical, (out, _) in int8_trunk_shapes(cfg).items():
        weight = files.file_name(canonical)
        info = tensors.get(weight)
        if info is None:
            continue  # the generic check names it missing
        if info.dtype != torch.int8:
            raise CheckpointError(f"{info.path}: tensor '{weight}' has dtype {info.dtype}; "
                                  f"{trunk.source} declares an int8 trunk "
                                  "(quantization_config.trunk), whose weights are I8")
        name = scale_name(weight)
        scale = tensors.get(name)
        if scale is None:
            raise CheckpointError(f"{info.path}: tensor '{weight}' is int8 but its scale "
                                  f"'{name}' is missing from the weight files")
        if scale.shape != (out,) or scale.dtype != trunk.scale_dtype:
            raise CheckpointError(
                f"{scale.path}: tensor '{name}' is {scale.dtype} {list(scale.shape)}; the int8 "
                f"trunk's scale of '{weight}' is {trunk.scale_dtype} [{out}] ({trunk.source}: "
                "quantization_config.trunk)")
        scales[weight] = scale
    return scales


def read_int8(weight: TensorInfo, scale: TensorInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored int8 matrix and its scales as they are in the file; a scale that is not a
    finite number > 0 (a corrupt file: every row's absmax / 127, 1 for an all-zero row) is a
    ``CheckpointError`` naming the file and tensor."""
    s = read_tensor(scale)
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        raise CheckpointError(f"{scale.path}: tensor '{scale.name}' holds a scale of "
                              f"{s[bad][0].item()} ({int(bad.sum())} of {s.numel()} not finite "
                              "and > 0): the folder is corrupt")
    return read_tensor(weight), s
