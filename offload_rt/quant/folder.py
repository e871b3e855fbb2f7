"""What a quantized folder's config.json says about its experts (docs/quantized_format.md).

    "quantization_config": {"quant_method": "offload_rt", "format_version": 1,
                            "experts": {"format": "int8", "scale_dtype": "bfloat16"},
                            "record_bytes": 28672,
                            "trunk": {"format": "int8", "scale_dtype": "bfloat16"}}

``trunk`` is optional (absent: the trunk is float; ``quant.trunk_int8``).

An fp8 checkpoint's config (``quant_method`` compressed-tensors or fp8) is read by
``quant.fp8_scheme``; every other method is refused by ``model_fields.check_hf_fields`` before
this runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offload_rt.errors import CheckpointError
from offload_rt.model_fields import FP8_QUANT_METHODS
from offload_rt.quant.fp8_scheme import Fp8Scheme, read_fp8_scheme
from offload_rt.quant.trunk_int8 import StoredInt8Trunk, read_trunk_spec

QUANT_METHOD = "offload_rt"
FORMAT_VERSION = 1
RECORD_FORMATS = ("int8", "int4")  # a folder of float experts has no quantization_config


@dataclass(frozen=True)
class QuantizedExperts:
    """The experts of a quantized folder: their format spec (``quant.formats.make_format``'s
    input), the bytes of every record, and the config file both came from; ``trunk``: the
    folder's int8 trunk (``offload-rt quantize --trunk int8``), None for a float trunk."""

    spec: dict[str, Any]
    record_bytes: int
    source: Path
    trunk: StoredInt8Trunk | None = None

    @property
    def format_name(self) -> str:
        return str(self.spec["format"])


def _bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: quantization_config: {why} (docs/quantized_format.md)")


def read_quantization(data: dict[str, Any], path: Path
                      ) -> QuantizedExperts | Fp8Scheme | None:
    """config.json's ``quantization_config`` (already parsed as ``data``), checked: None for a
    folder of float weights, an ``Fp8Scheme`` for an fp8 checkpoint; ``CheckpointError``
    naming the file and field otherwise."""
    quant = data.get("quantization_config")
    if quant is None:
        return None
    if isinstance(quant, dict) and quant.get("quant_method") in FP8_QUANT_METHODS:
        return read_fp8_scheme(quant, path)
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        raise _bad(path, f"quant_method must be {QUANT_METHOD!r}")
    version = quant.get("format_version")
    if version != FORMAT_VERSION:
        raise _bad(path, f"format_version {version!r} is not supported (this offload_rt reads "
                         f"version {FORMAT_VERSION})")
    spec = quant.get("experts")
    if not isinstance(spec, dict) or spec.get("format") not in RECORD_FORMATS:
        shown = spec.get("format") if isinstance(spec, dict) else spec
        raise _bad(path, f"experts.format {shown!r} is not one of {list(RECORD_FORMATS)}")
    size = quant.get("record_bytes")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise _bad(path, f"record_bytes must be a positive integer, got {size!r}")
    return QuantizedExperts(dict(spec), size, path, read_trunk_spec(quant.get("trunk"), path))
